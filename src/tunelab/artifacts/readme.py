"""The human model card (`README.md` in the Hugging Face convention) written next to every card."""

from __future__ import annotations

import json
from typing import Any

from tunelab.artifacts.kinds import CARD, IMAGE_CLASSIFIER, MASKED_LM, PROMPT_CLASSIFIER, TEXT_CLASSIFIER

LOAD_SNIPPET = {
    TEXT_CLASSIFIER: ('from transformers import AutoModelForSequenceClassification, AutoTokenizer\n'
                      'model = AutoModelForSequenceClassification.from_pretrained("{path}")\n'
                      'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
                      'inputs = tokenizer(["a text"], truncation=True, max_length={max_length}, return_tensors="pt")\n'
                      'label = model.config.id2label[model(**inputs).logits.argmax(-1).item()]'),
    MASKED_LM: ('from transformers import pipeline\n'
                'fill = pipeline("fill-mask", model="{path}")\n'
                'fill("this product is [MASK].")'),
    IMAGE_CLASSIFIER: ('import timm\n'
                       'net = timm.create_model("local-dir:{path}", pretrained=True).eval()\n'
                       'config = timm.data.resolve_data_config(model=net)   # {size}\n'
                       'transform = timm.data.create_transform(**config)'),
    # a masked LM: put the text into the card's prompt.templates, score prompt.verbalizer's words at the mask
    PROMPT_CLASSIFIER: ('from transformers import pipeline\n'
                        'fill = pipeline("fill-mask", model="{path}")   # templates, verbalizer: tunelab.json "prompt"\n'
                        'fill("a text overall, it is [MASK].", targets=["terrible", "great"])'),
}


def model_card(card: dict[str, Any]) -> str:
    """A Hugging Face style README.md: what the model is, how to load it, its metrics, how it was made."""
    kind = card["kind"]
    library = "timm" if kind == IMAGE_CLASSIFIER else "transformers"
    text = card.get("preprocessing", {}).get("text", {})
    image = card.get("preprocessing", {}).get("image", {})
    snippet = LOAD_SNIPPET[kind].format(path=card.get("path", "."), max_length=text.get("max_length"),
                                        size=f"input_size {image.get('input_size')}")
    metrics = card.get("metrics") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if isinstance(v, float))
    parents = "\n".join(f"- {p['role']}: `{p['source']}` (sha256 {str(p.get('sha256'))[:16]})"
                        for p in card.get("parents") or []) or "- none (trained from scratch)"
    labels = ", ".join(card.get("labels") or []) or "none"
    return f"""---
library_name: {library}
tags: [tunelab, {kind}]
---

# {kind} made by `task={card.get("task")}`

A {kind.replace("-", " ")} trained with tunelab. Labels: {labels}.

## How to load it (no tunelab needed)

```python
{snippet}
```

Preprocessing: `{json.dumps(card.get("preprocessing"))}`.

## Metrics

| metric | value |
| --- | --- |
{rows or "| (none) | |"}

## How it was made

- run: `{card.get("run", {}).get("folder")}` (its resolved config is in `{CARD}`)
{parents}
- versions: {", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items() if v)}
"""
