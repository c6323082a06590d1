"""Pretrain, fine-tune, distill, adapt and compress large pretrained models."""
