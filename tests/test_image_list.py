"""Image lists: images with regression, multi-label or class targets read from a list file, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tunelab.data.image_list import ImageListDataModule
from tunelab.errors import TunelabError
from tunelab.problems.classification import Classification
from tunelab.problems.multi_label import MultiLabel
from tunelab.problems.regression import Regression

N = 30


def brightness(i: int) -> float:
    return round(i / (N - 1), 4)


def tags(i: int) -> list[str]:
    return ["red" if i % 2 else "blue", *(["big"] if i >= N // 2 else [])]


@pytest.fixture
def image_list(tmp_path: Path) -> Path:
    """N 16x16 PNGs whose grey level is the target, listed in a JSONL file next to their folder."""
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(N):
        Image.new("RGB", (16, 16), (int(255 * brightness(i)),) * 3).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"image": f"imgs/{i}.png", "brightness": brightness(i), "tags": tags(i),
                     "kind": "light" if i >= N // 2 else "dark"})
    return write(tmp_path / "train.jsonl", rows)


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def datamodule(file: Path, problem, **kwargs) -> ImageListDataModule:
    dm = ImageListDataModule(str(file), model_name="resnet10t", image_size=16, batch_size=8, **kwargs)
    dm.use_problem(problem)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- unit
def test_regression_gives_float_targets_named_after_the_field(image_list: Path) -> None:
    dm = datamodule(image_list, Regression(), label_field="brightness")
    assert dm.labels == ["brightness"]
    assert {len(dm.datasets[s]) for s in ("val", "test")} == {3} and len(dm.datasets["train"]) == N - 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 16, 16)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (8, 1)
    sample = dm.datasets["test"][0]
    grey = (sample["pixel_values"][0, 0, 0] * 0.229 + 0.485).item()  # undo the ImageNet normalisation
    assert abs(grey - sample["labels"].item()) < 0.01
    assert dm.data_config["input_size"] == (3, 16, 16)


def test_multi_label_gives_multi_hot_rows(image_list: Path) -> None:
    dm = datamodule(image_list, MultiLabel(), label_field="tags")
    assert dm.labels == ["big", "blue", "red"]
    labels = torch.stack([dm.datasets["train"][i]["labels"] for i in range(len(dm.datasets["train"]))])
    assert labels.dtype == torch.float32 and labels.shape == (N - 6, 3)
    assert set(labels.sum(1).tolist()) == {1.0, 2.0}


def test_single_label_by_default(image_list: Path) -> None:
    dm = ImageListDataModule(str(image_list), label_field="kind", model_name="resnet10t", image_size=16)
    dm.setup("fit")
    assert isinstance(dm.problem, Classification) and dm.labels == ["dark", "light"]
    label = dm.datasets["train"][0]["labels"]
    assert label.dtype == torch.int64 and label.dim() == 0


def test_tag_outside_fixed_labels_names_its_line(image_list: Path) -> None:
    with pytest.raises(TunelabError, match=rf"{image_list}:2: label 'red' is not in the label set"):
        datamodule(image_list, MultiLabel(), label_field="tags", labels=["blue", "big"], val_fraction=0,
                   test_fraction=0)


def test_missing_image_names_its_line_and_path(image_list: Path) -> None:
    rows = rows_of(image_list)
    rows[4]["image"] = "imgs/gone.png"
    write(image_list, rows)
    with pytest.raises(TunelabError) as info:
        datamodule(image_list, Regression(), label_field="brightness")
    assert f"{image_list}:5: image file not found: {image_list.parent / 'imgs' / 'gone.png'}" in str(info.value)


def test_undecodable_image_names_its_line(image_list: Path) -> None:
    (image_list.parent / "imgs" / "7.png").write_bytes(b"not a png")
    with pytest.raises(TunelabError, match=rf"{image_list}:8: cannot decode image"):
        datamodule(image_list, Regression(), label_field="brightness")


def test_nan_target_names_its_line(image_list: Path) -> None:
    lines = image_list.read_text().splitlines()
    lines[2] = lines[2].replace(f'"brightness": {brightness(2)}', '"brightness": NaN')
    image_list.write_text("\n".join(lines) + "\n")
    with pytest.raises(TunelabError, match=rf"{image_list}:3: target nan is not finite"):
        datamodule(image_list, Regression(), label_field="brightness")


def test_missing_image_field_names_the_image_field(image_list: Path) -> None:
    with pytest.raises(TunelabError, match=rf"{image_list}:1: missing image field 'path' .*data.image_field"):
        datamodule(image_list, Regression(), label_field="brightness", image_field="path")


def test_csv_list_with_absolute_paths_and_two_targets(image_list: Path, tmp_path: Path) -> None:
    lines = ["path,brightness,darkness"] + [
        f"{tmp_path / r['image']},{r['brightness']},{1 - r['brightness']}" for r in rows_of(image_list)]
    (tmp_path / "sub").mkdir()
    csv = tmp_path / "sub" / "list.csv"
    csv.write_text("\n".join(lines) + "\n")
    dm = datamodule(csv, Regression(), image_field="path", label_field=["brightness", "darkness"])
    assert dm.labels == ["brightness", "darkness"]
    assert dm.datasets["train"][0]["labels"].shape == (2,)


# ----------------------------------------------------------------------------- end to end
def test_regression_run_exports_a_timm_model_with_the_same_outputs(image_list: Path, tmp_path: Path) -> None:
    from tests.conftest import FAST, compose_cfg
    from tunelab.artifacts import load
    from tunelab.deploy.predictor import Predictor
    from tunelab.train import run

    cfg = compose_cfg([*FAST, "problem=regression", "data=image_list", f"data.train_file={image_list}",
                       "data.label_field=brightness", "model=timm", "model.name=resnet10t", "data.image_size=16",
                       "data.batch_size=8"], tmp_path / "run")
    run(cfg)
    model = tmp_path / "run" / "model"
    card = json.loads((model / "tunelab.json").read_text())
    assert card["problem"]["name"] == "regression" and card["problem"]["targets"] == ["brightness"]

    images = [Image.open(image_list.parent / "imgs" / f"{i}.png").convert("RGB") for i in (0, 9, 20, 29)]
    ours = Predictor(load(model)).outputs(images)
    assert ours.shape == (4, 1)
    weights = model / "model.safetensors"
    plain = timm.create_model("resnet10t", pretrained=True, num_classes=1,
                              pretrained_cfg_overlay={"file": str(weights), "num_classes": 1}).eval()
    exported = timm.create_model(f"local-dir:{model}", pretrained=True).eval()
    config = timm.data.resolve_data_config(model=exported)
    assert config["input_size"] == (3, 16, 16)
    transform = timm.data.create_transform(**config, is_training=False)
    with torch.no_grad():
        reference = plain(torch.stack([transform(im) for im in images])).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)
