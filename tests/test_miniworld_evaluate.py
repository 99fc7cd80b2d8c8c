"""The mini measurements run end to end on a toy-sized model and judge, and report sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hyperbooth.bases import load_base
from hyperbooth.errors import HyperboothError
from hyperbooth.miniworld.compare import compare
from hyperbooth.miniworld.evaluate import (
    EVALUATION_CONTEXTS,
    REFERENCE_CONTEXT,
    TWO_CONCEPT_APPROACHES,
    PersonalisationConfig,
    TwoConceptConfig,
    held_out_identities,
    obedience,
    personalisation,
    subject_prompt,
    two_concepts,
)
from hyperbooth.miniworld.judges import JudgeConfig, train_judge
from hyperbooth.miniworld.render import NAMEABLE_TRAITS, TRAITS, held_out
from hyperbooth.miniworld.train_base import main as train_base
from test_miniworld_train import TOY


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory):
    """A toy-sized mini (seconds of training) and a toy judge: the numbers mean nothing."""
    folder = tmp_path_factory.mktemp("toy_mini")
    config = folder / "toy.json"
    config.write_text(json.dumps({**TOY, "sample_every": 0}))
    train_base(
        ["--work", str(folder / "work"), "--out", str(folder / "model"), "--config", str(config)]
    )
    judge = train_judge(
        JudgeConfig(
            channels=(4, 8),
            repeats=(1, 1),
            hidden=16,
            examples=32,
            epochs=1,
            batch=32,
            eval_examples=8,
        ),
        progress=False,
    )
    return load_base(str(folder / "model")), judge


def test_evaluation_prompts_name_the_subject_and_only_the_context():
    prompts = [subject_prompt(names) for names in EVALUATION_CONTEXTS]
    assert all(p.startswith("a sks face") for p in prompts) and len(set(prompts)) == len(prompts)
    assert subject_prompt({"headwear": "hat"}, token=None) == "a face wearing a hat"


def test_held_out_identities_are_fixed_and_held_out():
    identities = held_out_identities(5)
    assert identities == held_out_identities(5) and all(held_out(i) for i in identities)
    assert len(set(identities)) == 5


def test_obedience_and_personalisation_run_and_report_fractions(toy_world):
    base, judge = toy_world
    report = obedience(base, judge, prompts=4, pair_prompts=2, steps=2, progress=False)
    for key in ("context_shown", "nameable_traits_shown"):
        assert report[key] is None or 0 <= report[key] <= 1
    assert report["pairs"]["prompts"] == 2
    config = PersonalisationConfig(
        method="lidb", identities=1, steps=2, images_per_prompt=1, sampling_steps=2
    )
    result = personalisation(base, judge, config, progress=False)
    row = result["identities"][0]
    assert row["stored_bytes"] > 0 and set(row["personalised"]) == {"identity", "hidden", "prompt"}
    assert all(0 <= v <= 1 for side in result["summary"].values() for v in side.values())
    # one row per evaluation prompt, whose mean is the summary
    by_prompt = result["by_prompt"]
    assert [row["text"] for row in by_prompt] == result["prompts"]
    mean = sum(row["identity"] for row in by_prompt) / len(by_prompt)
    assert mean == pytest.approx(result["summary"]["personalised"]["identity"])
    # and one hit rate per trait, whose mean over traits is the identity score
    hits = result["by_trait"]
    assert set(hits) == set(TRAITS)
    assert sum(hits.values()) / len(hits) == pytest.approx(mean)


def test_the_demo_fast_path_writes_a_grid_and_scores(toy_world, tmp_path, capsys):
    from hyperbooth.demo import run_demo

    base, judge = toy_world
    report = run_demo(
        tmp_path, steps=2, base_spec=base.name, images_per_prompt=1, sampling_steps=2, judge=judge
    )
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "demo.json").is_file()
    assert report["adapter_bytes"] > 0 and 0 <= report["scores"]["identity"] <= 1
    assert "identity" in capsys.readouterr().out
    with pytest.raises(HyperboothError, match="fits mini only"):
        run_demo(tmp_path, base_spec=base.name, method="hyperdreambooth", judge=judge)


def test_conditioning_gain_reports_both_losses_per_noise_band(toy_world):
    from hyperbooth.miniworld.evaluate import conditioning_gain

    base, _ = toy_world
    result = conditioning_gain(base, count=4, bands=2)
    assert result["band_start"] == [0, 500]
    assert all(v > 0 for v in result["captioned"] + result["empty"])


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("textual-inversion", {}),
        ("custom-diffusion", {}),
        ("lora", {"pivotal": True, "train_text_encoder": False}),
    ],
)
def test_new_word_methods_personalise_under_their_own_token(toy_world, method, extra):
    base, judge = toy_world
    config = PersonalisationConfig(
        method=method,
        **extra,
        identities=1,
        steps=2,
        images_per_prompt=1,
        sampling_steps=2,
        regularisation_images=2,
    )
    result = personalisation(base, judge, config, progress=False)
    assert all(p.startswith("a <sks> face") for p in result["prompts"])
    assert result["identities"][0]["stored_bytes"] > 0


def test_two_concepts_scores_every_approach_and_the_base(toy_world):
    base, judge = toy_world
    config = TwoConceptConfig(
        pairs=1, steps=2, images=1, sampling_steps=2, regularisation_images=2, threshold=0.0
    )
    result = two_concepts(base, judge, config, progress=False)
    assert set(result["summary"]) == {*TWO_CONCEPT_APPROACHES, "base"}
    # threshold 0: every half counts as either subject, so "both" must be 1 everywhere
    assert all(scores["both"] == 1.0 for scores in result["summary"].values())
    # the regional approaches share their two LoRA fits
    fits = result["fit_seconds_mean"]
    assert fits["regional"] == fits["conv-everywhere"] > 0


def test_two_concepts_runs_only_the_approaches_asked_for(toy_world):
    base, judge = toy_world
    config = TwoConceptConfig(
        pairs=1, steps=1, images=1, sampling_steps=2, approaches=("regional",)
    )
    result = two_concepts(base, judge, config, progress=False)
    assert set(result["summary"]) == {"regional", "base"}
    with pytest.raises(HyperboothError, match="unknown two-concept approach 'both'"):
        TwoConceptConfig(approaches=("regional", "both"))


def test_identity_images_are_distinct_training_identities_and_top_up(tmp_path):
    from hyperbooth.miniworld.evaluate import identity_images
    from hyperbooth.miniworld.render import Identity

    identity_images(tmp_path, 3)
    names = sorted(p.stem for p in tmp_path.iterdir())
    assert len(names) == 3
    assert not any(held_out(Identity.from_index(int(n[2:]))) for n in names)
    identity_images(tmp_path, 5)  # a rerun with more keeps the first three
    assert set(names) <= {p.stem for p in tmp_path.iterdir()} and len(list(tmp_path.iterdir())) == 5


def test_hyperdreambooth_and_its_ablations_are_measured_like_the_other_methods(toy_world, tmp_path):
    import torch

    from hyperbooth.adapters.config import RESNET_CONV_TARGETS, AdapterConfig
    from hyperbooth.adapters.inject import target_layers
    from hyperbooth.hypernet.model import HyperNetConfig, HyperNetwork, save_hypernet

    base, judge = toy_world
    adapter = AdapterConfig(
        kind="lidb", lidb_a=8, lidb_b=4, unet_targets=RESNET_CONV_TARGETS, text_encoder_targets=()
    )
    layers = {k: tuple(m.weight.shape) for k, m in target_layers(base, adapter).items()}
    torch.manual_seed(0)
    sizes = {"encoder_width": 16, "encoder_layers": 1, "width": 16, "heads": 2}
    config = HyperNetConfig(adapter=adapter, image_size=base.resolution, **sizes)
    save_hypernet(HyperNetwork(config, layers), tmp_path / "hypernet")
    common = {"identities": 1, "steps": 2, "images_per_prompt": 1, "sampling_steps": 2}
    # Without a hypernetwork the relaxed LoRA takes these layers (with one, the same by default).
    common |= {"unet_targets": RESNET_CONV_TARGETS, "train_text_encoder": False}
    bytes_by_variant = {}
    for variant, flags in {
        "full": {},
        "hypernet-only": {"fine_tune": False},
        "no-hypernet": {"use_hypernet": False},
    }.items():
        config = PersonalisationConfig(
            method="hyperdreambooth", hypernet=str(tmp_path / "hypernet"), rank=2, **common, **flags
        )
        row = personalisation(base, judge, config, progress=False)["identities"][0]
        stages = set(row["stage_seconds"])
        assert ("predict" in stages) == (variant != "no-hypernet")
        assert ("fine_tune" in stages) == (variant != "hypernet-only")
        assert 0 <= row["personalised"]["identity"] <= 1
        bytes_by_variant[variant] = row["stored_bytes"]
    assert bytes_by_variant["full"] > max(
        bytes_by_variant["hypernet-only"], bytes_by_variant["no-hypernet"]
    )


def test_the_demo_runs_hyperdreambooth_with_the_shipped_hypernetwork_on_mini(tmp_path):
    from hyperbooth.adapters.files import read_adapter_parts
    from hyperbooth.demo import run_demo

    report = run_demo(tmp_path, steps=2, images_per_prompt=1, sampling_steps=2)
    assert report["method"] == "hyperdreambooth" and report["steps"] == 2
    assert {"load", "predict", "fine_tune", "generate"} <= set(report["seconds"])
    assert report["adapter_bytes"] > 0 and 0 <= report["scores"]["identity"] <= 1
    relaxed = read_adapter_parts(report["adapter_file"])["relaxed"]
    assert relaxed.info["settings"]["mask_weight"] == 3.0  # the face-weighted fine-tune


def test_the_demo_reference_its_traits_and_its_mask_are_reproducible(tmp_path):
    from hyperbooth.demo import DATA, write_reference

    write_reference(tmp_path)
    for name in ("demo_reference.png", "demo_reference_mask.png"):
        written = np.asarray(Image.open(tmp_path / name))
        assert np.array_equal(written, np.asarray(Image.open(DATA / name))), name
    assert json.loads((tmp_path / "demo_reference.json").read_text()) == json.loads(
        (DATA / "demo_reference.json").read_text()
    )


def test_personalisation_samples_at_the_guidance_it_is_given(toy_world, monkeypatch):
    import hyperbooth.miniworld.evaluate as evaluate

    base, judge = toy_world
    seen = []

    def record(model, prompts, **kwargs):
        seen.append((kwargs["guidance"], kwargs["steps"], kwargs.get("negative_prompt")))
        raise KeyboardInterrupt  # the base's images are drawn first; nothing else is needed

    monkeypatch.setattr(evaluate, "generate_images", record)
    with pytest.raises(KeyboardInterrupt):
        personalisation(base, judge, PersonalisationConfig(guidance=4.0), progress=False)
    config = PersonalisationConfig(sampling_steps=7, negative_reference=True)
    with pytest.raises(KeyboardInterrupt):
        personalisation(base, judge, config, progress=False)
    negative = "a face with no headwear on a plain white background, medium shot, shaded"
    assert seen == [(4.0, 20, None), (7.5, 7, negative)]
    with pytest.raises(HyperboothError, match="--batch-size and --sampling-steps must be >= 1"):
        personalisation(base, judge, PersonalisationConfig(batch_size=0), progress=False)


@pytest.mark.parametrize("describe,rescale", [(False, 0), (True, 0), (True, 3)])
def test_describe_reference_names_the_reference_context_in_the_fitting_prompt(
    toy_world, monkeypatch, describe, rescale
):
    import hyperbooth.methods as methods
    import hyperbooth.miniworld.evaluate as evaluate

    base, judge = toy_world
    seen = []

    def record(model, images, out, method, subject, *args, **kwargs):
        seen.append(subject.prompt)
        raise KeyboardInterrupt  # only the fitting prompt is wanted

    monkeypatch.setattr(evaluate, "generate_images", lambda *a, **k: [])
    monkeypatch.setattr(methods, "personalise", record)
    config = PersonalisationConfig(
        method="lora", identities=1, describe_reference=describe, rescale_copies=rescale
    )
    with pytest.raises(KeyboardInterrupt):
        personalisation(base, judge, config, progress=False)
    framing = "" if rescale else " medium shot,"  # rescaled copies name their own framing
    expected = (
        f"a sks face with no headwear on a plain white background,{framing} shaded"
        if describe
        else "a sks face"
    )
    assert seen == [expected]


def test_also_guidance_scores_the_same_fits_again_and_mask_weight_passes_the_face_map(
    toy_world, monkeypatch, tmp_path
):
    import hyperbooth.methods as methods
    import hyperbooth.miniworld.evaluate as evaluate
    from hyperbooth.miniworld.render import feature_map

    base, judge = toy_world
    guidances, fits = [], []
    real_generate, real_personalise = evaluate.generate_images, methods.personalise

    def generate(model, prompts, **kwargs):
        guidances.append(kwargs["guidance"])
        return real_generate(model, prompts, **kwargs)

    def personalise(*args, **kwargs):
        fits.append((args[4].mask_weight, kwargs["masks"]))
        return real_personalise(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_images", generate)
    monkeypatch.setattr(methods, "personalise", personalise)
    config = PersonalisationConfig(
        method="lora", identities=1, steps=1, images_per_prompt=1, sampling_steps=2,
        also_guidance=(2.0,), mask_weight=3.0,
    )  # fmt: skip
    result = personalisation(base, judge, config, progress=False)
    assert guidances == [7.5, 2.0, 7.5, 2.0]  # base, base again, subject, subject again
    assert len(fits) == 1 and fits[0][0] == 3.0
    assert np.array_equal(fits[0][1][0], feature_map(REFERENCE_CONTEXT, 0))
    also = result["also_guidance"]["2.0"]
    assert set(also["summary"]) == {"personalised", "base"}
    assert len(also["by_prompt"]) == len(result["prompts"])
    assert all(0 <= also["summary"]["personalised"][k] <= 1 for k in ("identity", "prompt"))
    # `compare` reads the report as written: at @2.0 it reproduces the extra scale's summary.
    report = tmp_path / "report.json"
    report.write_text(json.dumps(result))
    pooled = compare([f"{report}@2.0"])
    for score, value in also["summary"]["personalised"].items():
        assert pooled["mean"][score][0] == pytest.approx(value)
    assert compare([str(report)])["mean"]["prompt"][0] == pytest.approx(
        result["summary"]["personalised"]["prompt"]
    )


def test_describe_subject_starts_the_new_word_from_the_reference_traits(toy_world, monkeypatch):
    import hyperbooth.methods as methods
    import hyperbooth.miniworld.evaluate as evaluate
    from hyperbooth.miniworld.evaluate import held_out_identities, subject_description

    identity = held_out_identities(1, 0)[0]
    phrase = subject_description(identity)
    assert phrase.startswith(f"{NAMEABLE_TRAITS['face_shape'][identity.face_shape]} face")
    assert not phrase.startswith(("a ", "an "))
    bald = next(i for i in held_out_identities(200, 0) if i.hair_style == 3)
    assert "bald" in subject_description(bald)  # and no hair colour, which captions never name
    base, judge = toy_world
    seen = []

    def record(*args, **kwargs):
        seen.append((args[4].prompt, kwargs["textual_inversion"].initializer))
        raise KeyboardInterrupt  # only the word's start is wanted

    monkeypatch.setattr(evaluate, "generate_images", lambda *a, **k: [])
    monkeypatch.setattr(methods, "personalise", record)
    config = PersonalisationConfig(
        method="lora",
        identities=1,
        pivotal=True,
        describe_subject=("face_shape",),
        train_text_encoder=False,
    )
    with pytest.raises(KeyboardInterrupt):
        personalisation(base, judge, config, progress=False)
    assert seen == [("a <sks> face", f"{phrase.split()[0]} face")]  # the face shape alone
    colours = subject_description(identity, ("hair_colour", "eye_colour"))
    assert colours.startswith("face with ") and "glasses" not in colours
    with pytest.raises(HyperboothError, match="'nose' is not a nameable trait"):
        subject_description(identity, ("nose",))
    with pytest.raises(HyperboothError, match="--describe-subject"):
        personalisation(
            base, judge, PersonalisationConfig(method="lora", describe_subject=("glasses",)), False
        )


def _report(path, rows, guidance="3.0"):
    """A personalisation report with these (identity, main scores, scores by prompt at G) rows."""
    identities = [
        {
            "identity": index,
            "personalised": main,
            "also_guidance": {guidance: {"personalised_by_prompt": by_prompt}},
        }
        for index, main, by_prompt in rows
    ]
    path.write_text(json.dumps({"identities": identities}))
    return str(path)


def test_compare_pools_reports_and_pairs_identities_by_hand(tmp_path, capsys):
    from hyperbooth.miniworld.compare import main as compare_main

    def s(identity, hidden, prompt):
        return {"identity": identity, "hidden": hidden, "prompt": prompt}

    a = _report(tmp_path / "a.json", [(7, s(0.8, 0.5, 1.0), [s(0.6, 0.4, 1.0), s(1.0, 0.6, 0.5)])])
    b = _report(tmp_path / "b.json", [(9, s(0.6, 0.7, 0.5), [s(0.2, 0.2, 0.0), s(0.4, 0.4, 1.0)])])
    c = _report(tmp_path / "c.json", [(7, s(0.7, 0.5, 0.5), []), (9, s(0.2, 0.3, 1.0), [])])
    result = compare([a, b], [c])
    assert result["identities"] == 2
    assert result["mean"]["identity"] == pytest.approx((0.7, 0.1))  # sd 0.1414 / sqrt 2
    # Paired: identity 0.1 and 0.4 -> mean 0.25, standard error 0.15; prompt 0.5, -0.5.
    assert result["paired"]["identity"] == pytest.approx((0.25, 0.15))
    assert result["paired"]["prompt"] == pytest.approx((0.0, 0.5))
    # At @3.0 each identity's score is the mean over its prompts: (0.8, 0.75) and (0.3, 0.5).
    at_3 = compare([f"{a}@3.0", f"{b}@3.0"])
    assert at_3["mean"]["identity"][0] == pytest.approx(0.55)
    assert at_3["mean"]["prompt"][0] == pytest.approx(0.625)
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"run": json.loads((tmp_path / "a.json").read_text())}))
    assert compare([f"{bundle}#run@3.0"]) == compare([f"{a}@3.0"])
    compare_main([a, b, "--vs", c])
    assert "paired: +0.250 +- 0.150" in capsys.readouterr().out
    # Different identities cannot be paired; an absent scale or a non-report says what to pass.
    with pytest.raises(HyperboothError, match="different identities"):
        compare([b, a], [c])
    # --first N: a one-identity run pairs with the first identity of a longer run of its seed.
    with pytest.raises(HyperboothError, match="different identities"):
        compare([a], [c])
    assert compare([a], [c], first=1)["paired"]["identity"] == pytest.approx((0.1, 0.0))
    with pytest.raises(HyperboothError, match="--first must be >= 1"):
        compare([a], [c], first=0)
    # Per-prompt means and the mean fit time, when the reports hold them (by hand: two
    # identities' prompt 0 identity 0.6 and 0.2 -> 0.4; fit 2 s and 4 s -> 3 s).
    d = json.loads((tmp_path / "a.json").read_text()) | {"prompts": ["p0", "p1"]}
    d["identities"][0] |= {"fit_seconds": 2.0, "stage_seconds": {"fine_tune": 1.0}}
    e = json.loads((tmp_path / "b.json").read_text()) | {"prompts": ["p0", "p1"]}
    e["identities"][0] |= {"fit_seconds": 4.0, "stage_seconds": {"fine_tune": 3.0}}
    (tmp_path / "d.json").write_text(json.dumps(d))
    (tmp_path / "e.json").write_text(json.dumps(e))
    detailed = compare([f"{tmp_path / 'd.json'}@3.0", f"{tmp_path / 'e.json'}@3.0"])
    assert [row["text"] for row in detailed["by_prompt"]] == ["p0", "p1"]
    assert detailed["by_prompt"][0]["identity"] == pytest.approx(0.4)
    assert detailed["fit_seconds"] == pytest.approx(3.0)
    assert detailed["stage_seconds"] == {"fine_tune": pytest.approx(2.0)}
    assert "by_prompt" not in compare([f"{a}@3.0"])  # no prompts stored: no per-prompt means
    compare_main([f"{tmp_path / 'd.json'}@3.0", "--by-prompt"])
    assert "fit: 2.00 s per identity (fine_tune 1.000)" in capsys.readouterr().out
    with pytest.raises(HyperboothError, match="no per-prompt rows"):
        compare_main([f"{a}@3.0", "--by-prompt"])
    with pytest.raises(HyperboothError, match="no guidance '4.0'"):
        compare([f"{a}@4.0"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(HyperboothError, match="not an `evaluate personalisation` report"):
        compare_main([str(tmp_path / "x.json")])
    # Run as a module, that is one line on stderr and exit status 2, like every other verb.
    run = subprocess.run(
        [sys.executable, "-m", "hyperbooth.miniworld.compare", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "not an `evaluate personalisation` report" in run.stderr
