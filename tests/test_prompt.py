"""Prompt-based fine-tuning: prompt rows, a loss over the label words alone, the exported classifier, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CACHE, FAST, compose_cfg, run_cli

from tunelab.data.prompts import PromptCollator
from tunelab.errors import TunelabError
from tunelab.models.prompt_classifier import PromptClassifier
from tunelab.models.text import TextModel

LABELS = ["negative", "positive"]
TEMPLATE = "{text} the product is {mask}"  # words of the tiny vocabulary
VERBALIZER = {"negative": ["bad"], "positive": ["good", "fine"]}


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_dir)


def classifier(folder: Path, tokenizer, templates: list[str] | None = None) -> PromptClassifier:
    torch.manual_seed(0)
    lm = TextModel("masked_lm", tokenizer=tokenizer, pretrained=str(folder))
    return PromptClassifier(lm, tokenizer, templates or [TEMPLATE], VERBALIZER, LABELS, 32).eval()


def records(tokenizer, texts=("the book product is good", "the kettle is bad and the phone is fine")) -> list:
    return [{"input_ids": tokenizer(t)["input_ids"], "labels": i % 2} for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------- prompt rows
def test_prompt_rows_put_the_text_and_one_mask_where_the_template_says(tokenizer) -> None:
    batch = PromptCollator(tokenizer, [TEMPLATE, "[MASK] film {text}"], max_length=32)(records(tokenizer))
    first = tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert first == ["[CLS]", "the", "book", "product", "is", "good", "the", "product", "is", "[MASK]", "[SEP]"]
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][2][:4].tolist()) == ["[CLS]", "[MASK]", "film", "the"]
    predicted = batch["mlm_labels"] != -100
    assert predicted.sum(1).tolist() == [1, 1, 1, 1]  # one position per row: the mask, under each template
    assert (batch["input_ids"][predicted] == tokenizer.mask_token_id).all()
    assert batch["labels"].tolist() == [0, 1]


def test_long_texts_are_cut_so_the_template_still_fits(tokenizer) -> None:
    long = records(tokenizer, ["the book product is good " * 20])
    batch = PromptCollator(tokenizer, [TEMPLATE], max_length=16)(long)
    assert batch["input_ids"].shape[1] == 16
    assert tokenizer.convert_ids_to_tokens(batch["input_ids"][0][-5:].tolist()) == ["the", "product", "is", "[MASK]",
                                                                                     "[SEP]"]


# ----------------------------------------------------------------------------- the loss
def test_scores_come_from_the_label_words_logits_at_the_mask_only(tiny_hf_dir: Path, tokenizer) -> None:
    model = classifier(tiny_hf_dir, tokenizer)
    batch = PromptCollator(tokenizer, [TEMPLATE], 32)(records(tokenizer))
    words = tokenizer.convert_tokens_to_ids(["bad", "good", "fine"])
    with torch.no_grad():  # reference: the stock full-vocabulary forward pass, read at the mask
        full = model.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at_mask = full[batch["mlm_labels"] != -100][:, words]
        expected = torch.stack([at_mask[:, 0], at_mask[:, 1:].mean(1)], 1).log_softmax(-1)
        assert torch.allclose(model(batch).logits, expected, atol=1e-5)

    bias = model.lm.vocab_projection.bias
    others = torch.ones_like(bias, dtype=torch.bool)
    others[words] = False
    loss = torch.nn.functional.cross_entropy(model(batch).logits, batch["labels"])
    loss.backward()
    assert bias.grad[others].abs().max() == 0 and bias.grad[words].abs().min() > 0
    with torch.no_grad():  # no other word's logit can change the loss
        bias[others] += torch.randn(int(others.sum()))
        assert torch.allclose(torch.nn.functional.cross_entropy(model(batch).logits, batch["labels"]), loss)


def test_several_templates_average_their_scores(tiny_hf_dir: Path, tokenizer) -> None:
    both = classifier(tiny_hf_dir, tokenizer, [TEMPLATE, "{text} the film is {mask}"])
    plain = {"input_ids": torch.tensor([tokenizer("the film is good")["input_ids"]])}
    with torch.no_grad():
        alone = [classifier(tiny_hf_dir, tokenizer, [t])(plain).logits for t in (TEMPLATE, "{text} the film is {mask}")]
        assert torch.allclose(both(plain).logits, (alone[0] + alone[1]) / 2, atol=1e-5)


# ----------------------------------------------------------------------------- the exported classifier
def test_exported_classifier_carries_its_prompt_and_predicts_from_plain_batches(tiny_hf_dir: Path, tokenizer,
                                                                                  tmp_path: Path) -> None:
    from tunelab import artifacts

    model = classifier(tiny_hf_dir, tokenizer)
    artifacts.save(tmp_path / "model", model, labels=LABELS, tokenizer=tokenizer, max_length=32,
                   card={"task": "prompt"})
    card = json.loads((tmp_path / "model" / "tunelab.json").read_text())
    assert card["kind"] == "prompt-classifier"
    assert card["prompt"] == {"templates": [TEMPLATE], "verbalizer": VERBALIZER, "max_length": 32}
    loaded = artifacts.load(tmp_path / "model")
    assert loaded.kind == "prompt-classifier" and loaded.labels == LABELS
    texts = ["the book product is good", "the kettle is bad"]
    plain = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    prompted = PromptCollator(tokenizer, [TEMPLATE], 32)(records(tokenizer, texts))
    with torch.no_grad():
        assert torch.allclose(loaded.net(dict(plain)).logits, model(prompted).logits, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("template", "message"), [
    ("It was {mask}.", "has 0 {text} slots"),
    ("{text} It was great.", "has 0 {mask} slots"),
    ("{text} {mask} and {mask}", "has 2 {mask} slots"),
])
def test_templates_need_one_text_and_one_mask_slot(template: str, message: str) -> None:
    from tunelab.cloze import check_template

    with pytest.raises(TunelabError, match=message.replace("{", r"\{").replace("}", r"\}")):
        check_template(template)


def test_a_verbalizer_word_of_several_tokens_is_named(tiny_hf_dir: Path, tokenizer) -> None:
    lm = TextModel("masked_lm", tokenizer=tokenizer, pretrained=str(tiny_hf_dir))
    with pytest.raises(TunelabError, match=r"task.verbalizer.positive: 'goodness' is \d tokens"):
        PromptClassifier(lm, tokenizer, [TEMPLATE], {"negative": ["bad"], "positive": ["goodness"]}, LABELS, 32)
    with pytest.raises(TunelabError, match=r"labels \['positive'\] have no words"):
        PromptClassifier(lm, tokenizer, [TEMPLATE], {"negative": ["bad"]}, LABELS, 32)


def test_config_checks_catch_slots_and_a_backbone_without_masked_lm_head(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from tunelab.run_checks import check_values

    classifier_dir = tmp_path / "classifier"
    AutoModelForSequenceClassification.from_pretrained(tiny_hf_dir, num_labels=2).save_pretrained(classifier_dir)
    cases = [
        (["task.templates=['It was {mask}']"], "task.templates[0]: 'It was {mask}' has 0 {text} slots"),
        ([f"model.pretrained={classifier_dir}"], "is a BertForSequenceClassification, which has no masked-LM head"),
    ]
    for overrides, message in cases:
        cfg = compose_cfg(["task=prompt", f"model.pretrained={tiny_hf_dir}", *overrides], tmp_path / "run")
        with pytest.raises(TunelabError, match=message.replace("{", r"\{").replace("}", r"\}").replace("[", r"\[")):
            check_values(cfg)
    check_values(compose_cfg(["task=prompt", f"model.pretrained={tiny_hf_dir}"], tmp_path / "run"))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_prompt_run_exports_a_classifier_that_reproduces_its_test_accuracy(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from tunelab import artifacts

    words = ["task.verbalizer.negative=[bad]", "task.verbalizer.positive=[good]", "task.templates=['{text} the film is {mask}']"]
    proc = run_cli(*FAST, "task=prompt", f"model.pretrained={tiny_hf_dir}", *words, "data.limit_train_per_class=8",
                   "trainer.limit_test_batches=null", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = (tmp_path / "logs" / "prompt" / "latest").resolve()
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    loaded = artifacts.load(run)
    assert loaded.kind == "prompt-classifier"
    test_file = CACHE / "data" / "reviews" / "all" / "test.jsonl"
    rows = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]
    correct = 0
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        enc = loaded.tokenizer([r["text"] for r in chunk], truncation=True, max_length=128, padding=True,
                               return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            predicted = loaded.net(dict(enc)).logits.argmax(-1).tolist()
        correct += sum(loaded.labels[p] == r["label"] for p, r in zip(predicted, chunk, strict=True))
    assert correct / len(rows) == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_multi_token_verbalizer_word_stops_the_run_with_exit_2(tiny_hf_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(*FAST, "task=prompt", f"model.pretrained={tiny_hf_dir}", "task.verbalizer.negative=[bad]",
                   "task.verbalizer.positive=[goodness]", cwd=tmp_path)
    assert proc.returncode == 2 and "task.verbalizer.positive: 'goodness'" in proc.stderr, proc.stderr[-2000:]
