"""Tuning methods: which parameters each trains, layer-wise rates, LoRA export, model-appropriate defaults."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_cfg, run_cli

from tunelab.errors import TunelabError
from tunelab.models.text import TextModel
from tunelab.models.tuning import Tuning, trainable_summary
from tunelab.tasks.base import Task

LABELS = ["negative", "positive"]


def text_model(folder: Path) -> TextModel:
    torch.manual_seed(0)
    return TextModel("classifier", LABELS, pretrained=str(folder))


def image_model():
    from tunelab.models.vision import ImageModel

    return ImageModel("classifier", ["a", "b", "c"], name="resnet10t")


def trained(model: torch.nn.Module, tuning: Tuning) -> set[str]:
    tuning.apply(model)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(5, 40, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long)}


# ----------------------------------------------------------------------------- which parameters train
def test_each_method_trains_exactly_its_parameters_text(tiny_hf_dir: Path) -> None:
    every = {n for n, _ in text_model(tiny_hf_dir).named_parameters()}
    head = {"net.classifier.weight", "net.classifier.bias"}
    assert trained(text_model(tiny_hf_dir), Tuning("full")) == every
    assert trained(text_model(tiny_hf_dir), Tuning("head")) == head
    top = {n for n in every if ".encoder.layer.1." in n or ".pooler." in n} | head
    assert trained(text_model(tiny_hf_dir), Tuning("top_k", k=1)) == top
    assert trained(text_model(tiny_hf_dir), Tuning("top_k", k=2)) == {n for n in every if "embeddings" not in n}
    assert trained(text_model(tiny_hf_dir), Tuning("bitfit")) == {n for n in every if n.endswith(".bias")} | head

    model = text_model(tiny_hf_dir)
    names = trained(model, Tuning("lora", rank=4))
    adapters = {f"net.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.default.weight"
                for i in range(2) for m in ("query", "value") for ab in "AB"}
    assert names == adapters | head
    width = model.net.config.hidden_size
    assert trainable_summary(model)["params/trainable"] == 2 * 2 * (2 * 4 * width) + 2 * width + 2


def test_each_method_trains_exactly_its_parameters_image() -> None:
    every = {n for n, _ in image_model().named_parameters()}
    head = {"net.fc.weight", "net.fc.bias"}
    assert trained(image_model(), Tuning("head")) == head
    assert trained(image_model(), Tuning("top_k", k=1)) == {n for n in every if n.startswith("net.layer4.")} | head
    assert trained(image_model(), Tuning("bitfit")) == {n for n in every if n.endswith(".bias")} | head
    lora = trained(image_model(), Tuning("lora"))
    assert lora - head and all("lora_" in n and ".conv" in n for n in lora - head), sorted(lora)


def test_head_only_keeps_the_frozen_backbone_in_eval_mode() -> None:
    model, tuning = image_model(), Tuning("head")
    tuning.apply(model)
    model.train()
    tuning.train_modes(model)
    assert not model.net.bn1.training and model.classifier.training


# ----------------------------------------------------------------------------- learning rates
def rates(model: torch.nn.Module, tuning: Tuning, lr: float = 1e-3) -> dict[str, float]:
    """Each parameter's learning rate in the optimizer the base Task builds."""
    task = Task(functools.partial(torch.optim.AdamW, lr=lr), tuning=tuning)
    task.model = model
    task.tune()
    optimizer = task.configure_optimizers()
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_layer_wise_decay_gives_each_layer_the_rate_above_it_times_decay(tiny_hf_dir: Path) -> None:
    lr, d = 1e-3, 0.5
    got = rates(text_model(tiny_hf_dir), Tuning("full", layer_decay=d), lr)  # 2 layers: depths 0..4
    expected = {"net.bert.embeddings.word_embeddings.weight": lr * d**4,
                "net.bert.embeddings.LayerNorm.bias": lr * d**4,
                "net.bert.encoder.layer.0.attention.self.query.weight": lr * d**3,
                "net.bert.encoder.layer.1.output.dense.bias": lr * d**2,
                "net.bert.pooler.dense.weight": lr * d,
                "net.classifier.weight": lr}
    for name, rate in expected.items():
        assert got[name] == pytest.approx(rate), name
    assert len(got) == len(list(text_model(tiny_hf_dir).parameters()))  # every parameter has a group


