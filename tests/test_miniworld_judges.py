"""The judges: scores, chance levels, save/load, and the shipped judge's accuracy on fresh renders."""

from __future__ import annotations

import numpy as np
import pytest

from hyperbooth.errors import HyperboothError
from hyperbooth.miniworld.judges import (
    ATTRIBUTES,
    DEFAULT_JUDGE,
    FRAMING_COLUMN,
    IGNORE,
    Judge,
    JudgeConfig,
    accuracy,
    as_batch,
    chance_levels,
    identity_score,
    prompt_score,
    render_examples,
    train_judge,
)
from hyperbooth.miniworld.render import HIDDEN_TRAITS, SIZE, TRAITS, Context, Identity, pair_box

ALL_ZERO = Identity(**dict.fromkeys(TRAITS, 0))


def test_identity_score_counts_traits_and_hidden_traits_separately():
    assert identity_score(ALL_ZERO, ALL_ZERO) == (1.0, 1.0)
    one_hidden_wrong = Identity(**{**ALL_ZERO.as_dict(), "mark": 1})
    total, hidden = identity_score(ALL_ZERO, one_hidden_wrong)
    assert total == pytest.approx(1 - 1 / len(TRAITS))
    assert hidden == pytest.approx(1 - 1 / len(HIDDEN_TRAITS))
    one_named_wrong = Identity(**{**ALL_ZERO.as_dict(), "glasses": 2})
    assert identity_score(ALL_ZERO, one_named_wrong)[1] == 1.0


def test_prompt_score_uses_only_the_context_the_prompt_asks_for():
    read = Context(background_colour=1, background_pattern=0, style=2, headwear=1, framing=0)
    # Red background and a hat: both shown. Blue eyes is an identity trait, not context.
    assert prompt_score("a face with blue eyes wearing a hat on a red background", read) == 1.0
    assert prompt_score("a face wearing a crown on a red background", read) == 0.5
    assert prompt_score("a face with blue eyes", read) is None
    assert prompt_score({"style": 2, "framing": 1}, read) == 0.5


def test_chance_levels_match_random_guessing():
    chance = chance_levels()
    rng = np.random.default_rng(0)
    draws = [
        identity_score(
            Identity(**{n: int(rng.integers(len(v))) for n, v in TRAITS.items()}),
            Identity(**{n: int(rng.integers(len(v))) for n, v in TRAITS.items()}),
        )
        for _ in range(20000)
    ]
    assert np.mean([d[0] for d in draws]) == pytest.approx(chance["identity"], abs=0.01)
    assert np.mean([d[1] for d in draws]) == pytest.approx(chance["hidden"], abs=0.01)


def test_bad_batches_and_missing_judges_give_one_line_errors(tmp_path):
    with pytest.raises(HyperboothError, match="64x64"):
        as_batch(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(HyperboothError, match="no judge"):
        Judge.load(tmp_path)
    (tmp_path / "judge.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "judge.json").write_text('{"config": {"channels": [8], "colour": 1}}')
    with pytest.raises(HyperboothError, match="is not a judge-format network .*TypeError"):
        Judge.load(tmp_path)
    (tmp_path / "judge.json").write_text('{"config": {}}')
    with pytest.raises(HyperboothError, match="is not a judge-format network"):
        Judge.load(tmp_path)


def test_faces_cut_from_pairs_are_whole_squares_without_a_framing_label():
    left, right = pair_box(0), pair_box(1)
    assert all(0 <= v <= SIZE for v in (*left, *right)) and left[2] <= right[0]
    assert left[2] - left[0] == left[3] - left[1]
    images, labels = render_examples(6, seed=3, pair_fraction=1.0, progress=False)
    assert images.shape == (6, SIZE, SIZE, 3) and (labels[:, FRAMING_COLUMN] == IGNORE).all()
    assert (labels[:, :FRAMING_COLUMN] >= 0).all()


def test_a_toy_judge_trains_saves_and_loads_identically(tmp_path):
    config = JudgeConfig(
        channels=(4, 8), repeats=(1, 1), hidden=16, examples=64, epochs=1, batch=32
    )
    config.eval_examples = 32
    judge = train_judge(config, progress=False)
    assert set(judge.info["accuracy"]) == set(ATTRIBUTES)
    judge.save(tmp_path)
    again = Judge.load(tmp_path)
    images, _ = render_examples(8, seed=5, progress=False)
    # Stored in float16: predictions may only differ where two logits nearly tie.
    same = [
        (a == b).float().mean().item()
        for a, b in zip(judge.predict(images).values(), again.predict(images).values(), strict=True)
    ]
    assert np.mean(same) > 0.9


@pytest.mark.skipif(not DEFAULT_JUDGE.is_dir(), reason="the shipped judge is not trained yet")
def test_the_shipped_judge_reads_fresh_renders():
    judge = Judge.load()
    images, labels = render_examples(600, seed=12345, progress=False)
    scores = accuracy(judge, images, labels)
    # The bar of the issue is 97% per attribute over thousands of renders (judge.json holds that
    # measurement); 600 renders give a noisier estimate, so allow a little less here.
    assert min(scores.values()) > 0.95, scores
    values, readings = judge.predict(images[:4]), judge.read(images[:4])
    for i, reading in enumerate(readings):
        assert reading.identity.as_dict() == {n: int(values[n][i]) for n in TRAITS}
        assert reading.context.style == int(values["style"][i])
    pairs, pair_labels = render_examples(300, seed=54321, pair_fraction=1.0, progress=False)
    assert min(accuracy(judge, pairs, pair_labels).values()) > 0.85
