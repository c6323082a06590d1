"""Synthetic multi-domain product reviews, after the Blitzer et al. (2007) sentiment benchmark.

Four domains have their own products, aspects and sentiment words and share general sentiment words
and neutral filler, so a bag-of-words model transfers imperfectly across domains (domain adaptation)
and the unlabelled text ties domain words to domain nouns (masked-language-model pretraining).

The label is always the polarity of the review's last clause (2% of labels are flipped as noise).
Negation ("not gripping"), contrast ("..., but ...") and mixed reviews whose verdict overrides the body
cap a bag-of-words classifier at about 0.85 test accuracy, while a model that reads word order can
learn the rule and approach the 0.98 that the noise allows.

Every labelled record also carries two targets for regression and multi-label problems, both derived
without new random draws, so `text`, `label` and `domain` are exactly those of version 2:

- `stars` (int, 1-5): the rating the text supports, from the polarity of each sentiment phrase against
  the final one, a negated phrase ("not bad") counting as faint. A review of plain, unanimous praise gets
  5 (blame 1), one with a contrast or faint words 4 (or 2), a verdict overruling its body 3. Stars follow
  the text, so positive labels have 3-5 stars and negative ones 1-3, except where noise flipped the label.
- `aspects` (sorted list of 1-4 str from ASPECT_TAGS): the generic aspects the text names, read from the
  text itself through TAG_PHRASES (the domains' aspect nouns, telling verbs and adjectives, and the
  purchase fillers); a review naming none judges the product as a whole and is tagged "quality".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from tunelab.data.embedded.review_targets import aspects, stars

VERSION = "3"
SEED = 2007
DOMAINS = ("books", "dvd", "electronics", "kitchen")
LABELS = ("negative", "positive")  # polarity index 0 / 1
SPLIT_SIZES = {"train": 1600, "val": 200, "test": 400}
UNLABELLED_SIZE = 6000
NOISE = 0.02  # fraction of labelled reviews whose label is flipped, like real annotation noise
MIN_WORDS, MAX_WORDS = 20, 60
MAX_SENTENCES = 5

# How reviews are built; tuned together so that a bag-of-words classifier misreads about one in seven.
KIND_WEIGHTS = {"plain": 0.6, "contrast": 0.28, "mixed": 0.12}
NEGATION = 0.12  # chance a sentiment phrase is written as a negated opposite
DOMAIN_WORDS = 0.6  # chance an adjective comes from the domain rather than the shared pool
OPINIONS = (2, 3)  # opinion sentences besides any contrast or verdict
VERDICT = 0.55  # chance a plain or contrast review ends on a verdict sentence

T = TypeVar("T")


@dataclass(frozen=True)
class Domain:
    """Vocabulary of one domain; each pair of pools is (negative, positive)."""

    name: str
    products: tuple[str, ...]
    aspects: tuple[str, ...]
    adjectives: tuple[tuple[str, ...], tuple[str, ...]]
    actions: tuple[tuple[str, ...], tuple[str, ...]]  # present-tense verb phrases, negated with "never"
    fillers: tuple[str, ...]


BOOKS = Domain(
    name="books",
    products=("book", "novel", "memoir", "paperback", "biography", "thriller", "story collection"),
    aspects=("plot", "writing", "ending", "pacing", "dialogue", "main character", "prose",
             "first chapter", "storyline", "narrator", "translation", "author's voice"),
    adjectives=(
        ("tedious", "predictable", "shallow", "long-winded", "pretentious", "repetitive", "dull",
         "cliched", "unconvincing", "poorly edited"),
        ("gripping", "insightful", "moving", "beautifully written", "thought-provoking", "compelling",
         "witty", "engrossing", "vivid", "well researched"),
    ),
    actions=(
        ("drags on for pages", "loses the thread halfway through", "puts me to sleep",
         "reads like a rough draft", "falls apart in the last act"),
        ("keeps me turning the pages", "stays with me after the last chapter", "makes me laugh out loud",
         "rewards a second reading", "pulls me in from the first page"),
    ),
    fillers=("i read it over a long weekend.", "it is the {ordinal} book in the series.",
             "i picked it up for my book club.", "i read it on the train to work.",
             "the hardcover edition has {number} chapters.", "i borrowed this {product} from my {who}."),
)

DVD = Domain(
    name="dvd",
    products=("movie", "film", "dvd", "box set", "documentary", "season", "comedy", "concert video"),
    aspects=("acting", "soundtrack", "picture quality", "script", "cinematography", "lead actor",
             "plot twist", "special effects", "director's cut", "audio mix", "bonus material", "ending"),
    adjectives=(
        ("grainy", "badly dubbed", "choppy", "cheesy", "overacted", "washed out", "forgettable",
         "out of sync", "muddy", "poorly lit"),
        ("hilarious", "stunning", "suspenseful", "charming", "touching", "well acted", "beautifully shot",
         "entertaining", "haunting", "riveting"),
    ),
    actions=(
        ("skips in the second half", "freezes on the menu screen", "drags in the middle",
         "cuts off the ending", "falls flat"),
        ("has the whole family laughing", "holds up on repeat viewing", "keeps me on the edge of my seat",
         "brings back childhood memories", "gets better every time i watch it"),
    ),
    fillers=("we watched it on a friday night.", "the disc includes a commentary track.",
             "it runs about {number} minutes longer than the theatrical version.",
             "i saw it in theaters years ago.", "the case has a slipcover.", "we watched it with my {who}."),
)

ELECTRONICS = Domain(
    name="electronics",
    products=("headset", "charger", "camera", "speaker", "keyboard", "router", "tablet", "mouse",
              "monitor", "remote"),
    aspects=("battery life", "screen", "sound quality", "bluetooth connection", "touchpad", "charging port",
             "microphone", "setup process", "firmware", "display", "power button", "volume control"),
    adjectives=(
        ("laggy", "glitchy", "fuzzy", "sluggish", "unreliable", "distorted", "finicky", "unresponsive",
         "dim", "tinny"),
        ("crisp", "responsive", "reliable", "lightweight", "fast", "intuitive", "bright", "compact",
         "seamless", "snappy"),
    ),
    actions=(
        ("overheats after an hour", "drops the connection every few minutes", "drains the battery overnight",
         "shuts off at random", "crashes during updates"),
        ("pairs instantly with my phone", "charges in under an hour", "lasts all day on one charge",
         "connects without any fuss", "wakes up instantly"),
    ),
    fillers=("i use it mostly at work.", "it comes with a usb cable and a manual.",
             "i replaced my old {product} with it.", "the box includes a wall adapter.",
             "i use it with my laptop {number} hours a day.", "my {who} has the older model."),
)

KITCHEN = Domain(
    name="kitchen",
    products=("blender", "skillet", "knife", "toaster", "coffee maker", "cutting board", "kettle",
              "mixing bowl", "saucepan", "food processor"),
    aspects=("handle", "lid", "blade", "coating", "base", "finish", "carafe", "power cord",
             "temperature dial", "latch", "bottom", "grip"),
    adjectives=(
        ("flimsy", "rusty", "wobbly", "leaky", "warped", "blunt", "chipped", "stained", "rickety",
         "scratched"),
        ("sturdy", "durable", "easy to clean", "heavy duty", "well balanced", "dishwasher safe",
         "razor sharp", "solidly built", "slick", "spotless"),
    ),
    actions=(
        ("rusts after one wash", "leaks all over the counter", "wobbles on the stove",
         "scratches at the slightest touch", "burns everything on the bottom"),
        ("heats evenly", "cleans up in seconds", "holds an edge for months", "fits neatly in the cupboard",
         "brews a full pot in minutes"),
    ),
    fillers=("i use it almost every day.", "it fits in the drawer next to the stove.",
             "i replaced my old {product} with it.", "we cook for a family of {number}.",
             "it matches the rest of our kitchen.", "my {who} uses it for baking."),
)

DOMAIN_SPECS = {d.name: d for d in (BOOKS, DVD, ELECTRONICS, KITCHEN)}

GENERAL_ADJECTIVES = (
    ("terrible", "awful", "poor", "bad", "disappointing", "horrible", "mediocre", "useless", "frustrating",
     "lousy"),
    ("great", "excellent", "wonderful", "fantastic", "good", "amazing", "solid", "impressive", "enjoyable",
     "superb"),
)
FEELINGS = (("unhappy", "disappointed", "dissatisfied", "annoyed"), ("happy", "pleased", "satisfied",
                                                                     "impressed"))
RECOMMENDATIONS = (("return it", "ask for a refund", "send it back", "give it away"),
                   ("recommend it", "buy it again", "order another one", "give it five stars"))
NEGATORS = ("not", "never")
INTENSIFIERS = ("", "", "", "really ", "very ", "quite ", "truly ", "pretty ")
VERDICT_MARKERS = ("overall,", "all in all,", "in the end,", "bottom line:", "to sum up,", "in short,")
TURN_MARKERS = ("that said,", "still,", "even so,", "having said that,")  # verdicts that overrule the body
SHARED_FILLERS = (
    "i bought it {when}.", "it arrived {shipping}.", "the price was {price}.",
    "i got it as a gift for my {who}.", "shipping took {number} days.", "i ordered it {where}.",
    "this is my {ordinal} {product} from this seller.", "i have had it for {number} weeks now.",
)
SLOTS = {
    "when": ("last month", "two weeks ago", "a few days ago", "over the holidays", "on sale last spring",
             "after reading the other reviews", "for a long trip"),
    "shipping": ("two days early", "right on time", "a day late", "in a plain box", "with a tracking number"),
    "price": ("about what i expected", "a little higher than other stores", "around twenty dollars",
              "lower than at the mall", "the same as last year"),
    "who": ("sister", "dad", "roommate", "son", "coworker", "mother in law", "best friend", "neighbor"),
    "where": ("online", "from the same seller as before", "with free shipping", "along with a few other things",
              "through a friend"),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve"),
    "ordinal": ("first", "second", "third", "fourth"),
}


class _Dice:
    """Seeded uniform draws served from a numpy buffer; one Generator call per draw is too slow here."""

    def __init__(self, seed: Sequence[int]) -> None:
        self._rng = np.random.default_rng(list(seed))
        self._buf: list[float] = []
        self._pos = 0
        self.said: list[tuple[int, bool]] = []  # (polarity, negated) of each sentiment phrase, for the stars

    def random(self) -> float:
        if self._pos == len(self._buf):
            self._buf, self._pos = self._rng.random(4096).tolist(), 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def chance(self, p: float) -> bool:
        return self.random() < p

    def pick(self, seq: Sequence[T]) -> T:
        return seq[int(self.random() * len(seq))]

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + int(self.random() * (hi - lo + 1))

    def weighted(self, weights: dict[str, float]) -> str:
        u, total = self.random() * sum(weights.values()), 0.0
        for key, w in weights.items():
            total += w
            if u < total:
                return key
        return key

    def shuffle(self, items: list[T]) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(0, i)
            items[i], items[j] = items[j], items[i]


# --- sentiment phrases: polarity p is 0 (negative) or 1 (positive) --------------------------------------


def _polar(d: _Dice, pools: tuple[Sequence[str], Sequence[str]], p: int, verb: bool = False) -> str:
    """A phrase of polarity p, sometimes as a negated opposite so a word's sign depends on its neighbour."""
    negated = d.chance(NEGATION)
    d.said.append((p, negated))
    if negated:
        return f"{'never' if verb else d.pick(NEGATORS)} {d.pick(pools[1 - p])}"
    return ("" if verb else d.pick(INTENSIFIERS)) + d.pick(pools[p])