def test_backbone_multiplier_and_frozen_parameters_stay_out(tiny_hf_dir: Path) -> None:
    got = rates(text_model(tiny_hf_dir), Tuning("full", backbone_lr_mult=0.1))
    assert got["net.classifier.bias"] == pytest.approx(1e-3)
    assert got["net.bert.encoder.layer.0.output.dense.weight"] == pytest.approx(1e-4)
    assert set(rates(text_model(tiny_hf_dir), Tuning("head"))) == {"net.classifier.weight", "net.classifier.bias"}


# ----------------------------------------------------------------------------- defaults that suit the model
@pytest.mark.parametrize(("overrides", "lr"), [
    ([], 5e-4),                                           # the from-scratch bert_tiny default run
    (["model.pretrained=DIR"], 5e-5),                     # a pretrained encoder, fully fine-tuned
    (["model=hf", "model.pretrained=DIR"], 5e-5),
    (["model.pretrained=DIR", "tuning=lora"], 5e-4),
    (["model.pretrained=DIR", "tuning=llrd"], 1e-4),
    (["model.pretrained=DIR", "optimizer.lr=1e-3"], 1e-3),  # an explicit rate wins
    (["model.pretrained=DIR", "experiment=reviews_finetune_small"], 3e-4),  # and so does an experiment's
    (["task=dann", "model.pretrained_file=w.safetensors"], 5e-5),
])
def test_optimizer_default_follows_tuning_and_model(overrides: list[str], lr: float, tiny_hf_dir: Path,
                                                    tmp_path: Path) -> None:
    cfg = compose_cfg([o.replace("DIR", str(tiny_hf_dir)) for o in overrides], tmp_path / "run")
    assert cfg.optimizer.lr == pytest.approx(lr)


# ----------------------------------------------------------------------------- LoRA export
def lora_model(folder: Path) -> TextModel:
    model, tuning = text_model(folder), Tuning("lora", rank=4)
    tuning.apply(model)
    with torch.no_grad():  # trained adapters and head, as after some steps
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return model.eval()


def test_merged_lora_equals_base_plus_adapter(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from tunelab import artifacts
    from tunelab.artifacts import adapters
    from tunelab.models import lora

    model = lora_model(tiny_hf_dir)
    task = Task(functools.partial(torch.optim.AdamW, lr=1e-3), tuning=Tuning("lora", rank=4))
    task.model, task.tuned_attr, task.labels = model, "model", LABELS
    with torch.no_grad():
        expected = model(batch()).logits
    artifacts.save(tmp_path / "model", lora.merged(model), labels=LABELS, card={"task": "finetune"})
    card = {"task": "finetune", "parents": [artifacts.parent("pretrained", str(tiny_hf_dir))]}
    adapters.save_for(task, tmp_path / "model" / "adapter", card)

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=2)
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "model" / "adapter").eval()
    inputs = batch()
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)
        assert torch.allclose(with_adapter(**inputs).logits, expected, atol=1e-5)
        loaded = artifacts.load(tmp_path / "model" / "adapter")
        assert loaded.kind == "lora-adapter" and torch.allclose(loaded.net(inputs).logits, expected, atol=1e-5)
    adapter_card = json.loads((tmp_path / "model" / "adapter" / "tunelab.json").read_text())
    assert adapter_card["base_model"]["source"] == str(tiny_hf_dir.resolve())
    assert adapter_card["base_model"]["sha256"] == artifacts.weights_digest(tiny_hf_dir)


def test_lora_adapter_refuses_a_changed_base(tiny_hf_dir: Path, tmp_path: Path) -> None:
    import shutil

    from tunelab import artifacts
    from tunelab.artifacts import adapters
    from tunelab.models import lora

    base = tmp_path / "base"
    shutil.copytree(tiny_hf_dir, base)
    model = lora_model(base)
    adapters.save(tmp_path / "adapter", lora.peft_model(model, str(base)), base=artifacts.parent("pretrained", base),
                  labels=LABELS, modality="text")
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(TunelabError, match="other weights than the adapter was trained on"):
        artifacts.load(tmp_path / "adapter")


