"""Start-up: the entry points' modules leave torchao (a dev extra, for one benchmark row) unimported, and loading
a model class, which makes transformers import torchao where it is installed, prints no torch `_pytree` notice."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENTRY_MODULES = ("tunelab.train", "tunelab.compress.run", "tunelab.deploy.predict", "tunelab.deploy.server")


def python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with every warning shown, as a user's first command would run it."""
    return subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_entry_modules_do_not_import_torchao() -> None:
    proc = python(f"import sys\nimport {', '.join(ENTRY_MODULES)}\nprint('torchao' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False", proc.stdout
    assert "_pytree" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (dev extra) is not installed")
def test_loading_model_classes_prints_no_pytree_notice() -> None:
    proc = python("import sys\nimport tunelab.models.text\nprint('torchao' in sys.modules)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip() != "True":
        pytest.skip("transformers no longer imports torchao with its model classes")
    assert "_pytree" not in proc.stderr and "Enum subclass" not in proc.stderr, proc.stderr[-3000:]