def _adjective(d: _Dice, dom: Domain, p: int) -> str:
    return _polar(d, dom.adjectives if d.chance(DOMAIN_WORDS) else GENERAL_ADJECTIVES, p)


def _aspect_clause(d: _Dice, dom: Domain, p: int) -> str:
    aspect, adj = d.pick(dom.aspects), _adjective(d, dom, p)
    template = d.pick(("the {a} is {j}", "the {a} was {j}", "i found the {a} {j}",
                       "the {a} of this {p} is {j}", "to me the {a} is {j}"))
    return template.format(a=aspect, j=adj, p=d.pick(dom.products))


def _action_clause(d: _Dice, dom: Domain, p: int) -> str:
    subject = d.pick(("the {p}", "this {p}", "it", "my {p}")).format(p=d.pick(dom.products))
    return f"{subject} {_polar(d, dom.actions, p, verb=True)}"


def _product_clause(d: _Dice, dom: Domain, p: int) -> str:
    product = d.pick(dom.products)
    if d.chance(0.3):
        return f"i am {_polar(d, FEELINGS, p)} with the {product}"
    return d.pick(("this {p} is {j}", "the {p} itself is {j}", "as a {p} it is {j}")).format(
        p=product, j=_adjective(d, dom, p))


def _clause(d: _Dice, dom: Domain, p: int) -> str:
    """One opinion clause about the product, an aspect of it, or what it does."""
    builder: Callable[[_Dice, Domain, int], str] = d.pick(
        (_aspect_clause, _aspect_clause, _action_clause, _product_clause))
    return builder(d, dom, p)


