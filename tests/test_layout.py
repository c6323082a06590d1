"""The package's layout: who may import whom, module sizes, and imports that change nothing global.

The import graph is read with `ast` from src/tunelab, every import at any depth (`ast.walk`): one inside a
function keeps a call-time dependency out of import order, but it is a dependency all the same, so cycles and
layer rules count it. `imported(..., module_level=True)` reads only what runs when a module is imported.
"""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torch import nn

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "tunelab"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(path: Path, module_level: bool) -> set[str]:
    """The tunelab modules `path` imports (`from a import b` counts as `a.b` when that is a module)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from a import b`: a.b if a module, else a
                found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES
                             else node.module for alias in node.names)
            elif _type_checking(node):
                continue
            elif module_level and isinstance(node, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    tree = ast.parse(path.read_text())
    if module_level:
        visit(tree.body)
    else:
        visit([n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)])
    own = module_name(path) if path.is_relative_to(SRC) else None
    return {name for name in found if name in MODULES and name != own}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_graph_reader_sees_imports_and_cycles(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nimport tunelab.errors\nif TYPE_CHECKING:\n"
                      "    from tunelab.runs import x\ntry:\n    from tunelab import config\nexcept ImportError:\n"
                      "    pass\ndef f():\n    from tunelab.data import text\n")
    assert imported(source, module_level=True) == {"tunelab.errors", "tunelab.config"}
    assert imported(source, module_level=False) == {"tunelab.errors", "tunelab.config", "tunelab.data.text",
                                                    "tunelab.runs"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_through_others() -> None:
    graph = {name: imported(path, module_level=False) for name, path in MODULES.items()}
    assert cycles(graph) == []


def test_data_imports_nothing_from_models_or_tasks() -> None:
    wrong = {name: sorted(m for m in imported(path, module_level=False)
                          if m.startswith(("tunelab.models", "tunelab.tasks")))
             for name, path in MODULES.items() if name.startswith("tunelab.data")}
    assert {k: v for k, v in wrong.items() if v} == {}


# layer -> the packages it may not import (at any depth): lower layers never reach up
FORBIDDEN = {
    "tunelab.models": ("tunelab.artifacts", "tunelab.data", "tunelab.tasks", "tunelab.compress", "tunelab.deploy",
                       "tunelab.train"),
    "tunelab.artifacts": ("tunelab.tasks", "tunelab.compress", "tunelab.deploy", "tunelab.train"),
    "tunelab.checks": ("tunelab.models", "tunelab.tasks", "tunelab.train", "tunelab.run_checks"),
    "tunelab.deploy": ("tunelab.tasks", "tunelab.train", "tunelab.run_checks"),
}


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in packages)


def test_lower_layers_import_nothing_from_higher_ones() -> None:
    wrong = {name: sorted(m for m in imported(path, module_level=False) if within(m, FORBIDDEN[layer]))
             for layer in FORBIDDEN for name, path in MODULES.items() if within(name, (layer,))}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_tools_after_training_reach_no_training_code() -> None:
    """predict and serve read model/ folders: no import path, at any depth, leads them to tasks or the run."""
    graph = {name: imported(path, module_level=False) for name, path in MODULES.items()}
    seen: set[str] = set()
    todo = [name for name in MODULES if within(name, ("tunelab.deploy",))]
    while todo:
        if (name := todo.pop()) not in seen:
            seen.add(name)
            todo.extend(graph[name])
    assert sorted(m for m in seen if within(m, ("tunelab.tasks", "tunelab.train", "tunelab.run_checks"))) == []


def test_no_module_is_over_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


# ----------------------------------------------------------------------------- imports change nothing global
def python(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_vision_models_import_without_transformers() -> None:
    python("import sys, tunelab.models.vision; assert 'transformers' not in sys.modules")


def test_predict_and_serve_load_no_training_code() -> None:
    python("import sys, tunelab.deploy.predict, tunelab.deploy.server\n"
           "assert not [m for m in sys.modules if m.startswith('tunelab.tasks')], 'tasks loaded'\n")


def test_importing_changes_nothing_global() -> None:
    python("from lightning.fabric.strategies.launchers import subprocess_script as fabric\n"
           "from lightning.pytorch.strategies.launchers import subprocess_script as trainer\n"
           "launchers = fabric._hydra_subprocess_cmd, trainer._hydra_subprocess_cmd\n"
           "import tunelab.train, tunelab.runs.callbacks, tunelab.models.dropout, tunelab.models.text\n"
           "from omegaconf import OmegaConf\n"
           "from transformers import AttentionInterface\n"
           "assert (fabric._hydra_subprocess_cmd, trainer._hydra_subprocess_cmd) == launchers, 'launcher patched'\n"
           "assert not OmegaConf.has_resolver('run_dir'), 'resolver registered'\n"
           "assert tunelab.models.dropout.ATTENTION not in AttentionInterface._global_mapping, 'attention'\n")


def test_configure_applies_the_runtime_switches() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    from tunelab import runtime
    from tunelab.errors import TunelabError
    from tunelab.runs import distributed

    try:
        assert runtime.configure(OmegaConf.create({"runtime": {"cpu_dropout": False}})).cpu_dropout is False
        assert runtime.configure(OmegaConf.create({})) == runtime.Settings()  # keys left out: the defaults
        assert OmegaConf.has_resolver("run_dir")
        assert subprocess_script._hydra_subprocess_cmd is distributed.hydra_child_command
        with pytest.raises(TunelabError, match="runtime.cpu_dropout='no': expected true or false"):
            runtime.configure(OmegaConf.create({"runtime": {"cpu_dropout": "no"}}))
        with pytest.raises(TunelabError, match=r"runtime.dropout: unknown key \(valid keys: \['ddp_launcher'"):
            runtime.configure(OmegaConf.create({"runtime": {"dropout": True}}))
    finally:
        runtime.configure(OmegaConf.create({}))


def tiny_text_model():
    from tunelab.data.tokenizer import train_wordpiece
    from tunelab.models.text import TextModel

    tokenizer = train_wordpiece([f"word{i} and more words here" for i in range(200)], vocab_size=100)
    return TextModel("masked_lm", tokenizer=tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                     intermediate_size=64, max_position_embeddings=64, dropout=0.1)


def test_runtime_cpu_dropout_false_keeps_the_stock_modules() -> None:
    from tunelab import runtime
    from tunelab.models.dropout import ATTENTION

    try:
        runtime.configure(OmegaConf.create({"runtime": {"cpu_dropout": False}}))
        model = tiny_text_model()
        assert model.net.config._attn_implementation == "sdpa"
        assert any(type(m) is nn.Dropout for m in model.net.modules())
    finally:
        runtime.configure(OmegaConf.create({}))
    assert tiny_text_model().net.config._attn_implementation == ATTENTION


def test_a_model_unpickled_in_a_fresh_process_runs_its_cpu_attention(tmp_path: Path) -> None:
    """As in a `ddp_spawn` rank: nothing there switched a model to the CPU attention before."""
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(tiny_text_model()))
    python("import pathlib, pickle, torch\n"
           f"model = pickle.loads(pathlib.Path({str(tmp_path / 'model.pkl')!r}).read_bytes()).train()\n"
           "batch = {'input_ids': torch.randint(5, 100, (2, 8)), 'attention_mask': torch.ones(2, 8, dtype=torch.long)}\n"
           "assert model(batch).logits.shape == (2, 8, model.net.config.vocab_size)\n")


def test_throughput_silences_its_flops_warning_only_while_it_updates() -> None:
    from tunelab.runs.callbacks import Throughput

    before = list(warnings.filters)
    Throughput(window_size=2)
    assert list(warnings.filters) == before
