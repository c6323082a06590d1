"""Embedded datasets: layout, idempotence, determinism and the properties the experiments rely on."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from tunelab.data import embedded
from tunelab.data.embedded import MARKER, digits, ensure, reviews

DOMAINS = ("books", "dvd", "electronics", "kitchen")
SIZES = {"train": 1600, "val": 200, "test": 400}
CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="module")
def review_dir(root: Path) -> Path:
    return ensure("reviews", root)


@pytest.fixture(scope="module")
def digit_dirs(root: Path) -> tuple[Path, Path]:
    return ensure("digits", root), ensure("digits_m", root)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def bow_accuracy(train: list[dict], test: list[dict]) -> float:
    vectorizer = CountVectorizer()
    features = vectorizer.fit_transform([r["text"] for r in train])
    model = LogisticRegression(max_iter=2000).fit(features, [r["label"] for r in train])
    return model.score(vectorizer.transform([r["text"] for r in test]), [r["label"] for r in test])


# --- ensure ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reviews.*digits.*digits_m"):
        ensure("mnist", tmp_path)
    assert not any(tmp_path.iterdir())


def test_composing_a_config_generates_nothing_prepare_data_does(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.utils import instantiate

    from tunelab.config import compose_config

    made: list[Path] = []
    monkeypatch.setitem(embedded._GENERATORS, "reviews", (made.append, reviews.VERSION))
    cfg = compose_config([f"paths.data_dir={tmp_path / 'data'}"], tmp_path / "run")
    datamodule = instantiate(cfg.data)
    assert datamodule.files["train"] == str(tmp_path / "data" / "reviews" / "all" / "train.jsonl")
    assert not (tmp_path / "data").exists() and not made
    datamodule.prepare_data()
    assert len(made) == 1 and (tmp_path / "data" / "reviews" / MARKER).is_file()


def test_second_call_reuses_the_data(root: Path, review_dir: Path, digit_dirs: tuple[Path, Path]) -> None:
    for name, folder in [("reviews", review_dir), ("digits", digit_dirs[0]), ("digits_m", digit_dirs[1])]:
        assert folder == root / name and (folder / MARKER).is_file()
        files = [folder / MARKER, *sorted(folder.rglob("*.jsonl"))[:3], *sorted(folder.rglob("*.png"))[:3]]
        before = [f.stat().st_mtime_ns for f in files]
        assert ensure(name, str(root)) == folder
        assert [f.stat().st_mtime_ns for f in files] == before
    assert sorted(p.name for p in root.iterdir()) == ["digits", "digits_m", "reviews"]  # no temp folders left


def test_stale_copy_is_replaced_by_an_identical_generation(root: Path, digit_dirs, tmp_path: Path) -> None:
    stale = tmp_path / "digits"
    stale.mkdir()
    (stale / MARKER).write_text("old\n")
    (stale / "leftover.txt").write_text("x")
    assert ensure("digits", tmp_path) == stale
    assert not (stale / "leftover.txt").exists() and (stale / MARKER).read_text() != "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]
    for path in sorted((root / "digits" / "val" / "7").iterdir())[:5]:  # deterministic: same bytes
        assert path.read_bytes() == (stale / "val" / "7" / path.name).read_bytes()


def test_losing_a_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def generate(out: Path) -> None:  # another process finishes first, while this one is still writing
        (out / "mine.txt").write_text("x")
        rival = tmp_path / "digits"
        rival.mkdir()
        (rival / "theirs.txt").write_text("x")
        (rival / MARKER).write_text(digits.VERSION + "\n")

    monkeypatch.setitem(embedded._GENERATORS, "digits", (generate, digits.VERSION))
    folder = ensure("digits", tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_killed_generations_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(embedded._GENERATORS, "digits", (lambda out: None, digits.VERSION))
    dead, live = tmp_path / ".digits.dead.tmp", tmp_path / ".digits.live.tmp"
    for folder in (dead, live):
        folder.mkdir()
    os.utime(dead, (time.time() - 2 * embedded.ABANDONED_AFTER_S,) * 2)
    ensure("digits", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "digits"]


def test_generation_is_deterministic(root: Path, review_dir: Path, digit_dirs, tmp_path: Path) -> None:
    other = ensure("reviews", tmp_path)
    for rel in ["all/train.jsonl", "all/unlabelled.txt", "kitchen/unlabelled.txt", "dvd/test.jsonl"]:
        assert (review_dir / rel).read_bytes() == (other / rel).read_bytes(), rel
    images, _ = digits.load_images()
    assert np.array_equal(digits.blend(images), digits.blend(images))


# --- reviews --------------------------------------------------------------------------------------------


def test_review_layout_and_balance(review_dir: Path) -> None:
    for domain in [*DOMAINS, "all"]:
        scale = len(DOMAINS) if domain == "all" else 1
        for split, size in SIZES.items():
            rows = read_jsonl(review_dir / domain / f"{split}.jsonl")
            assert len(rows) == size * scale
            assert all(set(r) == {"text", "label", "domain", "stars", "aspects"} for r in rows)
            assert Counter(r["label"] for r in rows) == {"negative": size * scale // 2, "positive": size * scale // 2}
            assert domain == "all" or {r["domain"] for r in rows} == {domain}
        lines = (review_dir / domain / "unlabelled.txt").read_text(encoding="utf-8").splitlines()
        assert len(lines) == reviews.UNLABELLED_SIZE * scale and all(lines)


def test_review_texts(review_dir: Path) -> None:
    train = {r["text"] for r in read_jsonl(review_dir / "all" / "train.jsonl")}
    test = [r["text"] for r in read_jsonl(review_dir / "all" / "test.jsonl")]
    assert sum(t in train for t in test) < 0.01 * len(test)
    lengths = np.array([len(t.split()) for t in train])
    assert lengths.min() >= 15 and lengths.max() <= 70 and 25 <= lengths.mean() <= 45
    assert all(t == t.lower() and t.endswith(".") for t in train)
    text = " ".join(train)
    for cue in (" not ", " never ", ", but ", "however,", "overall,"):
        assert cue in text


def test_bag_of_words_is_good_but_not_perfect(review_dir: Path) -> None:
    accuracy = bow_accuracy(read_jsonl(review_dir / "all" / "train.jsonl"),
                            read_jsonl(review_dir / "all" / "test.jsonl"))
    print(f"bag-of-words all/train -> all/test: {accuracy:.4f}")
    assert 0.70 <= accuracy <= 0.95


def test_bag_of_words_loses_accuracy_across_domains(review_dir: Path) -> None:
    books = read_jsonl(review_dir / "books" / "train.jsonl")
    in_domain = bow_accuracy(books, read_jsonl(review_dir / "books" / "test.jsonl"))
    cross = bow_accuracy(books, read_jsonl(review_dir / "kitchen" / "test.jsonl"))
    print(f"bag-of-words books -> books: {in_domain:.4f}, books -> kitchen: {cross:.4f}")
    assert cross < in_domain - 0.03


# --- digits ---------------------------------------------------------------------------------------------


def test_digit_layout(digit_dirs: tuple[Path, Path]) -> None:
    clean, blended = digit_dirs
    total = 0
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (clean / split).iterdir()) == CLASSES
        names = sorted(p.relative_to(clean).as_posix() for p in (clean / split).rglob("*.png"))
        assert names == sorted(p.relative_to(blended).as_posix() for p in (blended / split).rglob("*.png"))
        total += len(names)
    assert total == 1797
    assert len(list((clean / "train").rglob("*.png"))) == pytest.approx(0.7 * 1797, abs=10)


def test_digit_images(digit_dirs: tuple[Path, Path]) -> None:
    clean, blended = digit_dirs
    for path in sorted((clean / "val").rglob("*.png"))[:20]:
        a, b = Image.open(path), Image.open(blended / path.relative_to(clean))
        assert a.size == b.size == (32, 32) and a.mode == b.mode == "RGB"
        pa, pb = np.asarray(a), np.asarray(b)
        assert (pa[..., 0] == pa[..., 2]).all() and pa.max() > 200  # grey, white digit on black
        assert not np.array_equal(pa, pb)