def _contrast(d: _Dice, dom: Domain, p: int) -> str:
    """Two opposed clauses; the one after the turn ("but", "however") carries polarity p."""
    first, second = _clause(d, dom, 1 - p), _clause(d, dom, p)
    template = d.pick(("{a}, but {b}.", "{a}; however, {b}.", "although {a}, {b}.", "{a}, but overall {b}."))
    return template.format(a=first, b=second)


def _verdict(d: _Dice, dom: Domain, p: int, markers: Sequence[str] = VERDICT_MARKERS) -> str:
    """The closing judgement; its polarity is the review's label."""
    body = d.pick((
        lambda: f"it is {_adjective(d, dom, p)}",
        lambda: f"this {d.pick(dom.products)} is {_adjective(d, dom, p)}",
        lambda: f"i would {_polar(d, RECOMMENDATIONS, p, verb=True)}",
        lambda: f"i am {_polar(d, FEELINGS, p)} with it",
    ))()
    return f"{d.pick(markers)} {body}."


def _filler(d: _Dice, dom: Domain, used: set[str]) -> str:
    """A sentence with no opinion in it (shipping, price, gifts, use), from a template not yet `used`."""
    while (template := d.pick(dom.fillers) if d.chance(0.5) else d.pick(SHARED_FILLERS)) in used:
        pass
    used.add(template)
    slots = {key: d.pick(pool) for key, pool in SLOTS.items() if "{" + key + "}" in template}
    return template.format(product=d.pick(dom.products), **slots)


