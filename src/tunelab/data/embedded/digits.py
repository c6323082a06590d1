"""Digit images: scikit-learn's bundled 8x8 digits, and an MNIST-M-style copy blended with photo patches.

`digits_m` follows Ganin & Lempitsky (2015): the same digits over colour texture, so a classifier trained
on clean digits meets a domain shift. Both variants share one split and one file name per digit, which
lets a model trained on one be evaluated on the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

VERSION = "1"
SEED = 1998
SIZE = 32
SPLITS = {"train": 0.70, "val": 0.15, "test": 0.15}
CLASSES = tuple(str(c) for c in range(10))


def generate_digits(out: Path) -> None:
    """Write the clean digits as `<split>/<class>/<index:05d>.png`."""
    images, labels = load_images()
    _write(out, images, labels)


def generate_digits_m(out: Path) -> None:
    """Write the same digits, same split and file names, blended with photo patches."""
    images, labels = load_images()
    _write(out, blend(images), labels)


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as (N, 32, 32, 3) uint8, white on black, and their labels."""
    data = load_digits()
    grey = np.round(data.images * (255 / 16)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for g in grey])
    return np.repeat(big[..., None], 3, axis=-1), data.target


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Stratified, seeded 70/15/15 split of sample indices; fixed, so both variants line up."""
    rng = np.random.default_rng(SEED)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for c in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(len(members) * SPLITS["train"])
        n_val = round(len(members) * SPLITS["val"])
        for split, chunk in zip(SPLITS, np.split(members, [n_train, n_train + n_val]), strict=True):
            parts[split].append(chunk)
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def blend(images: np.ndarray) -> np.ndarray:
    """|patch - digit| per channel, with a random 32x32 patch of a bundled photo for each digit."""
    photos = load_sample_images().images
    rng = np.random.default_rng([SEED, 1])
    n = len(images)
    which = rng.integers(len(photos), size=n)
    heights = np.array([p.shape[0] for p in photos])[which]
    widths = np.array([p.shape[1] for p in photos])[which]
    ys = rng.integers(0, heights - SIZE + 1)
    xs = rng.integers(0, widths - SIZE + 1)
    out = np.empty_like(images)
    for i in range(n):
        patch = photos[which[i]][ys[i]:ys[i] + SIZE, xs[i]:xs[i] + SIZE].astype(np.int16)
        out[i] = np.abs(patch - images[i]).astype(np.uint8)
    return out


def _write(out: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for split, indices in split_indices(labels).items():
        for name in CLASSES:
            (out / split / name).mkdir(parents=True)
        for i in indices:
            Image.fromarray(images[i]).save(out / split / CLASSES[labels[i]] / f"{i:05d}.png", format="PNG")
