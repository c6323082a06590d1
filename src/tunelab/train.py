"""One run, any task: validate -> instantiate -> fit -> test -> write artifacts -> return the metric.

This is the only place that instantiates a whole run from config. Read it top to bottom.

Public (`__all__`), for the code that trains outside `python train.py`: `run(cfg)` is the whole run;
`assemble(cfg)` builds one (`Assembled`: DataModule, task, Trainer, loggers) without fitting it, for
compression's recovery runs (`tunelab.compress.recover`) and the benchmarks; `check_config`, `prepared_data`
and `configure_data` are its first steps. The rest is this module's own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from lightning.fabric.utilities.logger import _flatten_dict
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab import artifacts, runs, runtime
from tunelab.artifacts import adapters
from tunelab.config import build, check_required, validate
from tunelab.errors import TunelabError
from tunelab.run_checks import check_values
from tunelab.runs.checkpoints import AtomicCheckpointIO, ResumeState, saved_config, scalars

__all__ = ["Assembled", "assemble", "check_config", "configure_data", "prepared_data", "run"]

log = logging.getLogger("tunelab")


def run(cfg: DictConfig) -> float | None:
    """Train and test one configuration; return `cfg.optimized_metric` for sweeps."""
    runtime.configure(cfg)  # the process-wide settings this run makes (cfg.runtime)
    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    primary = runs.is_primary_process()
    resumed = runs.claim(out, cfg.get("ckpt_path")) if primary else False
    try:
        return _run(cfg, out, resumed, primary)
    finally:
        runs.release(out)


def _run(cfg: DictConfig, out: Path, resumed: bool, primary: bool) -> float | None:
    if not cfg.get("train", True) and cfg.get("ckpt_path") not in (None, "last"):
        adopt_checkpoint_config(cfg, str(cfg.ckpt_path))
    L.seed_everything(cfg.seed, workers=True)
    built = assemble(cfg)
    datamodule, task, trainer, resume_state = built.datamodule, built.task, built.trainer, built.resume_state
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), out)
    if ckpt_path:
        check_checkpoint(ckpt_path, task, cfg, resumed)
    log_hparams(built.loggers, cfg)
    trainable = log_trainable(built.loggers, task)

    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if trainer.global_step == 0:
            raise TunelabError(
                f"no training step ran: no training batch reached any of the {trainer.world_size} process(es) "
                "(expected at least one batch; check trainer.limit_train_batches, data.batch_size and the size "
                "of the train split)"
            )
    # a run resumed after its last training step logs nothing new in fit: its earlier metrics come back
    metrics = {**resume_state.metrics, **scalars(trainer.callback_metrics), **trainable}
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        # train=false ckpt_path=<file>: evaluate that checkpoint
        trainer.test(task, datamodule=datamodule, ckpt_path=best or ckpt_path or None, weights_only=True)
        metrics.update(scalars(trainer.callback_metrics))

    export_task = gather_for_export(cfg, task, datamodule, trainer)
    # an evaluation-only run (train=false) has no validation metric to return
    value = metric_value(metrics, cfg.get("optimized_metric") if cfg.get("train", True) else None)
    if trainer.is_global_zero:
        write_artifacts(out, cfg, export_task, datamodule, metrics, trainer)
        if primary:
            runs.finish(out)
            runs.point_latest(out, Path(cfg.paths.log_dir) / cfg.task_name / "latest")
            log.info("run finished: %s", out)
    return value


def check_config(cfg: DictConfig) -> None:
    """Every key and value of a run's config, before any work: required values, keys, value domains."""
    check_required(cfg)
    validate(cfg)
    check_values(cfg)


