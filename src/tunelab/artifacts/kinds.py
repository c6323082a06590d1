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
