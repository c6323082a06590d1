"""Pretrain, fine-tune, distill, adapt and compress large pretrained models."""

import logging


class _TorchaoEnumNotice(logging.Filter):
    """Where torchao is installed (a dev extra, used only by `make bench`), transformers imports it with any model
    class, and torchao registers Enums as pytree constants, which torch now logs as deprecated: two warnings at the
    start of every command, addressed to torchao's authors rather than to anyone running tunelab."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in str(record.msg)


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoEnumNotice())