# --- whole reviews ----------------------------------------------------------------------------------------


def _opinions(d: _Dice, dom: Domain, p: int) -> list[str]:
    """Opinion sentences whose last one has polarity p."""
    kind = d.weighted(KIND_WEIGHTS)
    if kind == "mixed":  # the body leans the other way and the verdict overrules it
        body = [_clause(d, dom, 1 - p) + "." for _ in range(d.randint(1, 3))]
        if d.chance(0.3):
            body.insert(d.randint(0, len(body)), _clause(d, dom, p) + ".")
        return [*body, _verdict(d, dom, p, TURN_MARKERS if d.chance(0.5) else VERDICT_MARKERS)]
    sentences = [_clause(d, dom, p) + "." for _ in range(d.randint(*OPINIONS))]
    if kind == "contrast":
        sentences.insert(d.randint(0, len(sentences)), _contrast(d, dom, p))
    if d.chance(VERDICT):
        sentences.append(_verdict(d, dom, p))
    return sentences


def review(d: _Dice, dom: Domain, p: int) -> str:
    """A review of 2-5 sentences and 20-60 words whose final clause has polarity p, with neutral filler."""
    dom = replace(dom, products=(d.pick(dom.products),))  # one product per review
    while True:
        d.said.clear()  # a rejected draft's phrases are not in the review
        sentences, used = _opinions(d, dom, p), set()
        fillers = d.randint(0, 2)
        while len(sentences) < MAX_SENTENCES and (fillers > 0 or _words(sentences) < MIN_WORDS):
            sentences.insert(d.randint(0, len(sentences) - 1), _filler(d, dom, used))
            fillers -= 1
        if MIN_WORDS <= _words(sentences) <= MAX_WORDS and len(set(sentences)) == len(sentences):
            return " ".join(sentences)


