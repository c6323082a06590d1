"""Recovery after pruning: a short `task=finetune`, or `task=distill` with the unpruned source as teacher.

The run is composed from the training config like any `python train.py` run (`tunelab.config.compose_config`)
and built by `tunelab.train.assemble`; only the model differs: `student` hands the task the pruned
network, loaded from its variant folder through the artifacts loader. Logs go to `<run>/recover/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.errors import TunelabError


def student(folder: str, head: str = "classifier", labels: list[str] | None = None, tokenizer: Any = None,
            problem_type: str | None = None) -> Any:
    """The model a recovery task trains: the pruned network saved in `folder` (labels must agree)."""
    from tunelab import artifacts

    loaded = artifacts.load(folder, role="recover")
    if labels is not None and loaded.labels is not None and list(labels) != list(loaded.labels):
        raise TunelabError(f"recover: the data's labels {list(labels)} differ from the model's {loaded.labels}")
    net = loaded.net.train()
    net.fresh_head = False  # its head is trained, and outputs what the problem answers from
    return net


def recover(options: DictConfig, folder: Path, source: Any, datamodule: Any, data_node: dict, out: Path,
            log_dir: str, seed: int) -> Any:
    """Train the pruned model in `folder` for `options.epochs` and return it (eval mode)."""
    import lightning as L

    from tunelab.config import compose_config, validate
    from tunelab.train import assemble

    overrides = [f"task={options.method}", "callbacks=none", f"trainer.max_epochs={options.epochs}",
                 "trainer.enable_progress_bar=false", f"optimizer.lr={options.lr}", f"seed={seed}",
                 f"trainer.limit_train_batches={'null' if options.limit_batches is None else options.limit_batches}",
                 f"trainer.limit_val_batches={'null' if options.limit_val_batches is None else options.limit_val_batches}"]
    if options.method == "distill":
        overrides += [f"teacher.path={source.source}", "task.student=model", f"task.alpha={options.alpha}",
                      f"task.temperature={options.temperature}"]
    cfg = compose_config(overrides, out, log_dir)
    with open_dict(cfg):
        cfg.data = OmegaConf.create(data_node)
        cfg.model = OmegaConf.create({"_target_": f"{__name__}.student", "_partial_": True, "folder": str(folder)})
    validate(cfg)
    L.seed_everything(seed, workers=True)
    built = assemble(cfg, datamodule, enable_checkpointing=False, enable_model_summary=False)
    built.trainer.fit(built.task, datamodule=datamodule)
    return built.task.export_model().eval()
