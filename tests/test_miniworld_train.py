"""The mini-model recipe end to end at toy size: every stage runs, resumes and exports."""

from __future__ import annotations

import json

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from hyperbooth.bases import load_base
from hyperbooth.miniworld.train_base import main

TOY = {
    "threads": 1,
    "vae_channels": [8, 16, 16],
    "vae_norm_groups": 4,
    "vae_crop": 16,
    "vae_steps": 2,
    "vae_batch": 2,
    "examples": 8,
    "text_hidden": 32,
    "text_layers": 1,
    "text_heads": 2,
    "text_intermediate": 37,
    "text_steps": 3,
    "text_batch": 4,
    "unet_channels": [16, 32, 32],
    "unet_heads": 2,
    "denoiser_steps": 3,
    "denoiser_batch": 4,
    "warmup_steps": 1,
    "checkpoint_every": 2,
    "sample_every": 3,
}


def test_toy_run_exports_a_loadable_diffusers_folder(tmp_path):
    config = tmp_path / "toy.json"
    config.write_text(json.dumps(TOY))
    out = tmp_path / "model"
    main(["--work", str(tmp_path / "work"), "--out", str(out), "--config", str(config)])
    base = load_base(str(out))
    assert base.resolution == 64 and base.unet.dtype == torch.float32
    StableDiffusionPipeline.from_pretrained(str(out))
    stored = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}  # shipped at half the size
    assert base.vae.config.scaling_factor != 0.18215  # measured from the trained VAE
    losses = json.loads((tmp_path / "work" / "losses.json").read_text())
    assert len(losses["vae"]) == 2 and len(losses["denoiser"]) == 3
    assert (tmp_path / "work" / "samples" / "000003.png").is_file()
    assert (tmp_path / "work" / "loss.png").is_file()

    # Rerunning with more steps resumes from the checkpoints instead of starting over.
    config.write_text(json.dumps({**TOY, "denoiser_steps": 4}))
    main(["--work", str(tmp_path / "work"), "--out", str(out), "--config", str(config)])
    losses2 = json.loads((tmp_path / "work" / "losses.json").read_text())
    assert losses2["vae"] == losses["vae"] and losses2["denoiser"][:3] == losses["denoiser"]
    assert len(losses2["denoiser"]) == 4


def test_the_mini_schedule_has_zero_terminal_snr_and_keeps_weight_there():
    import torch

    from hyperbooth.miniworld.train_base import MiniConfig, build_models, snr_weights

    scheduler = build_models(MiniConfig(**{**TOY, "sample_every": 0})).scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # no signal left at t=999
    weights = snr_weights(scheduler, torch.tensor([0, 500, 999]), gamma=5.0)
    assert weights[2] == 1.0 and weights[0] < 0.01  # pure noise keeps full weight


def test_text_time_embedding_and_denser_captions_still_make_a_plain_sd_folder(tmp_path):
    import numpy as np

    from hyperbooth.miniworld.captions import sample_caption

    config = tmp_path / "toy.json"
    toy = {**TOY, "unet_text_time_embedding": True, "caption_mention_probability": 0.9}
    config.write_text(json.dumps(toy))
    out = tmp_path / "model"
    main(["--work", str(tmp_path / "work"), "--out", str(out), "--config", str(config)])
    base = load_base(str(out))
    assert base.unet.config.addition_embed_type == "text"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    image = pipe("a face with red hair", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    # The pooled caption is added to the time embedding: two prompts, two different additions.
    ids = base.tokenizer(
        ["a face with red hair", "a face on a blue background"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        aug = base.unet.add_embedding(base.text_encoder(ids)[0])
    assert not torch.allclose(aug[0], aug[1])

    def named(p: float) -> float:
        rng = np.random.default_rng(0)
        return np.mean(
            [len(sample_caption(rng, mention_probability=p).mentioned) for _ in range(400)]
        )

    assert named(0.9) > 1.5 * named(0.5)


def test_a_probability_outside_0_1_in_the_recipe_is_a_one_line_error(tmp_path, capsys):
    import pytest

    from hyperbooth.errors import HyperboothError

    config = tmp_path / "bad.json"
    config.write_text(json.dumps({**TOY, "caption_mention_probability": 1.5}))
    with pytest.raises(HyperboothError, match="caption_mention_probability is a probability"):
        main(
            [
                "--work",
                str(tmp_path / "work"),
                "--out",
                str(tmp_path / "m"),
                "--config",
                str(config),
            ]
        )
    assert not (tmp_path / "work").exists()


def _run(tmp_path, name: str, recipe: dict, *extra: str) -> dict:
    """One toy run in its own work folder; its losses.json."""
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps(recipe))
    work = tmp_path / name
    main(["--work", str(work), "--out", str(work / "model"), "--config", str(config), *extra])
    return json.loads((work / "losses.json").read_text())


def test_face_loss_weight_and_init_from_reuse_what_they_should(tmp_path):
    import pytest

    from hyperbooth.errors import HyperboothError

    plain = _run(tmp_path, "plain", TOY)
    data = load_file(str(tmp_path / "plain" / "dataset.safetensors"))
    features = data["features"].float()
    assert features.shape == (len(data["mean"]), 16, 16)  # on the latent grid
    assert 0 <= features.min() and features.max() <= 1 and 0.05 < features.mean() < 0.35

    # The same data, noise and initial weights; only the loss's weighting differs.
    weighted = _run(tmp_path, "weighted", {**TOY, "face_loss_weight": 4.0})
    assert weighted["vae"] == plain["vae"] and weighted["text"] == plain["text"]
    assert weighted["denoiser"][0] != plain["denoiser"][0]

    # --init-from: the VAE and text encoder come from a trained folder and are not retrained.
    reused = _run(tmp_path, "reused", TOY, "--init-from", str(tmp_path / "plain" / "model"))
    assert set(reused) == {"denoiser"}
    for part in ("vae", "text_encoder"):
        name = "diffusion_pytorch_model" if part == "vae" else "model"
        source, copy_ = (
            load_file(str(tmp_path / run / "model" / part / f"{name}.safetensors"))
            for run in ("plain", "reused")
        )
        assert source.keys() == copy_.keys()
        assert all(torch.equal(source[k], copy_[k]) for k in source)
    scaling = (
        load_base(str(tmp_path / r / "model")).vae.config.scaling_factor
        for r in ("plain", "reused")
    )
    assert len(set(scaling)) == 1

    with pytest.raises(HyperboothError, match="does not match this recipe"):
        _run(
            tmp_path,
            "wider",
            {**TOY, "text_hidden": 48},
            "--init-from",
            str(tmp_path / "plain" / "model"),
        )
    with pytest.raises(HyperboothError, match="--init-from .*no diffusers folder there"):
        _run(tmp_path, "missing", TOY, "--init-from", str(tmp_path / "does-not-exist"))
    assert not (tmp_path / "missing").exists()
    old = tmp_path / "old"
    old.mkdir()
    without = {k: v for k, v in data.items() if k != "features"}
    from safetensors.torch import save_file

    save_file(without, str(old / "dataset.safetensors"))
    with pytest.raises(HyperboothError, match="predates feature maps"):
        _run(tmp_path, "old", {**TOY, "face_loss_weight": 1.0})
    with pytest.raises(HyperboothError, match="face_loss_weight must be >= 0"):
        _run(tmp_path, "negative", {**TOY, "face_loss_weight": -1.0})