def _words(sentences: list[str]) -> int:
    return sum(s.count(" ") + 1 for s in sentences)


def _labelled(d: _Dice, dom: Domain, size: int, seen: set[str]) -> list[dict]:
    """Balanced labelled reviews with a symmetric NOISE fraction of flipped labels (balance is kept).

    Stars are those of the text as written, so a flipped label may disagree with them, like a real rater.
    """
    polarities = [i % 2 for i in range(size)]
    d.shuffle(polarities)
    written = [(_fresh(d, dom, p, seen), stars(d.said, p)) for p in polarities]
    flips = round(size * NOISE / 2)
    for p in (0, 1):
        members = [i for i, q in enumerate(polarities) if q == p]
        d.shuffle(members)
        for i in members[:flips]:
            polarities[i] = 1 - p
    return [{"text": t, "label": LABELS[p], "domain": dom.name, "stars": s, "aspects": aspects(t)}
            for (t, s), p in zip(written, polarities, strict=True)]


def _fresh(d: _Dice, dom: Domain, p: int, seen: set[str]) -> str:
    """A review not generated before in this domain, so splits never share an exact text."""
    while (text := review(d, dom, p)) in seen:
        pass
    seen.add(text)
    return text


def generate(out: Path) -> None:
    """Write every domain's splits and unlabelled text, plus their shuffled union under `all/`."""
    union: dict[str, list] = {name: [] for name in [*SPLIT_SIZES, "unlabelled"]}
    for di, name in enumerate(DOMAINS):
        dom, seen, folder = DOMAIN_SPECS[name], set(), out / name
        folder.mkdir(parents=True)
        for si, (split, size) in enumerate(SPLIT_SIZES.items()):
            rows = _labelled(_Dice([SEED, di, si]), dom, size, seen)
            _write_jsonl(folder / f"{split}.jsonl", rows)
            union[split] += rows
        d = _Dice([SEED, di, len(SPLIT_SIZES)])
        lines = [_fresh(d, dom, d.randint(0, 1), seen) for _ in range(UNLABELLED_SIZE)]
        _write_lines(folder / "unlabelled.txt", lines)
        union["unlabelled"] += lines
    _write_union(out / "all", union)


def _write_union(folder: Path, union: dict[str, list]) -> None:
    folder.mkdir(parents=True)
    for i, (split, items) in enumerate(union.items()):
        order = np.random.default_rng([SEED, len(DOMAINS), i]).permutation(len(items))
        shuffled = [items[j] for j in order]
        if split == "unlabelled":
            _write_lines(folder / "unlabelled.txt", shuffled)
        else:
            _write_jsonl(folder / f"{split}.jsonl", shuffled)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_lines(path, [json.dumps(row) for row in rows])


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
