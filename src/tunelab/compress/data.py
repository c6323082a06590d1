"""The data a compression run measures on: the source's own splits, read with its own tokenizer.

A `model/` folder this project wrote names the data it was trained on (its card's resolved run config);
a plain Hugging Face or timm folder has no card, so `data=` must say it. Validation batches rank heads
and neurons, training batches calibrate static int8 and feed recovery, the test split gives accuracy and
the agreement of every variant with the fp32 model's predictions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from tunelab.contracts import LABELS
from tunelab.errors import TunelabError


def data_node(given: DictConfig | None, source: Any) -> dict[str, Any]:
    """The DataModule config: `data=` if given, else the one in the source's card; text reads with the
    source's own tokenizer."""
    node = OmegaConf.to_container(given, resolve=True) if given else (
        (source.card.get("run") or {}).get("config") or {}).get("data")
    if not node or "_target_" not in node:
        raise TunelabError(f"source={source.source}: no tunelab card names the data it was trained on (expected a "
                           "model/ folder written by train.py, or data=<its data>, e.g. data=reviews or "
                           "data=text_files data.train_file=... )")
    node = dict(node)
    if source.modality == "text":
        node["tokenizer"] = str(source.source)
    node.pop("unlabelled_file", None)
    return node


def prepared(node: dict[str, Any], source: Any) -> Any:
    """The DataModule, set up; its labels must be the source's, in the same order."""
    from tunelab.config import build

    datamodule = build(OmegaConf.create(node))
    if hasattr(datamodule, "use_problem") and source.problem is not None:  # targets read as the source's
        datamodule.use_problem(type(source.problem).from_card(source.problem.card(), source.problem.outputs))
    datamodule.prepare_data()
    datamodule.setup("fit")
    labels = getattr(datamodule, "labels", None)
    if not labels:
        raise TunelabError(f"data: {node.get('_target_')} gives no labels (expected labelled data to measure "
                           "accuracy on)")
    if source.labels and list(source.labels) != list(labels):
        raise TunelabError(f"data: labels {list(labels)} differ from the source's {list(source.labels)} (expected "
                           "the data the source was trained on)")
    return datamodule


def loader(datamodule: Any, split: str, batch_size: int | None = None) -> DataLoader:
    """An unshuffled loader over one split (`batch_size`: another batch size than the DataModule's)."""
    if split not in datamodule.datasets:
        raise TunelabError(f"data: no {split} split (expected train, val and test splits)")
    return DataLoader(datamodule.datasets[split], batch_size=batch_size or datamodule.batch_size, shuffle=False,
                      collate_fn=datamodule.collate_fn())


def batches(datamodule: Any, split: str, limit: int | None, batch_size: int | None = None) -> Iterator[dict]:
    for i, batch in enumerate(loader(datamodule, split, batch_size)):
        if limit is not None and i >= limit:
            return
        yield dict(batch)


def first_batch(datamodule: Any, size: int) -> dict[str, torch.Tensor]:
    """The first `size` test records as one batch: what latency is measured on (the same for every variant)."""
    return next(batches(datamodule, "test", 1, size))


def predict(net: Any, datamodule: Any, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's outputs and the encoded targets over the test split (`limit` batches at most)."""
    outputs, labels = [], []
    with torch.inference_mode():
        for batch in batches(datamodule, "test", limit):
            outputs.append(net(batch).logits.float())
            labels.append(batch[LABELS])
    return torch.cat(outputs), torch.cat(labels)


def score(problem: Any, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The problem's monitored metric of `outputs` against `targets`."""
    metrics = problem.metrics()
    metrics.update(*problem.metric_inputs(outputs, targets))
    return float(metrics.compute()[problem.monitor])
