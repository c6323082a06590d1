"""An Artifact turned into answers for batches of raw inputs (texts or RGB images), as its problem gives them.

Preprocessing is what the artifact's card declares (the tokenizer and `max_length` it was trained with, or
timm's eval transform for its data config), so a prediction sees exactly what the training run's test step
saw. A batch of texts is run as groups of similar length (`length_groups`), each padded only to its own longest
text: padding to the batch's longest wastes a third of the work on the embedded reviews at 16 texts. The
network runs on a backend: `torch` (the artifact's own network) or `onnxruntime` (an ONNX artifact's
session); both take the same dict batch of numpy arrays and return logits, so every caller (the prediction
run, the server, the benchmarks) is backend-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tunelab.artifacts import Artifact, kinds
from tunelab.contracts import ATTENTION_MASK, INPUT_IDS, PIXEL_VALUES
from tunelab.errors import TunelabError

BACKENDS = ("auto", "torch", "onnxruntime")
Backend = Callable[[dict[str, np.ndarray]], np.ndarray]  # batch -> logits
# What one more network call costs, in padded tokens: a group is split off when it saves more padding than this.
CALL_COST_TOKENS = 16
MAX_GROUP = 64  # texts in one length group at most


def is_onnx(artifact: Artifact) -> bool:
    """Whether the artifact holds an ONNX graph (`tunelab.artifacts.onnx`), which onnxruntime runs."""
    return artifact.kind == getattr(kinds, "ONNX", "onnx-classifier")


def backend(net: Any, onnx: bool, threads: int | None) -> Backend:
    """The network as a numpy-in, numpy-out function. torch networks and ONNX ones (`OnnxNet`, an onnxruntime
    session) share the call convention `net(batch).logits`."""
    import torch

    if onnx:
        net = net.with_threads(threads) if threads else net
    elif threads:
        torch.set_num_threads(threads)
    net.eval()

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return net({k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()

    return run


def pick_backend(artifact: Artifact, name: str, threads: int | None) -> tuple[str, Backend]:
    if name not in BACKENDS:
        raise TunelabError(f"backend={name!r} (expected one of {', '.join(BACKENDS)})")
    onnx = is_onnx(artifact)
    if name == "auto":
        name = "onnxruntime" if onnx else "torch"
    if name == "onnxruntime" and not onnx:
        raise TunelabError(f"backend=onnxruntime: {artifact.source} holds no ONNX graph (expected an ONNX variant "
                           "written by compress.py, or backend=torch)")
    if name == "torch" and onnx:
        raise TunelabError(f"backend=torch: {artifact.source} is an ONNX graph (expected backend=onnxruntime or "
                           "auto)")
    return name, backend(artifact.net, onnx, threads)


def image_transform(preprocessing: dict[str, Any]) -> Callable[[Any], Any]:
    """timm's eval transform for the data config the model was trained with."""
    import timm

    config = dict(preprocessing.get("image") or {})
    if "input_size" in config:
        config["input_size"] = tuple(config["input_size"])
    return timm.data.create_transform(**config, is_training=False)


class Predictor:
    """Texts or images in, the network's (n, outputs) array out, on the chosen backend; `describe` turns it into
    the problem's answers (a class with its probabilities, scores, a label set)."""

    def __init__(self, artifact: Artifact, backend: str = "auto", threads: int | None = None) -> None:
        self.problem = artifact.problem
        if self.problem is None or not self.problem.outputs:
            raise TunelabError(f"model: {artifact.source} names no outputs (expected a model folder written by "
                               "tunelab, or a Hugging Face config with id2label)")
        self.labels, self.modality, self.source = list(self.problem.outputs), artifact.modality, artifact.source
        self.card = artifact.card
        self.backend, self.run = pick_backend(artifact, backend, threads)
        if self.modality == "image":
            self.transform = image_transform(artifact.preprocessing)
        else:
            if artifact.tokenizer is None:
                raise TunelabError(f"model: {artifact.source} has no tokenizer (expected the tokenizer files saved "
                                   "with the model)")
            self.tokenizer = artifact.tokenizer
            self.max_length = (artifact.preprocessing.get("text") or {}).get("max_length")

    def encode(self, items: Sequence[Any]) -> dict[str, np.ndarray]:
        """The batch the network takes: token ids and mask (padded to the longest text), or pixel values."""
        if self.modality == "image":
            return {PIXEL_VALUES: np.stack([self.transform(image).numpy() for image in items])}
        return self.padded(self.token_ids(items))

    def outputs(self, items: Sequence[Any]) -> np.ndarray:
        """(n, outputs) raw outputs (logits, values) in the order of `items`; texts run in length groups
        (`length_groups`)."""
        if self.modality == "image":
            return self.run(self.encode(items)).astype(np.float64)
        ids = self.token_ids(items)
        out = np.empty((len(ids), len(self.labels)))
        for group in length_groups([len(x) for x in ids]):
            out[group] = self.run(self.padded([ids[i] for i in group]))
        return out

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, truncated to the card's `max_length`, unpadded."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              return_token_type_ids=False, return_attention_mask=False)[INPUT_IDS]

    def padded(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        """Token ids padded to the longest of `ids` on the tokenizer's padding side, and their mask."""
        width, left, pad = max(map(len, ids)), self.tokenizer.padding_side == "left", self.tokenizer.pad_token_id
        if pad is None and any(len(seq) != width for seq in ids):
            raise TunelabError(f"model: the tokenizer of {self.source} has no padding token (expected one, to run "
                               "texts of different lengths together)")
        batch = np.full((len(ids), width), pad or 0, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            batch[row, cols], mask[row, cols] = seq, 1
        return {INPUT_IDS: batch, ATTENTION_MASK: mask}

    def describe(self, outputs: np.ndarray) -> list[dict[str, Any]]:
        """One answer per row of `outputs`, as the problem gives it (e.g. `{label, probability, probabilities}`)."""
        return self.problem.answers(outputs)


def length_groups(lengths: Sequence[int], call_cost: int = CALL_COST_TOKENS,
                  max_group: int = MAX_GROUP) -> list[list[int]]:
    """Indices of `lengths` split into groups of similar length that cost the fewest padded tokens in all.

    Sorted by length, a group is a run of neighbours, costing `call_cost + size * its longest`; the cheapest
    split into groups of at most `max_group` is a dynamic programme over the sorted order (the cap keeps it
    linear in the number of texts)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = lengths[order[end - 1]]
        best[end], cut[end] = min((best[start] + call_cost + (end - start) * width, start)
                                  for start in range(max(0, end - max_group), end))
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]