# ----------------------------------------------------------------------------- bad settings
def test_lora_targets_that_match_nothing_list_the_modules_there(tiny_hf_dir: Path) -> None:
    with pytest.raises(TunelabError, match=r"matches no module .*query.*value"):
        Tuning("lora", target_modules=["qkv"]).apply(text_model(tiny_hf_dir))


@pytest.mark.parametrize(("settings", "message"), [
    ({"method": "prefix"}, "tuning.method='prefix' (expected one of full, head"),
    ({"method": "top_k"}, "tuning.k=None (expected the number of last blocks"),
    ({"method": "lora", "layer_decay": 0.8}, "applies to tuning=full or top_k"),
    ({"layer_decay": 1.5}, "tuning.layer_decay=1.5 (expected a number in (0, 1]"),
])
def test_bad_tuning_settings_fail_with_the_key(settings: dict, message: str) -> None:
    with pytest.raises(TunelabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Tuning(**settings)


def test_top_k_beyond_the_blocks_fails(tiny_hf_dir: Path) -> None:
    with pytest.raises(TunelabError, match=r"tuning.k=5 exceeds the model's 2 blocks"):
        Tuning("top_k", k=5).apply(text_model(tiny_hf_dir))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_lora_run_logs_trainable_share_and_writes_merged_model_and_adapter(tiny_hf_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(*FAST, f"model.pretrained={tiny_hf_dir}", "tuning=lora", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable parameters:" in proc.stderr + proc.stdout
    run = (tmp_path / "logs" / "finetune" / "latest").resolve()
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert 0 < metrics["params/trainable_pct"] < 20 and metrics["params/trainable"] < metrics["params/total"]
    adapter = run / "model" / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size < 0.5 * (run / "model" / "model.safetensors").stat().st_size
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "params/trainable_pct" in events.Tags()["scalars"]


# ----------------------------------------------------------------------------- the few-shot study
def test_fewshot_methods_pick_task_tuning_and_a_small_validation_set(tiny_hf_dir: Path, tmp_path: Path) -> None:
    base = ["experiment=reviews_fewshot", f"model.pretrained={tiny_hf_dir}", "data.limit_train_per_class=8"]
    for method, target, tuning, lr in (("head", "finetune.FinetuneTask", "head", 2e-3),
                                       ("lora", "finetune.FinetuneTask", "lora", 5e-4),
                                       ("prompt", "prompt.PromptTask", "full", 5e-5)):
        cfg = compose_cfg([*base, f"fewshot_method={method}"], tmp_path / method)
        assert cfg.task._target_.endswith(target) and cfg.tuning.method == tuning and cfg.optimizer.lr == lr
        assert cfg.data.limit_val_per_class == 8 and cfg.data.seed == cfg.seed


def test_limit_val_per_class_draws_a_class_balanced_validation_subset(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from tunelab.data.text import TextDataModule

    rows = [{"text": f"the book product is {w}", "label": w} for w in ("good", "bad") for _ in range(20)]
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = TextDataModule(str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"), str(tmp_path / "val.jsonl"),
                        limit_train_per_class=4, limit_val_per_class=3, tokenizer=str(tiny_hf_dir),
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert sorted(dm.datasets["val"]["labels"]) == [0, 0, 0, 1, 1, 1]
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["test"]) == 40


def test_sweep_summary_tables_mean_and_std_per_method_and_k(tmp_path: Path) -> None:
    from tunelab.sweep_summary import write

    for i, (method, k, seed, acc) in enumerate([("full", 8, 1, 0.6), ("full", 8, 2, 0.8), ("lora", 8, 1, 0.7),
                                                ("full", 16, 1, 0.9)]):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(
            f"- seed={seed}\n- data.limit_train_per_class={k}\n- fewshot_method={method}\n")
        (job / "metrics.json").write_text(json.dumps({"metrics": {"test/acc": acc, "params/trainable_pct": 1.0}}))
    text = write(tmp_path, "fewshot_method", "data.limit_train_per_class")
    assert "| full | 70.0 ± 14.1 (n=2) | 90.0 ± 0.0 (n=1) |" in text
    assert "| lora | 70.0 ± 0.0 (n=1) |  |" in text
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 4
