"""What every task shares: optimizer and schedule from config, how much of the backbone trains (`tuning`).

A task gets `optimizer` (a partial taking `params`) and `scheduler` (a partial taking `optimizer`
and `num_training_steps`) from Hydra; the number of steps is only known once the Trainer exists,
so schedules are built in `configure_optimizers` from `trainer.estimated_stepping_batches`. `tuning` (the
`tuning=` group, `tunelab.models.tuning`) says which backbone parameters train and at which rates; a task
applies it to its backbone with `tune` and gets its parameter groups from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torchmetrics import MaxMetric, Metric, MinMetric

from tunelab.models.tuning import Tuning
from tunelab.problems import Problem

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "bn.weight", "ln")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, name: str) -> list[dict]:
    """Split trainable parameters into decayed and not-decayed (biases, norms: decay would shrink them)."""
    decay, no_decay = [], []
    for param_name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or any(k in param_name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "lr": lr, "name": name},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}_no_decay"}]
    return [g for g in groups if g["params"]]


def warmup_schedule(optimizer: torch.optim.Optimizer, num_training_steps: int, name: str = "cosine",
                    warmup_ratio: float = 0.06) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then `name` decay (cosine, linear, constant_with_warmup...), via transformers."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=int(warmup_ratio * num_training_steps),
                         num_training_steps=num_training_steps)


class Task(LightningModule):
    """Base LightningModule: subclasses define `trainable_modules()` and their steps."""

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.tuning = tuning or Tuning()
        self.tuned_attr: str | None = None  # the attribute holding the backbone `tune` applied the method to

    def tune(self, attr: str = "model") -> None:
        """Apply the tuning method to the backbone in `self.<attr>` (which parameters train; LoRA adds adapters)."""
        self.tuning.apply(getattr(self, attr))
        self.tuned_attr = attr

    @property
    def tuned(self) -> nn.Module | None:
        return getattr(self, self.tuned_attr) if self.tuned_attr else None

    def plain(self, model: nn.Module) -> nn.Module:
        """`model` as its ecosystem's plain network, for `model/`: with LoRA, a copy with the adapters merged in."""
        if self.tuning.method != "lora":
            return model
        from tunelab.models.lora import merged

        return merged(model)

    def export_adapter(self, base: str | None) -> Any:
        """The LoRA adapters (and the head) as a `peft.PeftModel` over `base`, for peft's own format; None
        without LoRA."""
        if self.tuning.method != "lora" or self.tuned is None:
            return None
        from tunelab.models.lora import peft_model

        return peft_model(self.tuned, base)

    def on_train_epoch_start(self) -> None:
        if self.tuned is not None:  # head-only: the frozen backbone keeps its statistics, runs without dropout
            self.tuning.train_modes(self.tuned)

    @classmethod
    def data_needs(cls, options: Any) -> set[str]:
        """What this task needs its DataModule configured for, read from the task's config before the DataModule
        is set up (`train.configure_data` applies it): `"index"` adds each sample's position to its batch."""
        return set()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Metric accumulators and trackers (`val/acc_best`...) travel with the checkpoint: torchmetrics keeps
        them out of `state_dict`, and a resumed run must go on from the same best and the same partial epoch."""
        checkpoint["metric_states"] = {
            name: {"state": dict(m.metric_state), "updates": m._update_count}
            for name, m in self.named_modules() if isinstance(m, Metric)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("metric_states", {})
        for name, m in self.named_modules():
            if isinstance(m, Metric) and name in saved:
                for key, value in saved[name]["state"].items():
                    on = m.device
                    setattr(m, key, [v.to(on) for v in value] if isinstance(value, list) else value.to(on))
                m._update_count, m._computed = saved[name]["updates"], None

    def lr_groups(self) -> list[tuple[str, nn.Module, float, Callable[[str], bool]]]:
        """(group name, module, lr multiplier, keep(param name)): the tuned backbone's groups (`Tuning.lr_groups`);
        override to add the task's own modules."""
        if self.tuned is None:
            return [("all", self, 1.0, lambda _: True)]
        return self.tuning.lr_groups(self.tuned)

    def configure_optimizers(self) -> Any:
        base_lr = self.optimizer_factory.keywords["lr"]  # a Hydra partial: optimizer.lr is required
        groups: list[dict] = []
        for name, module, mult, keep in self.lr_groups():
            named = ((n, p) for n, p in module.named_parameters() if keep(n))
            groups += param_groups(named, base_lr * mult, name)
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer,
                                           num_training_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Scores(nn.Module):
    """A problem's metrics for each split (`<split>/<name>`), the best monitored validation value so far
    (`val/<monitor>_best`, what sweeps optimize) and the validation figure (confusion matrix, scatter...)."""

    def __init__(self, problem: Problem, splits: tuple[str, ...] = ("train", "val", "test")) -> None:
        super().__init__()
        self.problem = problem
        # keyed `train_`...: a ModuleDict key may not shadow a Module attribute (`train`)
        self.splits = nn.ModuleDict({f"{split}_": problem.metrics().clone(prefix=f"{split}/") for split in splits})
        self.best = MaxMetric() if problem.mode == "max" else MinMetric()
        self.figure_name, self.figure = problem.diagnostic() or ("", None)

    def update(self, split: str, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        preds, target = self.problem.metric_inputs(outputs, targets)
        if len(target):
            self.splits[f"{split}_"].update(preds, target)
            if split == "val" and self.figure is not None:
                self.figure.update(preds, target)

    def compute(self, split: str) -> dict[str, torch.Tensor]:
        """The split's metrics over the epoch (then reset); nothing when no labelled row was seen."""
        metrics = self.splits[f"{split}_"]
        seen = any(m.update_count for m in metrics.values())
        values = metrics.compute() if seen else {}
        metrics.reset()
        return values

    def log_validation(self, module: LightningModule, values: dict[str, torch.Tensor]) -> None:
        """Log the best monitored value so far and draw the figure (TensorBoard only)."""
        monitored = values.get(f"val/{self.problem.monitor}")
        if monitored is not None:
            self.best(monitored)
            module.log(f"val/{self.problem.monitor}_best", self.best.compute(), sync_dist=True)
        if self.figure is not None:
            log_figure(module, self.figure, f"val/{self.figure_name}", self.problem.outputs)


def log_figure(module: LightningModule, metric: Metric, tag: str, labels: list[str] | None = None) -> None:
    """Draw a metric's `plot` as an image in TensorBoard (other loggers are skipped), then reset it."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in module.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers or module.trainer.sanity_checking or not metric.update_count:
        metric.reset()
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = metric.plot(labels=labels)
    side = max(4, 0.5 * len(labels or []) + 2)
    fig.set_size_inches(side, side)
    for logger in loggers:
        logger.experiment.add_figure(tag, fig, global_step=module.global_step)
    plt.close(fig)
    metric.reset()
