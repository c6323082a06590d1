"""`model/` folders describe themselves: a script that never imports tunelab loads one with plain
transformers/timm, preprocesses the test split with only what the folder declares, and gets the run's
test accuracy; the card names the task, labels, preprocessing, metrics, parents and run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from tunelab import artifacts
from tunelab.train import run

FULL_TEST = ["trainer.limit_test_batches=null"]

TEXT_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, path, domain = sys.argv[1], sys.argv[2], sys.argv[3]
text = json.load(open(f"{folder}/tunelab.json"))["preprocessing"]["text"]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
label_id = {name: int(i) for i, name in model.config.id2label.items()}
rows = [json.loads(line) for line in open(path) if line.strip()]
rows = [r for r in rows if not domain or r["domain"] == domain]
correct = 0
for i in range(0, len(rows), 64):
    chunk = rows[i:i + 64]
    enc = tokenizer([r["text"] for r in chunk], truncation=True, max_length=text["max_length"], padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).tolist()
    correct += sum(p == label_id[str(r["label"])] for p, r in zip(predicted, chunk))
assert not any(name.startswith("tunelab") for name in sys.modules)
print(correct / len(rows))
"""

IMAGE_SCRIPT = """
import json, sys, timm, torch
from torchvision.datasets import ImageFolder
folder, root = sys.argv[1], sys.argv[2]
net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config(model=net))
names = json.load(open(f"{folder}/config.json"))["label_names"]
data = ImageFolder(root, transform=transform)
correct = 0
loader = torch.utils.data.DataLoader(data, batch_size=128)
for x, y in loader:
    with torch.no_grad():
        predicted = net(x).argmax(-1)
    correct += sum(names[p] == data.classes[t] for p, t in zip(predicted.tolist(), y.tolist()))
assert not any(name.startswith("tunelab") for name in sys.modules)
print(correct / len(data))
"""


# The masked-LM test split, packed and masked as the card's resolved data config declares (a seeded split of
# the text file; documents + [SEP] cut into full blocks; masks seeded by each batch's content)
MLM_SCRIPT = """
import json, sys, zlib, datasets, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
folder = sys.argv[1]
card = json.load(open(f"{folder}/tunelab.json"))
text, data = card["preprocessing"]["text"], card["run"]["config"]["data"]
masking = data["collator"]
assert text["packed"]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForMaskedLM.from_pretrained(folder).eval()
lines = [line.rstrip("\\n") for line in open(data["train_file"], encoding="utf-8") if line.strip()]
test = datasets.Dataset.from_dict({"text": lines}).train_test_split(test_size=data["test_fraction"],
                                                                    seed=data["seed"])["test"]
stream = []
for ids in tokenizer(list(test["text"]), add_special_tokens=False)["input_ids"]:
    stream += ids + [tokenizer.sep_token_id]
content = text["max_length"] - 2
blocks = [[tokenizer.cls_token_id, *stream[i:i + content], tokenizer.sep_token_id]
          for i in range(0, len(stream) - content + 1, content)]
special = torch.zeros(len(tokenizer), dtype=torch.bool)
special[tokenizer.all_special_ids] = True
pool = (~special).nonzero().squeeze(1)
correct = total = 0
for i in range(0, len(blocks), data["batch_size"]):
    ids = torch.tensor(blocks[i:i + data["batch_size"]], dtype=torch.long)
    g = torch.Generator().manual_seed(data["seed"] * 1_000_003 + zlib.crc32(ids.numpy().tobytes()))
    chosen = ~special[ids] & (torch.rand(ids.shape, generator=g) < masking["mask_prob"])
    draws = torch.rand(ids.shape, generator=g)
    to_mask = chosen & (draws < masking["replace_prob"])
    to_random = chosen & (draws >= masking["replace_prob"]) & (draws < masking["replace_prob"] + masking["random_prob"])
    corrupted = ids.masked_fill(to_mask, tokenizer.mask_token_id)
    corrupted[to_random] = pool[torch.randint(len(pool), (int(to_random.sum()),), generator=g)]
    with torch.no_grad():
        predicted = model(input_ids=corrupted, attention_mask=torch.ones_like(ids)).logits.argmax(-1)
    correct += int((predicted[chosen] == ids[chosen]).sum())
    total += int(chosen.sum())
assert not any(name.startswith("tunelab") for name in sys.modules)
print(correct / total)
"""