def prepared_data(cfg: DictConfig) -> Any:
    """The run's DataModule, its data prepared and set up for fitting."""
    datamodule = build(cfg.data)
    check_modalities(cfg, datamodule)
    configure_data(cfg, datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def configure_data(cfg: DictConfig, datamodule: Any) -> None:
    """Give the DataModule what the task declares it needs (`Task.data_needs`) and the run's problem (how its
    targets are read); tasks never set either themselves."""
    task_class = get_object(cfg.task._target_)
    needs = task_class.data_needs(cfg.task) if hasattr(task_class, "data_needs") else set()
    if hasattr(datamodule, "with_index"):
        datamodule.with_index = "index" in needs
    if cfg.get("problem") is not None and hasattr(datamodule, "use_problem"):
        datamodule.use_problem(build(cfg.problem))


@dataclass
class Assembled:
    """Everything one run is made of, built from its config."""

    datamodule: Any
    task: L.LightningModule
    trainer: L.Trainer
    loggers: list
    resume_state: ResumeState


def assemble(cfg: DictConfig, datamodule: Any | None = None, callbacks: list | None = None,
             **trainer_overrides: Any) -> Assembled:
    """Build a whole run from its config: the DataModule (prepared and set up), the task, the callbacks and
    loggers the config names (plus `callbacks`), and the Trainer (with `trainer_overrides`). `run()` and
    every benchmark build their runs here; pass `datamodule` to reuse one that is set up already."""
    if datamodule is None:
        datamodule = prepared_data(cfg)
    else:
        configure_data(cfg, datamodule)  # a reused DataModule, for this task's needs
    task = build(cfg.task, datamodule=datamodule)
    if cfg.get("compile"):
        task.model.compile()  # in place: checkpoint keys and the exported model stay the same
    resume_state = ResumeState(resolved(cfg))
    extra = [*(callbacks or []), resume_state]
    every = [build(c) for c in cfg.get("callbacks", {}).values() if c is not None] + extra
    loggers = [build(c) for c in cfg.get("logger", {}).values() if c is not None]
    if not loggers:  # logger=none: drop the callbacks that only exist to log
        every = [c for c in every if not isinstance(c, LearningRateMonitor)]
    if not trainer_overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar", True)):
        every = [c for c in every if not isinstance(c, ProgressBar)]  # the switch alone turns the bar off
    if "precision" not in trainer_overrides and (precision := cpu_precision(cfg.trainer)) is not None:
        trainer_overrides["precision"] = precision
    trainer: L.Trainer = build(cfg.trainer, callbacks=every, logger=loggers or False,
                               plugins=checkpoint_plugins(cfg), **trainer_overrides)
    return Assembled(datamodule, task, trainer, loggers, resume_state)


def cpu_precision(trainer: DictConfig) -> str | None:
    """`32-true` in place of a bf16 precision on a CPU that oneDNN runs bfloat16 on only by emulation (no AVX-512):
    there autocast emulates every bf16 product and a step takes tens of times longer than in fp32."""
    precision, accelerator = str(trainer.get("precision")), trainer.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not (on_cpu and precision.startswith("bf16")) or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    log.warning("trainer.precision=%s: this CPU (%s) has no fast bfloat16, so the run uses 32-true, which is "
                "faster here; bf16 runs at speed on CPUs with AVX-512 (best with its BF16 extension or AMX) and on GPUs",
                precision, torch.backends.cpu.get_cpu_capability())
    return "32-true"


def checkpoint_plugins(cfg: DictConfig) -> list:
    """Atomic checkpoint writes, where the strategy uses Lightning's own checkpoint IO."""
    strategy = cfg.trainer.get("strategy")
    own_io = isinstance(strategy, str) and strategy in ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true")
    return [AtomicCheckpointIO()] if own_io else []


def check_modalities(cfg: DictConfig, datamodule: Any) -> None:
    """A text model on image data (or the reverse) is a config mistake; say which override fixes it."""
    model_cls = build(cfg.model).func if cfg.get("model") else None
    want, have = getattr(model_cls, "modality", None), getattr(datamodule, "modality", None)
    if want and have and want != have:
        choices = HydraConfig.get().runtime.choices
        raise TunelabError(
            f"model={choices.get('model')} is a {want} model but data={choices.get('data')} is {have} data "
            f"(pick a {have} model, e.g. model={'timm' if have == 'image' else 'bert_tiny'})"
        )


def resolve_checkpoint(ckpt_path: str | None, out: Path) -> str | None:
    """`last` means this run folder's last.ckpt (`runs.run_dir` already picked the run to continue)."""
    if not ckpt_path:
        return None
    path = out / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if ckpt_path == "last" and not path.is_file():
        return None  # the newest run was killed before its first checkpoint: this is a new run
    if not path.is_file():
        raise TunelabError(f"ckpt_path={ckpt_path}: file not found ({path}; expected a Lightning .ckpt file)")
    return str(path)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The run's config as plain values (without Hydra's own node): what checkpoints and cards record."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}


