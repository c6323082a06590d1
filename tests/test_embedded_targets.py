"""The embedded reviews' `stars` and `aspects` targets: valid, coherent with the text and the label,
learnable by a bag of words, and added without changing a byte of what version 2 generated."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import MultiLabelBinarizer

from tunelab.data.embedded import ensure, review_targets, reviews

FOLDERS = ("books", "dvd", "electronics", "kitchen", "all")
SPLITS = ("train", "val", "test")
OLD_FIELDS = ("text", "label", "domain")

# Captured from version 2 before the targets were added; published accuracy figures depend on these bytes.
V2_FIRST_TRAIN = [  # the first records of all/train.jsonl
    {"text": "i replaced my old speaker with it. the power button was very poor. it drains the battery overnight. "
             "the box includes a wall adapter. bottom line: i would return it.",
     "label": "negative", "domain": "electronics"},
    {"text": "to me the battery life is never sluggish. i am happy with the router. to me the microphone is pretty "
             "amazing. as a router it is quite fuzzy; however, to me the setup process is crisp.",
     "label": "positive", "domain": "electronics"},
    {"text": "the dvd drags in the middle. the disc includes a commentary track. to me the cinematography is "
             "awful. bottom line: it is really cheesy.",
     "label": "negative", "domain": "dvd"},
]
V2_FIRST_KITCHEN_TEST = {
    "text": "as a knife it is rickety. the latch was quite frustrating. i got it as a gift for my son. i use it "
            "almost every day. to sum up, this knife is very blunt.",
    "label": "negative", "domain": "kitchen"}
V2_LABELLED_SHA256 = "632b44f6452b0322a43c3bd132674301d24a57017d4d9717da5e58cbea89fdc5"  # every folder, split
V2_UNLABELLED_SHA256 = "469ae10a1dc37625e0cd8f23aed284690c5a093747f0e8cdfbae9c3f66bf1d8c"  # all/unlabelled.txt


@pytest.fixture(scope="module")
def review_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure("reviews", tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="module")
def records(review_dir: Path) -> dict[tuple[str, str], list[dict]]:
    return {(folder, split): read_jsonl(review_dir / folder / f"{split}.jsonl")
            for folder in FOLDERS for split in SPLITS}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def agrees(row: dict) -> bool:
    """Positive reviews have 3-5 stars, negative ones 1-3."""
    return row["stars"] >= 3 if row["label"] == "positive" else row["stars"] <= 3


def test_targets_are_well_formed(records: dict[tuple[str, str], list[dict]]) -> None:
    for rows in records.values():
        for row in rows:
            assert type(row["stars"]) is int and 1 <= row["stars"] <= 5, row
            tags = row["aspects"]
            assert isinstance(tags, list) and 1 <= len(tags) <= review_targets.MAX_TAGS, row
            assert tags == sorted(set(tags)) and set(tags) <= set(review_targets.ASPECT_TAGS), row


def test_stars_agree_with_the_label_except_for_noise(records: dict[tuple[str, str], list[dict]]) -> None:
    for (folder, split), rows in records.items():
        flipped = round(len(rows) * reviews.NOISE)  # at most this many labels were flipped as noise
        assert sum(not agrees(r) for r in rows) <= flipped, (folder, split)


def test_stars_are_not_a_function_of_the_label(records: dict[tuple[str, str], list[dict]]) -> None:
    rows = records["all", "train"]
    for label in reviews.LABELS:
        counts = Counter(r["stars"] for r in rows if r["label"] == label and agrees(r))
        print(f"stars of {label} reviews: {sorted(counts.items())}")
        assert len(counts) >= 2 and max(counts.values()) < 0.8 * sum(counts.values())


def test_every_tag_is_common_but_not_universal(records: dict[tuple[str, str], list[dict]]) -> None:
    rows = [r for split in SPLITS for r in records["all", split]]
    frequency = {tag: sum(tag in r["aspects"] for r in rows) / len(rows) for tag in review_targets.ASPECT_TAGS}
    print("tag frequencies:", {tag: round(f, 3) for tag, f in frequency.items()})
    assert all(0.10 <= f <= 0.70 for f in frequency.values()), frequency
    assert len({tuple(r["aspects"]) for r in rows}) >= 20  # varied combinations, a real multi-label problem


def test_text_and_label_are_those_of_version_2(review_dir: Path, records) -> None:
    old = [{k: r[k] for k in OLD_FIELDS} for r in records["all", "train"][:len(V2_FIRST_TRAIN)]]
    assert old == V2_FIRST_TRAIN
    assert {k: records["kitchen", "test"][0][k] for k in OLD_FIELDS} == V2_FIRST_KITCHEN_TEST
    digest = hashlib.sha256()
    for folder in FOLDERS:
        for split in SPLITS:  # version 2 wrote json.dumps of exactly these fields, in this order
            digest.update("".join(json.dumps({k: r[k] for k in OLD_FIELDS}) + "\n"
                                  for r in records[folder, split]).encode("utf-8"))
    assert digest.hexdigest() == V2_LABELLED_SHA256
    unlabelled = (review_dir / "all" / "unlabelled.txt").read_bytes()
    assert hashlib.sha256(unlabelled).hexdigest() == V2_UNLABELLED_SHA256


def test_bag_of_words_learns_both_targets(records: dict[tuple[str, str], list[dict]]) -> None:
    train, test = records["all", "train"], records["all", "test"]
    vectorizer = CountVectorizer()
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    x_test = vectorizer.transform([r["text"] for r in test])
    stars = np.array([r["stars"] for r in test])
    predicted = Ridge().fit(x_train, [r["stars"] for r in train]).predict(x_test)
    rho = spearmanr(predicted, stars).statistic
    positive = np.array([r["label"] == "positive" for r in test])
    label_only = spearmanr(positive, stars).statistic
    within = [spearmanr(predicted[positive == p], stars[positive == p]).statistic for p in (False, True)]
    tags = MultiLabelBinarizer(classes=review_targets.ASPECT_TAGS)
    y_train, y_test = tags.fit_transform([r["aspects"] for r in train]), tags.transform([r["aspects"] for r in test])
    classifier = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(x_train, y_train)
    micro_f1 = f1_score(y_test, classifier.predict(x_test), average="micro")
    print(f"stars: Spearman {rho:.3f} (the true label alone {label_only:.3f}; within negative/positive "
          f"{within[0]:.3f}/{within[1]:.3f}); aspects: micro-F1 {micro_f1:.3f}")
    assert rho >= 0.6 and micro_f1 >= 0.8
    assert min(within) >= 0.4  # the text tells stars apart beyond the label
