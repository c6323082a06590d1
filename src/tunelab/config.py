"""Config helpers: the resolvers Hydra needs before it composes, and validation before anything runs.

`run_dir` puts each run in its own folder (timestamp + process id, so two runs started in the
same second never share one) and sends `ckpt_path=last` back into the run it may continue
(`tunelab.runs.folder`).
`validate` checks every `_target_` node against its signature, so a misspelt key in a YAML file
fails with the valid keys listed instead of a TypeError halfway through start-up.
"""

from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from tunelab import runs
from tunelab.errors import TunelabError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def embedded(name: str, root: str) -> str:
    """An embedded dataset's folder (`${embedded:reviews,${paths.data_dir}}`). Composing a config generates
    nothing: a DataModule given the folder as `embedded` generates it in `prepare_data`."""
    from tunelab.data.embedded import folder

    return str(folder(name, Path(root)))


def compose_config(overrides: list[str], output_dir: str | Path, log_dir: str | Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would see, for in-process runs (tests, benchmarks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(CONF_DIR.parent)
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(log_dir or output_dir.parent / "logs")
    return cfg


def build(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a TunelabError raised inside surfaces as itself, not wrapped."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, TunelabError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def tuning_lr(scratch: float, pretrained: float, *sources: Any) -> float:
    """optimizer.lr's default: the tuning method's rate for a model that starts from weights (any of `sources`
    set: model.pretrained, model.pretrained_file) or from scratch; a rate for one would ruin the other."""
    return float(pretrained if any(s not in (None, "") for s in sources) else scratch)


def problem_mode(monitor: str) -> str:
    """Which way a monitored metric improves: errors and losses go down, scores go up."""
    return "min" if str(monitor) in ("mae", "rmse", "loss") else "max"


def distill_student() -> str:
    """task.student's default: `model` when the command line chose the student (`model=...`, `model.x=...`), so
    what a user asked for is what trains; else `auto` (a pretrained teacher's smaller copy, `tasks/distill.py`)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        given = HydraConfig.get().overrides.task
    except ValueError:  # composed without Hydra's run context
        return "auto"
    return "model" if any(o.lstrip("+~").split("=")[0].split(".")[0] == "model" for o in given) else "auto"


def register_resolvers() -> None:
    resolvers = (("run_dir", runs.run_dir), ("output_subdir", runs.output_subdir), ("embedded", embedded),
                 ("cwd", os.getcwd), ("tuning_lr", tuning_lr), ("problem_mode", problem_mode),
                 ("problem_mode_direction", lambda m: "minimize" if problem_mode(m) == "min" else "maximize"),
                 ("distill_student", distill_student))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


def _accepted(target: Any) -> tuple[set[str], bool]:
    """Parameter names a callable accepts, and whether it takes **kwargs."""
    fn = target.__init__ if inspect.isclass(target) else target
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - {"self"}, any(p.kind == p.VAR_KEYWORD for p in params)


def validate(node: Any, path: str = "") -> None:
    """Walk the config and check the keys of every `_target_` node against its callable."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            validate(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        try:
            target = get_object(node._target_)
        except Exception as e:
            raise TunelabError(f"{path}._target_: cannot import {node._target_!r} ({e})") from None
        names, var_kw = _accepted(target)
        if not var_kw:
            for key in node:
                if isinstance(key, str) and not key.startswith("_") and key not in names:
                    close = difflib.get_close_matches(key, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise TunelabError(
                        f"{path}.{key}: unknown key for {node._target_}{hint} (valid keys: {sorted(names)})"
                    )
    for key in node:
        if path == "" and key == "hydra":
            continue
        if not OmegaConf.is_missing(node, key):
            validate(node[key], f"{path}.{key}".lstrip("."))


def check_required(cfg: DictConfig) -> None:
    """Required values (`???`) must be given on the command line or in an experiment."""
    missing = sorted(  # missing_keys gives full paths (`data.train_file`); the hydra node is not the user's
        sub for key in cfg if key != "hydra" and isinstance(cfg[key], DictConfig)
        for sub in OmegaConf.missing_keys(cfg[key])
    )
    if missing:
        raise TunelabError(f"missing required config value(s): {', '.join(missing)} (give them as key=value)")
