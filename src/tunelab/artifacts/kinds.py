"""The kinds of artifact a `model/` folder can hold, and the card's file name."""

CARD = "tunelab.json"
TEXT_CLASSIFIER, MASKED_LM, IMAGE_CLASSIFIER = "text-classifier", "masked-lm", "image-classifier"
KINDS = (TEXT_CLASSIFIER, MASKED_LM, IMAGE_CLASSIFIER)
WORDS = {TEXT_CLASSIFIER: "sequence classifier", MASKED_LM: "masked language model",
         IMAGE_CLASSIFIER: "image classifier"}

# Kinds whose folders need more than their ecosystem's own loader (pruned shapes, ONNX graphs, adapters,
# prompt classifiers): kind -> "module:function(folder, card, config, role) -> Artifact". Each such kind
# lives in its own module of this package and adds itself here and to WORDS.
LOADERS: dict[str, str] = {}

# compression (tunelab.compress): pruned shapes, int8 PyTorch weights, ONNX graphs
PRUNED, INT8, ONNX = "pruned-classifier", "int8-classifier", "onnx-classifier"
WORDS.update({PRUNED: "pruned classifier", INT8: "int8 classifier", ONNX: "ONNX classifier"})
LOADERS.update({PRUNED: "tunelab.artifacts.pruned:load", INT8: "tunelab.artifacts.quantized:load",
                ONNX: "tunelab.artifacts.onnx:load"})

# parameter-efficient and prompt-based fine-tuning: a LoRA adapter alone (peft's format, over its base model),
# and a masked LM that classifies through a cloze template and a verbalizer
LORA_ADAPTER, PROMPT_CLASSIFIER = "lora-adapter", "prompt-classifier"
ADAPTER_CONFIG = "adapter_config.json"  # what marks a peft adapter folder (it has no config.json)
WORDS.update({LORA_ADAPTER: "LoRA adapter", PROMPT_CLASSIFIER: "prompt-based classifier"})
LOADERS.update({LORA_ADAPTER: "tunelab.artifacts.adapters:load", PROMPT_CLASSIFIER: "tunelab.artifacts.prompt:load"})
