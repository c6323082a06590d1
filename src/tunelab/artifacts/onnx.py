"""ONNX classifiers (kind `onnx-classifier`): an fp32 or int8 graph run by onnxruntime, for CPU serving.

The folder holds `model.onnx` (inputs `input_ids` and `attention_mask`, batch × sequence, both int64, for
text; `pixel_values`, batch × 3 × H × W float32, for images; output `logits`, batch × classes; the batch
and sequence axes are dynamic), the source's `config.json`, its tokenizer (text) and the card, whose
`preprocessing` is the source's (tokenizer and `max_length`, or the timm data config) and whose
`compression` says `precision` (fp32/int8) and how it was quantized.

For predict and serve tools: `artifacts.load(folder)` returns an Artifact whose `net` is an `OnnxNet`, called
like the PyTorch networks, `net(batch).logits` (a batch dict of tensors or numpy arrays in, a torch tensor
out); `net.labels`, `net.modality`, `net.input_names`; `OnnxNet(path, threads=n)` sets onnxruntime's threads.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.artifacts.derived import write_card
from tunelab.artifacts.kinds import ONNX
from tunelab.contracts import Output
from tunelab.errors import TunelabError

FILE = "model.onnx"
ORT_LOAD = ('import onnxruntime, transformers\n'
            'session = onnxruntime.InferenceSession("{path}/model.onnx")\n'
            'tokenizer = transformers.AutoTokenizer.from_pretrained("{path}")   # images: see preprocessing\n'
            'enc = tokenizer(["a text"], return_tensors="np")\n'
            'logits = session.run(["logits"], {{"input_ids": enc["input_ids"], '
            '"attention_mask": enc["attention_mask"]}})[0]')


class OnnxNet:
    """An onnxruntime session with the torch networks' call convention: `net(batch).logits`."""

    def __init__(self, path: str | Path, modality: str = "text", labels: list[str] | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        self.path, self.modality, self.labels, self.threads = Path(path), modality, labels, threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.training = False

    def __call__(self, batch: dict[str, Any], **_: Any) -> Output:
        feeds = {name: _array(batch[name], name) for name in self.input_names}
        logits = self.session.run(["logits"], feeds)[0]
        return Output(torch.from_numpy(logits), None)

    def with_threads(self, threads: int) -> OnnxNet:
        return OnnxNet(self.path, self.modality, self.labels, threads)

    # the torch-module calls tools make on any net
    def eval(self) -> OnnxNet:
        return self

    def train(self, mode: bool = True) -> OnnxNet:
        return self

    def to(self, *_: Any, **__: Any) -> OnnxNet:
        return self


def _array(value: Any, name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return array.astype(np.float32 if name == "pixel_values" else np.int64, copy=False)


def save(directory: str | Path, onnx_file: Path, source: Any, compression: dict[str, Any],
         metrics: dict | None = None) -> Path:
    """Write an ONNX folder from a graph file and the Artifact (a saved variant folder) it was exported from."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, directory / FILE)
    shutil.copyfile(Path(source.source) / "config.json", directory / "config.json")
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(directory)
    write_card(directory, ONNX, source.modality, source, {"format": "onnx", **compression}, directory / FILE,
               ORT_LOAD, metrics)
    return directory


def load(folder: Path, card: dict, config: dict, role: str) -> Any:
    from tunelab.artifacts import Artifact
    from tunelab.folders import own_tokenizer

    if not (folder / FILE).is_file():
        raise TunelabError(f"{role}: {folder} has no {FILE} (expected the ONNX graph next to config.json)")
    modality = card.get("modality", "text")
    net = OnnxNet(folder / FILE, modality, card.get("labels"))
    tokenizer = own_tokenizer(str(folder)) if modality == "text" else None
    return Artifact(str(folder), ONNX, net, card.get("labels"), tokenizer, card.get("preprocessing") or {}, card)
