"""Captions for the miniature world, the prompts that evaluation uses, and training examples.

A caption names a random subset of an image's nameable traits and context attributes in plain
English, in random orders and phrasings, and returns what it named; hidden traits are never named.
Every attribute value has its own phrase, so `parse_prompt` reads the attributes back from any text
`caption` or `prompt_for` wrote (a pair caption describes two faces: it is not parsed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from hyperbooth.miniworld.render import (
    CONTEXT_ATTRIBUTES,
    NAMEABLE_TRAITS,
    SEED_RANGE,
    Context,
    Identity,
    held_out,
    random_context,
    random_identity,
    render_array,
    render_pair_array,
)

BARE_CAPTION = "a face"
BARE_PAIR_CAPTION = "two faces"
BARE_PROBABILITY = 0.1  # captions that are just BARE_CAPTION: the model also learns the unprompted
MENTION_PROBABILITY = 0.5  # each attribute of a non-bare caption is named with this probability
PAIR_PROBABILITY = 0.1  # training examples showing two faces

# The words of each value inside its phrase, where they differ from the value names.
_HAIR_STYLE_WORDS = ("short", "long", "curly", "bald")
_GLASSES_WORDS = ("no", "round", "square")
_BACKGROUND_PATTERN_WORDS = ("plain", "striped", "dotted")
_FRAMING_WORDS = ("close up", "medium shot", "far away")
_HEADWEAR_PHRASES = ("no headwear", "wearing a hat", "wearing a crown")
_PAIR_HEADWEAR_PHRASES = ("no headwear", "both wearing hats", "both wearing crowns")
# Styles that can lead a caption as a noun ("a pencil sketch of a face"); any style can trail it.
_STYLE_LEADS = {
    "shaded": "shaded portrait",
    "flat cartoon": "flat cartoon",
    "pencil sketch": "pencil sketch",
}
_LEADS = ("", "a portrait of ", "a picture of ", "an image of ")
_PAIR_JOINERS = (" next to ", " beside ")
_BALD = _HAIR_STYLE_WORDS.index("bald")


@dataclass(frozen=True)
class Caption:
    """A caption and what it names: attribute -> value index (pairs: "left.x", "right.x")."""

    text: str
    mentioned: dict[str, int]


@dataclass(frozen=True)
class ExampleInfo:
    """What a training example shows: its faces left to right, context, seed and caption."""

    identities: tuple[Identity, ...]
    context: Context
    seed: int
    caption: Caption


def _article(word: str) -> str:
    """'an' before a vowel, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def _subject(traits: dict[str, int], token: str | None = None) -> str:
    """'a face', 'an oval face', 'a round sks face'."""
    words = [NAMEABLE_TRAITS["face_shape"][traits["face_shape"]]] if "face_shape" in traits else []
    words += [token, "face"] if token else ["face"]
    return f"{_article(words[0])} {' '.join(words)}"


def _with_items(traits: dict[str, int]) -> list[str]:
    """Phrases for 'with ...': hair, eyes, skin, glasses, in that order."""
    items = []
    style, colour = traits.get("hair_style"), traits.get("hair_colour")
    if style == _BALD:
        if colour is not None:
            raise ValueError("a bald face has no hair colour to name (its eyebrows show it)")
        items.append("a bald head")
    elif style is not None or colour is not None:
        words = [] if style is None else [_HAIR_STYLE_WORDS[style]]
        words += [] if colour is None else [NAMEABLE_TRAITS["hair_colour"][colour]]
        items.append(" ".join([*words, "hair"]))
    if "eye_colour" in traits:
        items.append(f"{NAMEABLE_TRAITS['eye_colour'][traits['eye_colour']]} eyes")
    if "skin_tone" in traits:
        items.append(f"{NAMEABLE_TRAITS['skin_tone'][traits['skin_tone']]} skin")
    if "glasses" in traits:
        items.append(f"{_GLASSES_WORDS[traits['glasses']]} glasses")
    return items


