"""The miniature world: deterministic renders, every attribute visible, captions that never leak."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hyperbooth.miniworld.captions import (
    BARE_CAPTION,
    caption,
    pair_caption,
    parse_prompt,
    prompt_for,
    sample_training_example,
    training_identity,
)
from hyperbooth.miniworld.render import (
    CONTEXT_ATTRIBUTES,
    HIDDEN_TRAITS,
    NAMEABLE_TRAITS,
    SIZE,
    TRAITS,
    Context,
    Identity,
    feature_map,
    held_out,
    random_context,
    random_identity,
    render,
    render_array,
    render_batch,
    render_pair,
    render_pair_array,
)

STYLES = range(len(CONTEXT_ATTRIBUTES["style"]))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _with(value, **changes):
    """A copy of an Identity or Context with some attributes changed."""
    return type(value)(**{**value.as_dict(), **changes})


def test_identity_and_context_numbering_is_a_bijection():
    assert Identity.count() == 1_399_680 >= 10**6
    assert Context.count() == 648
    rng = np.random.default_rng(0)
    for cls in (Identity, Context):
        indices = [0, cls.count() - 1, *rng.integers(cls.count(), size=200).tolist()]
        for index in indices:
            value = cls.from_index(index)
            assert value.index == index
            assert type(value)(**value.as_dict()) == value
        with pytest.raises(ValueError):
            cls.from_index(cls.count())
    assert random_identity(rng) != random_identity(rng)
    with pytest.raises(ValueError, match="hair_style"):
        _with(Identity.from_index(0), hair_style=len(TRAITS["hair_style"]))


def test_render_is_deterministic_and_64_px_rgb():
    rng = np.random.default_rng(1)
    identity, context = random_identity(rng), random_context(rng)
    image = render(identity, context, seed=7)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    assert image.tobytes() == render(identity, context, seed=7).tobytes()
    array = render_array(identity, context, seed=7)
    assert array.dtype == np.uint8 and array.shape == (SIZE, SIZE, 3)
    assert np.array_equal(array, np.asarray(image))
    batch = render_batch([identity, identity], [context, context], [7, 8])
    assert batch.shape == (2, SIZE, SIZE, 3) and np.array_equal(batch[0], array)
    with pytest.raises(ValueError, match="as many"):
        render_batch([identity], [context, context], [7])


def test_seed_and_identity_change_the_image():
    rng = np.random.default_rng(2)
    identity, context = random_identity(rng), random_context(rng)
    reference = render_array(identity, context, seed=0)
    for seed in range(1, 6):
        assert not np.array_equal(reference, render_array(identity, context, seed))
    for _ in range(5):
        other = random_identity(rng)
        assert not np.array_equal(reference, render_array(other, context, seed=0))


@pytest.mark.parametrize("style", STYLES)
def test_every_trait_value_changes_the_image_in_every_style(style):
    rng = np.random.default_rng(100 + style)
    for _ in range(2):
        identity = random_identity(rng)
        context = _with(random_context(rng), style=style)
        seed = int(rng.integers(1000))
        reference = render_array(identity, context, seed)
        for name, values in TRAITS.items():
            for value in range(len(values)):
                if value != getattr(identity, name):
                    changed = render_array(_with(identity, **{name: value}), context, seed)
                    assert not np.array_equal(reference, changed), (name, values[value], context)


@pytest.mark.parametrize("style", STYLES)
def test_every_context_value_changes_the_image(style):
    rng = np.random.default_rng(200 + style)
    identity = random_identity(rng)
    context = _with(random_context(rng), style=style)
    reference = render_array(identity, context, seed=3)
    for name, values in CONTEXT_ATTRIBUTES.items():
        for value in range(len(values)):
            if value != getattr(context, name):
                changed = render_array(identity, _with(context, **{name: value}), seed=3)
                assert not np.array_equal(reference, changed), (name, values[value])


@pytest.mark.parametrize("style", STYLES)
def test_the_feature_map_covers_the_small_features_wherever_the_face_is(style):
    rng = np.random.default_rng(300 + style)
    small = ("eye_colour", "mark", "nose", "mouth", "eyebrows", "eye_spacing")
    for _ in range(4):
        identity = random_identity(rng)
        context = _with(random_context(rng), style=style)
        seed = int(rng.integers(1000))
        region = feature_map(context, seed) > 0
        assert 0.05 < region.mean() < 0.35  # the face, not the picture
        reference = render_array(identity, context, seed)
        for name in small:
            value = (getattr(identity, name) + 1) % len(TRAITS[name])
            changed = render_array(_with(identity, **{name: value}), context, seed)
            moved = (changed != reference).any(axis=-1)
            # Glasses' arms reach the side of the head, outside the region.
            assert moved.any() and moved[region].sum() >= 0.9 * moved.sum(), name
    # A pair has one region per face, each where that face is drawn.
    a, b, context = random_identity(rng), random_identity(rng), random_context(rng)
    region = feature_map(context, seed=7, pair=True) > 0
    changed = render_pair_array(_with(a, mouth=(a.mouth + 1) % 3), b, context, seed=7)
    moved = (changed != render_pair_array(a, b, context, seed=7)).any(axis=-1)
    assert moved[region].sum() >= 0.95 * moved.sum()
    half = SIZE // 2
    assert region[:, :half].any() and region[:, half:].any()
    assert not np.array_equal(region, feature_map(context, seed=8, pair=True) > 0)  # jitter


def test_inverted_colours_is_the_shaded_picture_inverted():
    rng = np.random.default_rng(10)
    styles = CONTEXT_ATTRIBUTES["style"]
    for _ in range(5):
        identity, context = random_identity(rng), random_context(rng)
        shaded = render_array(identity, _with(context, style=styles.index("shaded")), seed=4)
        inverted = render_array(identity, _with(context, style=styles.index("inverted colours")), 4)
        assert np.array_equal(inverted, 255 - shaded)


def test_pair_is_two_faces_left_to_right():
    rng = np.random.default_rng(3)
    a, b, context = random_identity(rng), random_identity(rng), random_context(rng)
    pair = render_pair(a, b, context, seed=5)
    assert pair.mode == "RGB" and pair.size == (SIZE, SIZE)
    assert pair.tobytes() == render_pair(a, b, context, seed=5).tobytes()
    assert pair.tobytes() != render_pair(b, a, context, seed=5).tobytes()
    # Framing does not apply to pairs.
    far = _with(context, framing=(context.framing + 1) % 3)
    assert pair.tobytes() == render_pair(a, b, far, seed=5).tobytes()


def test_hidden_traits_are_never_named():
    hidden_words = set().union(*(_words(" ".join(values)) for values in HIDDEN_TRAITS.values()))
    rng = np.random.default_rng(4)
    seen: set[str] = set()
    named: set[tuple[str, int]] = set()
    for _ in range(3000):
        identity, context = random_identity(rng), random_context(rng)
        described = caption(identity, context, rng)
        seen |= _words(described.text)
        named |= set(described.mentioned.items())
        seen |= _words(pair_caption(identity, random_identity(rng), context, rng).text)
        traits = {name: getattr(identity, name) for name in NAMEABLE_TRAITS}
        if traits["hair_style"] == NAMEABLE_TRAITS["hair_style"].index("bald"):
            del traits["hair_colour"]
        seen |= _words(prompt_for(context.as_dict(), traits, token="sks"))
    assert not seen & hidden_words, seen & hidden_words
    # ... while every nameable value is named.
    for name, values in {**NAMEABLE_TRAITS, **CONTEXT_ATTRIBUTES}.items():
        assert {(name, value) for value in range(len(values))} <= named, name


def test_captions_do_not_depend_on_hidden_traits():
    rng = np.random.default_rng(11)
    for seed in range(200):
        identity, context = random_identity(rng), random_context(rng)
        hidden = {name: int(rng.integers(len(values))) for name, values in HIDDEN_TRAITS.items()}
        other = _with(identity, **hidden)
        first = caption(identity, context, np.random.default_rng(seed))
        assert first == caption(other, context, np.random.default_rng(seed))


def test_captions_say_exactly_what_they_mention():
    rng = np.random.default_rng(5)
    bare = 0
    for _ in range(2000):
        identity, context = random_identity(rng), random_context(rng)
        described = caption(identity, context, rng)
        bare += described.text == BARE_CAPTION
        assert parse_prompt(described.text) == described.mentioned, described
        every = {**identity.as_dict(), **context.as_dict()}
        assert all(every[name] == value for name, value in described.mentioned.items())
        assert not set(described.mentioned) & set(HIDDEN_TRAITS)
    assert 140 <= bare <= 260  # ~10%
    always_bare = caption(identity, context, rng, bare_probability=1.0)
    assert always_bare.text == BARE_CAPTION and always_bare.mentioned == {}


def test_pair_caption_names_left_then_right():
    rng = np.random.default_rng(6)
    for _ in range(200):
        a, b, context = random_identity(rng), random_identity(rng), random_context(rng)
        described = pair_caption(a, b, context, rng, bare_probability=0.0)
        assert " next to " in described.text or " beside " in described.text
        for key, value in described.mentioned.items():
            side, _, name = key.rpartition(".")
            source = {"left": a, "right": b, "": context}[side]
            assert getattr(source, name) == value and name != "framing"


def test_prompt_for_and_parse_prompt_are_inverse():
    rng = np.random.default_rng(7)
    assert prompt_for({"headwear": 1, "style": 2}, token="sks") == (
        "a sks face wearing a hat, pencil sketch"
    )
    for _ in range(500):
        context = {k: v for k, v in random_context(rng).as_dict().items() if rng.random() < 0.5}
        identity = random_identity(rng)
        traits = {k: getattr(identity, k) for k in NAMEABLE_TRAITS if rng.random() < 0.5}
        if traits.get("hair_style") == NAMEABLE_TRAITS["hair_style"].index("bald"):
            traits.pop("hair_colour", None)
        for token in (None, "sks"):
            text = prompt_for(context, traits, token)
            assert parse_prompt(text) == {**traits, **context}, text
            assert text == prompt_for(context, traits, token)
    with pytest.raises(ValueError, match="nameable"):
        prompt_for({}, {"mark": 1})
    with pytest.raises(ValueError, match="bald"):
        prompt_for({}, {"hair_style": 3, "hair_colour": 0})


def test_held_out_split_is_fixed_and_about_one_percent():
    indices = range(0, Identity.count(), 29)
    flags = [held_out(Identity.from_index(i)) for i in indices]
    assert 0.008 < sum(flags) / len(flags) < 0.012
    assert flags[:1000] == [held_out(Identity.from_index(i)) for i in indices[:1000]]
    rng = np.random.default_rng(8)
    assert not any(held_out(training_identity(rng)) for _ in range(2000))


def test_training_examples_mix_singles_and_pairs():
    rng = np.random.default_rng(9)
    sizes = []
    for _ in range(200):
        image, text, info = sample_training_example(rng)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert text == info.caption.text
        assert not any(held_out(identity) for identity in info.identities)
        sizes.append(len(info.identities))
    assert 5 <= sizes.count(2) <= 40  # ~10%
    again = sample_training_example(np.random.default_rng(1))
    first = sample_training_example(np.random.default_rng(1))
    assert np.array_equal(again[0], first[0]) and again[1] == first[1]
