"""Masked-language-model pretraining, from scratch or continuing a checkpoint (domain-adaptive pretraining).

The collator picks the tokens to predict (`mlm_labels`); this task runs the encoder and the model's
own MLM head on those positions only (`sparse_head`), so the batch × length × vocabulary logits the
reference recipe builds are never computed. In training the head's vocabulary projection is fused with
the cross-entropy, so not even the predicted rows' logits are kept. Validation reports loss, masked-token
accuracy and perplexity, and shows a few masked sentences with the model's top-3 guesses in TensorBoard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningDataModule
from torch import nn
from torchmetrics import MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from tunelab.contracts import IGNORE_INDEX, INPUT_IDS, MLM_LABELS, MLM_POSITIONS, at_predicted, masked_targets
from tunelab.errors import TunelabError
from tunelab.models.linear_cross_entropy import linear_cross_entropy
from tunelab.models.tuning import Tuning
from tunelab.tasks.base import Task

TOP_K = 3
SHOWN_TOKENS = 64


class MLMTask(Task):
    """Cross-entropy on the masked tokens, with accuracy and perplexity for every split."""

    def __init__(
        self,
        model: Callable[..., nn.Module],
        datamodule: LightningDataModule,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        sparse_head: bool = True,
        num_examples: int = 3,
        tuning: Tuning | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, tuning)
        self.tokenizer = getattr(datamodule, "tokenizer", None)
        if self.tokenizer is None or getattr(datamodule, "masking", None) is None:
            raise TunelabError(
                "task=mlm needs unlabelled text with a masking collator (expected a text data config with "
                "data.label_field=null and data.collator set, as conf/task/mlm.yaml gives)"
            )
        self.model = model(head="masked_lm", tokenizer=self.tokenizer)
        self.sparse_head = self.model.sparse_mlm = sparse_head
        if sparse_head:
            _ = self.model.mlm_head  # fail now, not at the first step, if the head cannot be found
        self.tune()
        self.num_examples = num_examples
        vocab = int(self.model.net.get_output_embeddings().weight.shape[0])
        # keyed "<split>_acc": a ModuleDict key may not shadow nn.Module.train
        self.acc = nn.ModuleDict({f"{s}_acc": MulticlassAccuracy(vocab, average="micro", ignore_index=IGNORE_INDEX)
                                  for s in ("train", "val", "test")})
        self.nll = nn.ModuleDict({f"{s}_nll": MeanMetric() for s in ("val", "test")})
        self.val_loss_best = MinMetric()
        self._examples: dict[str, torch.Tensor] | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (predicted positions × vocabulary) and their target ids."""
        return self._predicted_logits(self.model(batch).logits, batch), masked_targets(batch)

    def _predicted_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sparse head's logits as they are; of the full batch × length × vocabulary logits, the predicted rows."""
        return logits if self.sparse_head else at_predicted(logits, batch)

    def _step(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Loss, what accuracy scores (logits, or the top token ids of the fused loss) and the number of
        predicted tokens. Training fuses the head's vocabulary projection with the cross-entropy where the
        model allows (`linear_cross_entropy`: no logits kept); validation keeps the logits for the top-3 panel."""
        out = self.model(batch, project=not (split == "train" and self.sparse_head))
        targets = masked_targets(batch)
        n = int((targets != IGNORE_INDEX).sum())
        if out.logits is None:
            projection = self.model.vocab_projection
            loss, scores = linear_cross_entropy(out.features, projection.weight, projection.bias, targets)
        else:
            scores = self._predicted_logits(out.logits, batch)
            # a batch of a few short documents can draw no mask: a zero loss, not NaN
            loss = F.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX) if n else scores.sum() * 0.0
        if n:
            self.acc[f"{split}_acc"].update(scores, targets)
        return loss, scores, n

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, n = self._step(batch, "train")
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/acc", self.acc["train_acc"], on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, n = self._step(batch, "val")
        if n:
            self.nll["val_nll"].update(loss, weight=n)
        if batch_idx == 0:
            self._keep_examples(batch, logits)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, _, n = self._step(batch, "test")
        if n:
            self.nll["test_nll"].update(loss, weight=n)

    def _log_split(self, split: str) -> torch.Tensor:
        """Token-weighted loss over the whole split, its perplexity and the masked-token accuracy."""
        loss = self.nll[f"{split}_nll"].compute()
        accuracy = self.acc[f"{split}_acc"].compute()
        self.log_dict({f"{split}/loss": loss, f"{split}/perplexity": loss.exp(), f"{split}/acc": accuracy},
                      prog_bar=split == "val", sync_dist=True)
        self.nll[f"{split}_nll"].reset()
        self.acc[f"{split}_acc"].reset()
        return loss

    def on_train_start(self) -> None:
        self.val_loss_best.reset()  # forget the sanity-check batches

    def on_validation_epoch_end(self) -> None:
        loss = self._log_split("val")
        self.val_loss_best(loss)
        self.log("val/loss_best", self.val_loss_best.compute(), sync_dist=True)
        self._log_examples()

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    # ----------------------------------------------------------------- TensorBoard text panel
    def _keep_examples(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        """The first rows of the first validation batch, and the top-3 guesses at their masked positions."""
        k = min(self.num_examples, len(batch[INPUT_IDS]))
        if k == 0:
            return
        labels = batch[MLM_LABELS]
        if MLM_POSITIONS in batch:  # logits follow the position lists; keep the real predictions only
            logits = logits[masked_targets(batch) != IGNORE_INDEX]
        rows = int((labels[:k] != IGNORE_INDEX).sum())
        top = logits[:rows].float().softmax(-1).topk(TOP_K, dim=-1)
        self._examples = {"input_ids": batch[INPUT_IDS][:k].cpu(), "labels": labels[:k].cpu(),
                          "top_ids": top.indices.cpu(), "top_p": top.values.cpu()}

    def _log_examples(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        examples, self._examples = self._examples, None
        loggers = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if examples is None or not loggers or self.trainer.sanity_checking:
            return
        text = examples_markdown(self.tokenizer, **examples)
        for logger in loggers:
            logger.experiment.add_text("val/predictions", text, global_step=self.global_step)

    def export_model(self) -> nn.Module:
        """The masked-LM network `model/` holds: with its tokenizer it loads in `pipeline("fill-mask")`."""
        return self.plain(self.model)


def examples_markdown(tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor, top_ids: torch.Tensor,
                      top_p: torch.Tensor) -> str:
    """Each block's first tokens, predicted positions in bold, then a table: position, true token, top-3 guesses."""
    parts, row = [], 0
    for i, (ids, lab) in enumerate(zip(input_ids.tolist(), labels.tolist(), strict=True)):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        shown = [f"**{t}**" if lab[j] != IGNORE_INDEX else t for j, t in enumerate(tokens[:SHOWN_TOKENS])]
        lines = [f"Example {i + 1} (predicted positions in bold): " + " ".join(shown), "",
                 "| position | input | true | top-3 predictions |", "| --- | --- | --- | --- |"]
        for j, target in enumerate(lab):
            if target == IGNORE_INDEX:
                continue
            row += 1
            if j >= SHOWN_TOKENS:
                continue
            guesses = ", ".join(f"{tokenizer.convert_ids_to_tokens(int(t))} ({p:.2f})"
                                for t, p in zip(top_ids[row - 1].tolist(), top_p[row - 1].tolist(), strict=True))
            lines.append(f"| {j} | {tokens[j]} | {tokenizer.convert_ids_to_tokens(target)} | {guesses} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)