def _join(items: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _clauses(
    traits: dict[str, int], context: dict[str, int], rng: np.random.Generator | None = None
) -> list[str]:
    """'with ...', 'wearing a hat', 'on a ... background'; items and clauses shuffled if rng."""
    items = _with_items(traits)
    if context.get("headwear") == 0:
        items.append(_HEADWEAR_PHRASES[0])
    if rng is not None:
        items = _shuffled(items, rng)
    clauses = [f"with {_join(items)}"] if items else []
    if context.get("headwear", 0) != 0:
        clauses.append(_HEADWEAR_PHRASES[context["headwear"]])
    background = _background(context)
    if background:
        clauses.append(background)
    return clauses if rng is None else _shuffled(clauses, rng)


def _shuffled(items: list[str], rng: np.random.Generator) -> list[str]:
    """The items in a random order."""
    return [items[i] for i in rng.permutation(len(items))]


def _background(context: dict[str, int]) -> str | None:
    """'on a striped green background', or None if neither colour nor pattern is named."""
    words = []
    if "background_pattern" in context:
        words.append(_BACKGROUND_PATTERN_WORDS[context["background_pattern"]])
    if "background_colour" in context:
        words.append(CONTEXT_ATTRIBUTES["background_colour"][context["background_colour"]])
    if not words:
        return None
    return f"on {_article(words[0])} {' '.join(words)} background"


def _check_attributes(
    attributes: dict[str, int], allowed: dict[str, tuple[str, ...]], what: str
) -> None:
    """Raise unless every key is an attribute of allowed and every value in range."""
    for name, value in attributes.items():
        if name not in allowed:
            raise ValueError(f"{name!r} is not a {what}; choose from {', '.join(allowed)}")
        if not 0 <= value < len(allowed[name]):
            raise ValueError(f"{name}={value} is out of range 0..{len(allowed[name]) - 1}")


def prompt_for(
    context_attributes: dict[str, int],
    identity_traits: dict[str, int] | None = None,
    token: str | None = None,
) -> str:
    """The prompt naming just these attributes, e.g. 'a sks face wearing a hat, pencil sketch'."""
    traits = identity_traits or {}
    _check_attributes(context_attributes, CONTEXT_ATTRIBUTES, "context attribute")
    _check_attributes(traits, NAMEABLE_TRAITS, "nameable trait")
    context = context_attributes
    text = " ".join([_subject(traits, token), *_clauses(traits, context)])
    if "framing" in context:
        text += f", {_FRAMING_WORDS[context['framing']]}"
    if "style" in context:
        text += f", {CONTEXT_ATTRIBUTES['style'][context['style']]}"
    return text


def nameable(attributes: dict[str, int]) -> dict[str, int]:
    """The attributes a caption may name: all but a bald face's hair colour (its eyebrows show it)."""
    if attributes.get("hair_style") != _BALD:
        return dict(attributes)
    return {name: value for name, value in attributes.items() if name != "hair_colour"}


def _chosen(
    attributes: dict[str, int], rng: np.random.Generator, probability: float
) -> dict[str, int]:
    """Each attribute kept with the probability (hair colour never for a bald face)."""
    kept = {name: value for name, value in attributes.items() if rng.random() < probability}
    allowed = nameable(attributes)
    return {name: value for name, value in kept.items() if name in allowed}


def _describe(traits: dict[str, int], rng: np.random.Generator) -> str:
    """'a round face with curly red hair and blue eyes', features in a random order."""
    items = _shuffled(_with_items(traits), rng)
    return _subject(traits) + (f" with {_join(items)}" if items else "")


def _lead_and_tail(
    context: dict[str, int], rng: np.random.Generator, framing: bool
) -> tuple[str, list[str]]:
    """A leading phrase ('a close up pencil sketch of ') and trailing ones (', far away')."""
    tail = []
    style = CONTEXT_ATTRIBUTES["style"][context["style"]] if "style" in context else None
    lead_style = style in _STYLE_LEADS and rng.random() < 0.5
    close_up = framing and context.get("framing") == 0 and rng.random() < 0.5
    if style and not lead_style:
        tail.append(style)
    if framing and "framing" in context and not close_up:
        tail.append(_FRAMING_WORDS[context["framing"]])
    if lead_style or close_up:
        words = ["close up"] if close_up else []
        words += [_STYLE_LEADS[style]] if lead_style else []
        lead = f"{_article(words[0])} {' '.join(words)} of "
    else:
        lead = _LEADS[rng.integers(len(_LEADS))]
    return lead, _shuffled(tail, rng)


def caption(
    identity: Identity,
    context: Context,
    rng: np.random.Generator,
    bare_probability: float = BARE_PROBABILITY,
    mention_probability: float = MENTION_PROBABILITY,
) -> Caption:
    """A random caption of one face naming a random subset of its nameable traits and context."""
    if rng.random() < bare_probability:
        return Caption(BARE_CAPTION, {})
    traits = {name: getattr(identity, name) for name in NAMEABLE_TRAITS}
    traits = _chosen(traits, rng, mention_probability)
    chosen_context = _chosen(context.as_dict(), rng, mention_probability)
    lead, tail = _lead_and_tail(chosen_context, rng, framing=True)
    text = " ".join([lead + _subject(traits), *_clauses(traits, chosen_context, rng)])
    text += "".join(f", {phrase}" for phrase in tail)
    return Caption(text, {**traits, **chosen_context})


def pair_caption(
    a: Identity,
    b: Identity,
    context: Context,
    rng: np.random.Generator,
    bare_probability: float = BARE_PROBABILITY,
    mention_probability: float = MENTION_PROBABILITY,
) -> Caption:
    """A random caption of a (left) next to b (right); framing is never named (pairs are fixed)."""
    if rng.random() < bare_probability:
        return Caption(BARE_PAIR_CAPTION, {})
    mentioned: dict[str, int] = {}
    descriptions = []
    for side, identity in (("left", a), ("right", b)):
        traits = {name: getattr(identity, name) for name in NAMEABLE_TRAITS}
        traits = _chosen(traits, rng, mention_probability)
        descriptions.append(_describe(traits, rng))
        mentioned.update({f"{side}.{name}": value for name, value in traits.items()})
    chosen_context = _chosen(context.as_dict(), rng, mention_probability)
    chosen_context.pop("framing", None)
    lead, tail = _lead_and_tail(chosen_context, rng, framing=False)
    clauses = []
    if "headwear" in chosen_context:
        clauses.append(_PAIR_HEADWEAR_PHRASES[chosen_context["headwear"]])
    background = _background(chosen_context)
    if background:
        clauses.append(background)
    # The first face named is the left one, whichever joiner links them.
    joiner = _PAIR_JOINERS[rng.integers(len(_PAIR_JOINERS))]
    text = lead + joiner.join(descriptions)
    text += "".join(f", {phrase}" for phrase in [*_shuffled(clauses, rng), *tail])
    return Caption(text, {**mentioned, **chosen_context})


# --- Parsing: one pattern per attribute, each value's words appear nowhere else ------------------


def _alternatives(words: tuple[str, ...]) -> str:
    """A regex group matching any of the words."""
    return "(" + "|".join(re.escape(word) for word in words) + ")"


_HAIR_COLOURS = _alternatives(NAMEABLE_TRAITS["hair_colour"])
_PATTERNS: dict[str, tuple[re.Pattern[str], tuple[str, ...]]] = {
    # attribute: (pattern whose group 1 is the value's word, the words in value order)
    "hair_colour": (re.compile(rf"\b{_HAIR_COLOURS} hair\b"), NAMEABLE_TRAITS["hair_colour"]),
    "hair_style": (
        re.compile(rf"\b(short|long|curly)(?: {_HAIR_COLOURS})? hair\b|\b(bald)\b"),
        _HAIR_STYLE_WORDS,
    ),
    "eye_colour": (
        re.compile(rf"\b{_alternatives(NAMEABLE_TRAITS['eye_colour'])} eyes\b"),
        NAMEABLE_TRAITS["eye_colour"],
    ),
    "skin_tone": (
        re.compile(rf"\b{_alternatives(NAMEABLE_TRAITS['skin_tone'])} skin\b"),
        NAMEABLE_TRAITS["skin_tone"],
    ),
    "face_shape": (
        # A personalisation token may stand between the shape and "face".
        re.compile(rf"\b{_alternatives(NAMEABLE_TRAITS['face_shape'])}(?: \S+)? face\b"),
        NAMEABLE_TRAITS["face_shape"],
    ),
    "glasses": (re.compile(rf"\b{_alternatives(_GLASSES_WORDS)} glasses\b"), _GLASSES_WORDS),
    "background_colour": (
        re.compile(rf"\b{_alternatives(CONTEXT_ATTRIBUTES['background_colour'])} background\b"),
        CONTEXT_ATTRIBUTES["background_colour"],
    ),
    "background_pattern": (
        re.compile(rf"\b{_alternatives(_BACKGROUND_PATTERN_WORDS)} (?:\w+ )?background\b"),
        _BACKGROUND_PATTERN_WORDS,
    ),
    "style": (
        re.compile(rf"\b{_alternatives(CONTEXT_ATTRIBUTES['style'])}\b"),
        CONTEXT_ATTRIBUTES["style"],
    ),
    "headwear": (re.compile(r"\b(no headwear|hats?|crowns?)\b"), ("no headwear", "hat", "crown")),
    "framing": (re.compile(rf"\b{_alternatives(_FRAMING_WORDS)}\b"), _FRAMING_WORDS),
}


def parse_prompt(text: str) -> dict[str, int]:
    """The nameable traits and context attributes a prompt names: attribute -> value index."""
    found: dict[str, int] = {}
    for name, (pattern, words) in _PATTERNS.items():
        values = set()
        for match in pattern.finditer(text):
            word = next(group for group in match.groups() if group is not None)
            values.add(words.index(word.rstrip("s") if name == "headwear" else word))
        if len(values) > 1:
            raise ValueError(f"the prompt names {name} more than once: {text!r}")
        if values:
            found[name] = values.pop()
    return found


# --- Training examples ---------------------------------------------------------------------------


def training_identity(rng: np.random.Generator) -> Identity:
    """A uniformly random identity that is not held out."""
    while True:
        identity = random_identity(rng)
        if not held_out(identity):
            return identity


def _sample_described(
    rng: np.random.Generator,
    pair_probability: float,
    bare_probability: float,
    mention_probability: float = MENTION_PROBABILITY,
) -> tuple[tuple[Identity, ...], Context, int, Caption]:
    """The identities, context, seed and caption of one training example (nothing rendered)."""
    context = random_context(rng)
    seed = int(rng.integers(SEED_RANGE))
    if rng.random() < pair_probability:
        a, b = training_identity(rng), training_identity(rng)
        # Pairs are always drawn at the far-away size; the context says so.
        context = Context(**{**context.as_dict(), "framing": _FRAMING_WORDS.index("far away")})
        described = pair_caption(a, b, context, rng, bare_probability, mention_probability)
        return (a, b), context, seed, described
    identity = training_identity(rng)
    described = caption(identity, context, rng, bare_probability, mention_probability)
    return (identity,), context, seed, described


def sample_caption(
    rng: np.random.Generator,
    pair_probability: float = PAIR_PROBABILITY,
    bare_probability: float = BARE_PROBABILITY,
    mention_probability: float = MENTION_PROBABILITY,
) -> Caption:
    """A training caption and what it names, drawn as sample_training_example draws it."""
    return _sample_described(rng, pair_probability, bare_probability, mention_probability)[3]


def sample_training_example(
    rng: np.random.Generator,
    pair_probability: float = PAIR_PROBABILITY,
    bare_probability: float = BARE_PROBABILITY,
    mention_probability: float = MENTION_PROBABILITY,
) -> tuple[np.ndarray, str, ExampleInfo]:
    """A (64, 64, 3) uint8 image, its caption and what it shows: one face, or sometimes two."""
    identities, context, seed, described = _sample_described(
        rng, pair_probability, bare_probability, mention_probability
    )
    if len(identities) == 2:
        image = render_pair_array(*identities, context, seed)
    else:
        image = render_array(identities[0], context, seed)
    return image, described.text, ExampleInfo(identities, context, seed, described)


def mini_captions(count: int, seed: int = 0) -> list[str]:
    """count training captions of the miniature world (a default caption corpus)."""
    rng = np.random.default_rng(seed)
    return [sample_caption(rng).text for _ in range(count)]