def plain_accuracy(script: str, *args: str) -> float:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.strip().splitlines()[-1])


def finished(cfg) -> tuple[Path, dict, dict]:
    run(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return out / "model", metrics, json.loads((out / "model" / artifacts.CARD).read_text())


def check_card(card: dict, task: str, kind: str, metrics: dict) -> None:
    assert card["task"] == task and card["kind"] == kind
    assert card["metrics"] == metrics and card["run"]["config"]["task_name"] == task
    assert card["versions"]["torch"] and card["sha256"]


def test_text_classifier_folder_reproduces_test_accuracy(make_cfg) -> None:
    cfg = make_cfg(*FULL_TEST)
    model, metrics, card = finished(cfg)
    check_card(card, "finetune", artifacts.TEXT_CLASSIFIER, metrics)
    assert card["labels"] == ["negative", "positive"]
    assert card["preprocessing"]["text"]["max_length"] == cfg.data.max_length
    accuracy = plain_accuracy(TEXT_SCRIPT, str(model), cfg.data.test_file, "")
    assert abs(accuracy - metrics["test/acc"]) <= 0.005
    assert (model / "README.md").read_text().startswith("---\nlibrary_name: transformers")


@pytest.mark.slow
def test_image_classifier_folder_reproduces_test_accuracy(make_cfg) -> None:
    cfg = make_cfg("data=digits", "model=timm", "model.name=resnet10t", *FULL_TEST)
    model, metrics, card = finished(cfg)
    check_card(card, "finetune", artifacts.IMAGE_CLASSIFIER, metrics)
    assert card["preprocessing"]["image"]["input_size"] == [3, 32, 32]
    accuracy = plain_accuracy(IMAGE_SCRIPT, str(model), str(Path(cfg.data.root) / "test"))
    assert abs(accuracy - metrics["test/acc"]) <= 0.005


def test_dann_image_folder_declares_the_size_it_was_trained_on(make_cfg) -> None:
    """The exported DANN model once said 176x176 (timm's default for the architecture) for 32x32 digits."""
    cfg = make_cfg("experiment=digits_dann", *FULL_TEST)
    model, metrics, card = finished(cfg)
    check_card(card, "dann", artifacts.IMAGE_CLASSIFIER, metrics)
    assert card["preprocessing"]["image"]["input_size"] == [3, 32, 32]
    accuracy = plain_accuracy(IMAGE_SCRIPT, str(model), str(Path(cfg.data.target.root) / "test"))
    assert abs(accuracy - metrics["test/target/acc"]) <= 0.005


@pytest.mark.slow
def test_masked_lm_folder_reproduces_masked_token_accuracy(make_cfg) -> None:
    cfg = make_cfg("task=mlm", *FULL_TEST)
    model, metrics, card = finished(cfg)
    check_card(card, "mlm", artifacts.MASKED_LM, metrics)
    assert card["preprocessing"]["text"] == {"tokenizer": ".", "max_length": cfg.data.max_length,
                                             "truncation": False, "packed": True}
    accuracy = plain_accuracy(MLM_SCRIPT, str(model))
    assert abs(accuracy - metrics["test/acc"]) <= 0.005


def distilled(make_cfg, tmp_path: Path, teacher: list[str], student: list[str], kind: str) -> tuple[Path, dict, Any]:
    """A student distilled from a teacher trained here; its card names the teacher with its weights' hash."""
    teacher_model, _, _ = finished(make_cfg(*teacher))
    cfg = make_cfg(*student, f"teacher.path={teacher_model}", *FULL_TEST)
    cfg.paths.output_dir = str(tmp_path / "student")
    model, metrics, card = finished(cfg)
    check_card(card, "distill", kind, metrics)
    [parent] = [p for p in card["parents"] if p["role"] == "teacher"]
    assert parent["sha256"] == artifacts.weights_digest(teacher_model)
    return model, metrics, cfg


@pytest.mark.slow
def test_distilled_student_folder_reproduces_test_accuracy(make_cfg, tmp_path: Path) -> None:
    model, metrics, cfg = distilled(make_cfg, tmp_path, [], ["task=distill"], artifacts.TEXT_CLASSIFIER)
    accuracy = plain_accuracy(TEXT_SCRIPT, str(model), cfg.data.test_file, "")
    assert abs(accuracy - metrics["test/acc"]) <= 0.005


@pytest.mark.slow
def test_distilled_image_student_folder_reproduces_test_accuracy(make_cfg, tmp_path: Path) -> None:
    model, metrics, cfg = distilled(make_cfg, tmp_path, ["data=digits", "model=timm", "model.name=resnet18"],
                                    ["experiment=digits_distill", "data.model_name=resnet18"],
                                    artifacts.IMAGE_CLASSIFIER)
    accuracy = plain_accuracy(IMAGE_SCRIPT, str(model), str(Path(cfg.data.root) / "test"))
    assert abs(accuracy - metrics["test/acc"]) <= 0.005


@pytest.mark.slow
def test_dann_text_folder_reproduces_target_test_accuracy(make_cfg) -> None:
    cfg = make_cfg("experiment=reviews_dann", *FULL_TEST)
    model, metrics, card = finished(cfg)
    check_card(card, "dann", artifacts.TEXT_CLASSIFIER, metrics)
    [domain] = cfg.data.target.domains
    accuracy = plain_accuracy(TEXT_SCRIPT, str(model), cfg.data.target.test_file, domain)
    assert abs(accuracy - metrics["test/target/acc"]) <= 0.005


def test_parent_hash_follows_the_parents_weights(tiny_hf_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "parent"
    shutil.copytree(tiny_hf_dir, copy)
    before = artifacts.parent("pretrained", str(copy))
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    after = artifacts.parent("pretrained", str(copy))
    assert before["source"] == after["source"] == str(copy.resolve())
    assert before["sha256"] and after["sha256"] and before["sha256"] != after["sha256"]


@pytest.mark.slow
def test_pretrained_run_records_its_parent(make_cfg, tiny_hf_dir: Path) -> None:
    _, _, card = finished(make_cfg("model=hf", f"model.pretrained={tiny_hf_dir}", "optimizer.lr=5e-5"))
    [parent] = card["parents"]
    assert parent["role"] == "pretrained" and parent["sha256"] == artifacts.weights_digest(tiny_hf_dir)


def test_load_reads_run_folders_and_plain_folders(make_cfg, tiny_hf_dir: Path) -> None:
    cfg = make_cfg()
    model, _, _ = finished(cfg)
    for path in (model, model.parent):  # the model folder, or its run folder
        found = artifacts.load(path)
        assert found.kind == artifacts.TEXT_CLASSIFIER and found.labels == ["negative", "positive"]
        assert found.tokenizer is not None and found.preprocessing["text"]["max_length"] == cfg.data.max_length
    plain = artifacts.load(tiny_hf_dir)  # written by save_pretrained, no card
    assert plain.kind == artifacts.MASKED_LM and plain.card == {}
    with pytest.raises(Exception, match="holds a masked-lm"):
        artifacts.load(tiny_hf_dir, kind=artifacts.TEXT_CLASSIFIER)


def test_checkpoint_carries_its_config_and_rebuilds_from_it(make_cfg, tmp_path: Path) -> None:
    from conftest import compose_cfg, expect_error

    cfg = make_cfg("model.hidden_size=64", "model.intermediate_size=128")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    best = json.loads((out / "metrics.json").read_text())["best_checkpoint"]
    trained = json.loads((out / "metrics.json").read_text())["metrics"]["test/acc"]
    # no model overrides: the checkpoint's own model config is used
    again = compose_cfg(["train=false", f"ckpt_path={best}", "trainer.limit_test_batches=2"], tmp_path / "eval")
    run(again)
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["test/acc"]
    assert evaluated == trained
    other = compose_cfg(["train=false", f"ckpt_path={best}", "model.hidden_size=32"], tmp_path / "other")
    expect_error(other, "trained with another model config", "model.hidden_size=32 here vs 64 in the checkpoint")
