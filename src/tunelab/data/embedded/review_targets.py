"""The embedded reviews' regression and multi-label targets, read off what the generator wrote.

`stars` weighs the polarity of each sentiment phrase against the review's final one; `aspects` finds the
generic aspect tags whose phrases the text contains. Both follow the text, so a model reading it can learn them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

FAINT = 0.5  # weight of a negated sentiment phrase in the star rating: "not bad" is weaker than "good"
STAR_CUTS = (0.9, 0.25)  # net support for the final polarity from which a review gets 5 (or 1), 4 (or 2) stars

# Generic aspect tags and the phrases that name them, across domains. Aspect nouns are matched with their
# article ("the screen", not "the menu screen"); the sets overlap rarely enough for a bag of words.
TAG_PHRASES = {
    "content": ("the plot", "the storyline", "the ending", "the main character", "the first chapter",
                "the pacing", "the script", "the plot twist", "the director's cut", "the bonus material",
                "drags on for pages", "loses the thread", "falls apart in the last act", "cuts off the ending",
                "drags in the middle", "keeps me turning the pages", "pulls me in", "puts me to sleep",
                "makes me laugh out loud", "stays with me", "rewards a second reading", "falls flat",
                "has the whole family laughing", "keeps me on the edge of my seat",
                "brings back childhood memories", "gets better every time"),
    "design": ("the touchpad", "the power button", "the volume control", "the charging port", "the handle",
               "the lid", "the base", "the grip", "the latch", "the carafe", "the finish", "the bottom",
               "wobbles on the stove", "fits neatly in the cupboard", "it matches the rest of our kitchen",
               "it fits in the drawer"),
    "durability": ("the battery life", "overheats", "drains the battery", "shuts off at random", "lasts all day",
                   "rusts after one wash", "scratches at the slightest touch", "holds an edge",
                   "leaks all over the counter", "holds up on repeat viewing", "skips in the second half",
                   "durable", "sturdy", "heavy duty", "solidly built", "flimsy", "rickety", "rusty", "warped",
                   "chipped", "reliable", "unreliable"),
    "purchase": ("i bought it", "i ordered it", "it arrived", "shipping took", "the price was",
                 "from this seller"),
    "quality": ("the writing", "the prose", "the dialogue", "the narrator", "the translation",
                "the author's voice", "the acting", "the lead actor", "the soundtrack", "the audio mix",
                "the picture quality", "the cinematography", "the special effects", "the sound quality",
                "the microphone", "the screen", "the display", "the blade", "the coating", "heats evenly",
                "burns everything", "brews a full pot", "charges in under an hour", "reads like a rough draft"),
    "usability": ("the setup process", "the firmware", "the bluetooth connection", "the temperature dial",
                  "the power cord", "pairs instantly", "connects without any fuss", "wakes up instantly",
                  "cleans up in seconds", "freezes on the menu screen", "crashes during updates", "easy to clean",
                  "dishwasher safe", "intuitive", "finicky"),
}
ASPECT_TAGS = tuple(sorted(TAG_PHRASES))
WHOLE_PRODUCT = "quality"  # the tag of a review that names no aspect: its opinion is of the product as a whole
MAX_TAGS, LEAST_TAG = 4, "purchase"  # the rare review naming all five of its domain's tags loses its purchase
_TAG_PATTERNS = {tag: re.compile(r"\b(?:" + "|".join(map(re.escape, phrases)) + r")\b")
                 for tag, phrases in TAG_PHRASES.items()}


def stars(said: Sequence[tuple[int, bool]], p: int) -> int:
    """1-5 stars from the net share of sentiment phrases agreeing with the final polarity p.

    Agreeing phrases add 1 and opposed ones subtract 1 (FAINT if negated), over the number of phrases, so
    plain unanimous praise gets 5 (blame 1), a contrast or faint words 4 (or 2), an overruled body 3.
    """
    net = sum((1 if q == p else -1) * (FAINT if negated else 1) for q, negated in said) / len(said)
    strength = 2 if net >= STAR_CUTS[0] else 1 if net >= STAR_CUTS[1] else 0
    return 3 + strength if p else 3 - strength


def aspects(text: str) -> list[str]:
    """The sorted tags of ASPECT_TAGS whose phrases `text` contains: read from the words, so learnable."""
    found = [tag for tag in ASPECT_TAGS if _TAG_PATTERNS[tag].search(text)]
    if len(found) > MAX_TAGS:
        found.remove(LEAST_TAG)
    return found or [WHOLE_PRODUCT]