def adopt_checkpoint_config(cfg: DictConfig, path: str) -> None:
    """`train=false ckpt_path=<file>`: evaluate the checkpoint as what it is. Its model and task come from its
    own config unless given on the command line; a model config given there must be the checkpoint's."""
    file = Path(path).expanduser()
    if not file.is_file():
        return  # resolve_checkpoint names the missing file
    try:
        saved = saved_config(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as e:
        raise TunelabError(f"ckpt_path={path}: not a readable Lightning checkpoint ({e})") from None
    if not saved or "model" not in saved:
        return  # a checkpoint from elsewhere: the composed config has to fit it
    given = [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]
    if any(key == "model" or key.startswith("model.") for key in given):
        mine = OmegaConf.to_container(cfg.model, resolve=True)
        if mine != saved["model"]:
            differ = sorted(k for k in set(mine) | set(saved["model"]) if mine.get(k) != saved["model"].get(k))
            detail = ", ".join(f"model.{k}={mine.get(k)!r} here vs {saved['model'].get(k)!r} in the checkpoint"
                               for k in differ[:4])
            raise TunelabError(f"ckpt_path={path}: the checkpoint was trained with another model config ({detail}); "
                               "drop the model overrides to evaluate it as it was trained")
        return
    with open_dict(cfg):
        cfg.model = saved["model"]
        cfg.task = saved["task"]
        cfg.task_name = saved.get("task_name", cfg.task_name)


def check_checkpoint(path: str, task: L.LightningModule, cfg: DictConfig, resumed: bool) -> None:
    """Before fitting: the checkpoint's tensors fit this task, and a new run from it has training left."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
    except Exception as e:
        raise TunelabError(f"ckpt_path={path}: not a readable Lightning checkpoint ({e})") from None
    own = task.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if keys
        )
        raise TunelabError(f"ckpt_path={path}: checkpoint does not fit this task/model ({detail})")
    if cfg.get("train", True) and not resumed:
        check_training_left(path, checkpoint, cfg)


def check_training_left(path: str, checkpoint: dict, cfg: DictConfig) -> None:
    """A new run from a checkpoint that already reached this run's budget would train nothing."""
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    epochs_done = (checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
                   .get("current", {}).get("processed", 0))
    steps_done = checkpoint.get("global_step", 0)
    by_steps = max_steps is not None and max_steps > 0
    if (steps_done >= max_steps) if by_steps else (max_epochs is not None and epochs_done >= max_epochs):
        budget = f"trainer.max_steps={max_steps}" if by_steps else f"trainer.max_epochs={max_epochs}"
        more = f"trainer.max_steps={steps_done * 2}" if by_steps else f"trainer.max_epochs={epochs_done + 5}"
        raise TunelabError(
            f"ckpt_path={path}: the checkpoint has trained {epochs_done} epoch(s), {steps_done} step(s), which "
            f"is already {budget}; nothing is left to train. To train longer, raise the budget (e.g. {more}: a "
            "new run continues from it); to evaluate it, add train=false"
        )


def log_hparams(loggers: list, cfg: DictConfig) -> None:
    """The whole config as hyper-parameters, with the final metrics in TensorBoard's HPARAMS row."""
    params = {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
              for key, value in cfg.items() if key not in ("paths", "hydra")}
    for logger in loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, TensorBoardLogger) and cfg.get("hparams_metrics"):
            register_hparams_metrics(logger, params, list(cfg.hparams_metrics))


