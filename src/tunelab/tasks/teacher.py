"""Finding and loading the distillation teacher named by the `teacher` config (`teacher=` group).

Sources, in `teacher.path`: nothing (the newest `task=finetune` run, or `task=mlm` for a masked-LM
teacher), a run folder (its `model/`), a Hugging Face classification (or masked-LM) folder or hub name,
a timm folder written by `ImageModel.export`, or a timm model name with `teacher.weights=<file>`.
The frozen wrapper is `tunelab.models.teacher.Teacher`; loading reads `model/` folders through
`tunelab.artifacts`, which models may not import, so it lives here on the tasks side.
"""

from __future__ import annotations

from pathlib import Path

from tunelab import artifacts
from tunelab.errors import TunelabError
from tunelab.models.teacher import Teacher
from tunelab.models.vision import ImageModel

MAKE_ONE = "python train.py task=finetune"
MADE_BY = {"classifier": ("finetune", MAKE_ONE), "masked_lm": ("mlm", "python train.py task=mlm")}


def load_teacher(path: str | None = None, weights: str | None = None, trust_remote_code: bool = False,
                 log_dir: str = "logs", head: str = "classifier") -> Teacher:
    """Find and load the teacher named by the `teacher` config (see the module docstring)."""
    if head not in MADE_BY:
        raise TunelabError(f"teacher.head={head!r}: expected one of {sorted(MADE_BY)}")
    task, command = MADE_BY[head]
    if path is None:
        default = Path(log_dir) / task / "latest" / "model"
        if not (default / "config.json").is_file():
            raise TunelabError(
                f"teacher.path is not set and there is no trained model at {default} to distil from: make a "
                f"teacher first with `{command}` (same data=, a larger model=, e.g. model=bert_mini), or set "
                "teacher.path=<run folder, model folder or hub name>"
            )
        path = str(default.resolve())
    if head == "classifier" and weights:
        return _from_timm_name(str(path), weights)
    local = Path(str(path)).expanduser()
    if head == "classifier" and not local.is_dir():
        if artifacts.is_local(str(path)):
            raise TunelabError(f"teacher.path: {local} is not a folder (expected a run folder, a model folder, or a "
                               f"hub name); make a teacher with `{MAKE_ONE}`")
        import timm

        if timm.is_model(str(path)):
            raise TunelabError(f"teacher.path={path} is a timm model name: give its trained weights with "
                               "teacher.weights=<file.safetensors> (a teacher without trained weights teaches nothing)")
    kinds = [artifacts.MASKED_LM] if head == "masked_lm" else [artifacts.TEXT_CLASSIFIER, artifacts.IMAGE_CLASSIFIER]
    try:
        found = artifacts.load(str(path), role="teacher.path", trust_remote_code=trust_remote_code, kinds=kinds)
    except TunelabError as e:
        raise TunelabError(f"{e}; expected a model like the model/ of a `{command}` run") from None
    return Teacher(found.net, found.source, found.labels, found.tokenizer,
                   found.problem if head == "classifier" else None, grew_from_pretrained(found.card))


def grew_from_pretrained(card: dict) -> bool:
    """A model this project trained from a pretrained checkpoint (its card names a `pretrained` parent), or one
    made elsewhere (no card): not a from-scratch model of this project."""
    if not card:
        return True
    return any((p or {}).get("role") == "pretrained" for p in card.get("parents") or [])


def _from_timm_name(name: str, weights: str) -> Teacher:
    """A timm architecture with a trained weights file; its class count is read from the file."""
    from safetensors import safe_open

    path = Path(weights).expanduser()
    if not path.is_file():
        raise TunelabError(f"teacher.weights: file not found: {path} (expected the teacher's .safetensors weights)")
    import timm

    if not timm.is_model(name):
        raise TunelabError(f"teacher.path: unknown timm model {name!r} (with teacher.weights, give a timm name)")
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = (cfg.classifier if cfg is not None else None) or "fc"
    key = f"{classifier if isinstance(classifier, str) else classifier[0]}.weight"
    try:
        with safe_open(str(path), "pt") as f:
            rows = f.get_slice(key).get_shape()[0] if key in set(f.keys()) else None
    except Exception as e:
        raise TunelabError(f"teacher.weights: {path} is not a readable safetensors file ({e})") from None
    if rows is None:
        raise TunelabError(f"teacher.weights: {path} has no classifier {key!r} for {name} (expected a fine-tuned "
                           f"{name}, e.g. the model.safetensors of a `{MAKE_ONE} model=timm` run)")
    try:
        net = ImageModel("classifier", [str(i) for i in range(rows)], name=name, pretrained_file=str(path),
                         keep_classifier=True)
    except TunelabError as e:
        raise TunelabError(f"teacher: {e}") from None
    return Teacher(net, f"{name} + {path}", None)
