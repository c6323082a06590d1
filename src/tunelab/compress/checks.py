"""Every value of a compression run, checked before any work: ranges, choices, and what the source allows."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from tunelab.errors import TunelabError

PRUNE = ("none", "unstructured", "heads_ffn", "channels")
RECOVER = ("none", "finetune", "distill")
ONNX_INT8 = ("auto", "dynamic", "static")


def fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise TunelabError(f"{key}={value!r}: expected a fraction in [0, 1) (0.5 removes half)")
    return float(value)


def count(value: Any, key: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise TunelabError(f"{key}={value!r}: expected an integer >= {least}")
    return value


def choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise TunelabError(f"{key}={value!r}: expected one of {list(choices)}")
    return value


def check_values(cfg: DictConfig) -> None:
    """The config on its own: every value in its domain."""
    method = choice(cfg.prune.method, "prune.method", PRUNE)
    if method != "none":
        fraction(cfg.prune.amount, "prune.amount")
    if method == "heads_ffn":
        fraction(cfg.prune.heads, "prune.heads")
        fraction(cfg.prune.ffn, "prune.ffn")
        count(cfg.prune.layers, "prune.layers", 0)
        count(cfg.prune.iterations, "prune.iterations", 1)
    recover = choice(cfg.recover.method, "recover.method", RECOVER)
    if recover != "none":
        if method == "none":
            raise TunelabError(f"recover={recover}: there is nothing to recover without pruning (expected "
                               "prune=heads_ffn, unstructured or channels, or recover=none)")
        count(cfg.recover.epochs, "recover.epochs", 1)
        if not isinstance(cfg.recover.lr, int | float) or cfg.recover.lr <= 0:
            raise TunelabError(f"recover.lr={cfg.recover.lr!r}: expected a learning rate > 0")
    choice(cfg.quantize.method, "quantize.method", ("none", "int8"))
    choice(cfg.quantize.onnx, "quantize.onnx", ONNX_INT8)
    choice(cfg.export.format, "export.format", ("none", "onnx"))
    count(cfg.threads, "threads", 1)
    count(cfg.latency.repeats, "latency.repeats", 1)
    for size in cfg.latency.batch_sizes:
        count(size, "latency.batch_sizes[]", 1)


def check_source(cfg: DictConfig, source: Any) -> None:
    """What the source must have for the asked compression: the right modality, layers, heads and labels."""
    method, modality = cfg.prune.method, source.modality
    if method == "heads_ffn" and modality != "text":
        raise TunelabError(f"prune=heads_ffn prunes transformer encoders; {source.source} is an {modality} model "
                           "(expected prune=channels or prune=unstructured for image models)")
    if method == "channels" and modality != "image":
        raise TunelabError(f"prune=channels prunes CNN channels; {source.source} is a {modality} model (expected "
                           "prune=heads_ffn or prune=unstructured for text models)")
    if method == "heads_ffn":
        from tunelab.compress.structured import check_explicit_heads
        from tunelab.models.surgery import encoder_layers

        layers = len(encoder_layers(source.net.net))
        if cfg.prune.layers >= layers:
            raise TunelabError(f"prune.layers={cfg.prune.layers}: the model has {layers} layers (expected fewer "
                               f"than {layers} removed: at least one stays)")
        if cfg.prune.get("remove_heads"):
            check_explicit_heads(source.net.net, cfg.prune.remove_heads)
    if cfg.recover.method != "none" and not source.labels:
        raise TunelabError(f"recover={cfg.recover.method}: {source.source} names no labels (its config has only "
                           "LABEL_0, LABEL_1, ...), and recovery trains on labelled data (expected a classifier "
                           "fine-tuned by train.py, or recover=none)")