@rank_zero_only
def register_hparams_metrics(logger: TensorBoardLogger, params: dict, metrics: list[str]) -> None:
    """Name the HPARAMS columns without writing placeholder scalars: those would start every curve at NaN."""
    from torch.utils.tensorboard.summary import hparams

    flat = logger._sanitize_params(_flatten_dict(params))  # the same flattening log_hyperparams applies
    writer = logger.experiment._get_file_writer()
    for summary in hparams(flat, dict.fromkeys(metrics, 0.0)):
        writer.add_summary(summary)


def log_trainable(loggers: list, task: L.LightningModule) -> dict[str, float]:
    """How many parameters the tuning method trains (count and percent): console, loggers and metrics.json."""
    from tunelab.models.tuning import trainable_summary

    summary = trainable_summary(task)
    log.info("trainable parameters: %d of %d (%.3f%%)", summary["params/trainable"], summary["params/total"],
             summary["params/trainable_pct"])
    for logger in loggers:
        logger.log_metrics(summary, step=0)
    return summary


def metric_value(metrics: dict, name: str | None) -> float | None:
    if not name:
        return None
    if name not in metrics:
        raise TunelabError(f"optimized_metric={name!r} was not logged (logged: {sorted(metrics)})")
    return float(metrics[name])


def gather_for_export(cfg: DictConfig, task: L.LightningModule, datamodule: Any, trainer: L.Trainer) -> Any:
    """Under FSDP each rank holds a shard: gather full weights (a collective, all ranks) into a fresh task."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return task
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
    if not trainer.is_global_zero:
        return task
    fresh = build(cfg.task, datamodule=datamodule)
    fresh.load_state_dict({k.removeprefix("_forward_module."): v for k, v in state.items()})
    return fresh


def write_artifacts(out: Path, cfg: DictConfig, task: Any, datamodule: Any, metrics: dict,
                    trainer: L.Trainer) -> None:
    """metrics.json and model/ (through `artifacts`), each replaced whole (never left half-written)."""
    ckpt = trainer.checkpoint_callback
    values_file = {"metrics": metrics, "best_checkpoint": ckpt.best_model_path if ckpt else None,
                   "task": cfg.task_name}
    runs.write_atomic(out / "metrics.json", json.dumps(values_file, indent=2, sort_keys=True))
    if not hasattr(task, "export_model"):
        return
    tmp = out / f".model.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pair = getattr(datamodule, "source", None)  # a domain pair: preprocessing is the source's (and the target's)
    data = pair if pair is not None else datamodule
    card = run_card(out, cfg, task, metrics)
    artifacts.save(tmp, task.export_model(), labels=getattr(task, "labels", None),
                   tokenizer=getattr(task, "tokenizer", None) or getattr(data, "tokenizer", None),
                   data_config=getattr(data, "data_config", None), max_length=getattr(data, "max_length", None),
                   packed=bool(getattr(data, "pack", False)),
                   card=card, problem=getattr(task, "problem", None))
    adapters.save_for(task, tmp / "adapter", card)  # LoRA: the adapter alone too, in peft's format
    artifacts.write_atomic_dir(tmp, out / "model")


def run_card(out: Path, cfg: DictConfig, task: Any, metrics: dict) -> dict:
    """What the card says about the run: task, metrics, parents (with weight hashes), the resolved config."""
    model = cfg.get("model") or {}
    teacher = getattr(task, "teacher", None)
    parents = [artifacts.parent("pretrained", model.get("pretrained") or model.get("pretrained_file")),
               artifacts.parent("teacher", getattr(teacher, "source", None))]
    return {"task": cfg.task_name, "path": str(out / "model"), "metrics": metrics,
            "parents": [p for p in parents if p], "run": {"folder": str(out), "config": resolved(cfg)}}
