"""The hypernetwork: shapes and keys, near-zero start, save/load, encoders, training and resume."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel

from hyperbooth.adapters.inject import add_adapter, target_layers, weights_fingerprint
from hyperbooth.bases import load_base
from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.hypernet.model import HyperNetConfig, HyperNetwork, load_hypernet, save_hypernet
from hyperbooth.hypernet.train import HyperLossConfig
from hyperbooth.miniworld.trait_encoder import TraitEncoder
from test_precompute import SMALL, _faces

TINY_HYPER = {"image_size": 32, "encoder_width": 32, "encoder_layers": 1, "width": 32, "heads": 2}


def _hypernet(base, **overrides) -> HyperNetwork:
    torch.manual_seed(0)
    config = HyperNetConfig(adapter=SMALL, **{**TINY_HYPER, **overrides})
    layers = {k: tuple(m.weight.shape) for k, m in target_layers(base, SMALL).items()}
    return HyperNetwork(config, layers)


def test_predictions_are_keyed_and_shaped_like_the_adapter_and_start_near_zero(tiny_base):
    hypernet = _hypernet(tiny_base)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    predicted = hypernet(images)
    adapter = add_adapter(tiny_base, SMALL, n_samples=3)
    own = dict(adapter.named_parameters())
    assert predicted.keys() == own.keys()
    assert all(predicted[k].shape == own[k].shape for k in own)
    assert max(v.abs().max().item() for v in predicted.values()) < 0.05
    # The tensors load straight into a per-sample adapter.
    adapter.load_state_dict({k: v.detach() for k, v in predicted.items()})


def test_each_refinement_step_changes_the_tokens(tiny_base):
    hypernet = _hypernet(tiny_base, iterations=3)
    features = hypernet.encode(torch.zeros(1, 3, 32, 32))
    steps = hypernet.tokens(features)
    assert len(steps) == 3 and not torch.equal(steps[0], steps[1])
    assert len(hypernet.tokens(features, iterations=1)) == 1


def test_save_and_load_give_the_same_predictions(tiny_base, tmp_path):
    hypernet = _hypernet(tiny_base)
    save_hypernet(hypernet, tmp_path)
    again = load_hypernet(tmp_path)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = hypernet(images), again(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(HyperboothError, match="no hypernetwork"):
        load_hypernet(tmp_path / "absent")
    meta = json.loads((tmp_path / "hypernet.json").read_text())
    (tmp_path / "hypernet.safetensors").write_text("damaged")
    with pytest.raises(HyperboothError, match="not a readable safetensors"):
        load_hypernet(tmp_path)
    meta["config"]["new_knob"] = 1
    (tmp_path / "hypernet.json").write_text(json.dumps(meta))
    with pytest.raises(HyperboothError, match="newer hyperbooth"):
        load_hypernet(tmp_path)
    (tmp_path / "hypernet.json").write_text("{")
    with pytest.raises(HyperboothError, match="is damaged"):
        load_hypernet(tmp_path)


def test_a_pretrained_encoder_loads_by_path_stays_frozen_and_is_not_copied(tiny_base, tmp_path):
    small = ViTConfig(
        image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2
    )
    vit = ViTModel(small, add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    hypernet = _hypernet(tiny_base, encoder=str(tmp_path / "vit"))
    assert not hypernet.trains_encoder()
    assert all(not p.requires_grad for p in hypernet.encoder.parameters())
    save_hypernet(hypernet, tmp_path / "h")
    stored = load_file(str(tmp_path / "h" / "hypernet.safetensors"))
    assert not any(k.startswith("encoder.") for k in stored)
    again = load_hypernet(tmp_path / "h")
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = hypernet(images), again(images)
        # a base of 64 px (image_size 64) feeds the 32-px ViT at its own size
        _hypernet(tiny_base, encoder=str(tmp_path / "vit"), image_size=64)(torch.rand(1, 3, 64, 64))
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    with pytest.raises(HyperboothError, match="image encoder"):
        _hypernet(tiny_base, encoder=str(tmp_path / "nothing-here"))


def test_loss_weights_are_checked():
    HyperLossConfig(alpha=1.0, beta=0.0)
    HyperLossConfig(alpha=0.0, beta=0.0, gamma=1.0)
    with pytest.raises(HyperboothError):
        HyperLossConfig(alpha=0.0, beta=0.0)
    with pytest.raises(HyperboothError, match="--gamma"):
        HyperLossConfig(gamma=-1.0)


def _identity_set(base, hypernet, targets=None):
    """Three identities whose pixels are constant i / 3 (so a batch's rows can be read back)."""
    from hyperbooth.hypernet.train import IdentitySet

    pixels = torch.arange(3.0).div(3).view(3, 1, 1, 1).expand(3, 3, 32, 32).contiguous()
    if targets is None:  # the hypernetwork's own predictions
        with torch.no_grad():
            targets = {k: v.clone() for k, v in hypernet(pixels).items()}
    channels, side = 4, base.resolution // 8
    return IdentitySet(
        names=["a", "b", "c"],
        pixels=pixels,
        latent_mean=torch.randn(3, channels, side, side),
        latent_std=torch.full((3, channels, side, side), 0.1),
        targets=targets,
    )


def test_the_distill_term_is_the_output_distance_to_the_fitted_weights(tiny_base, monkeypatch):
    """Checked against the fitted LiDBs loaded one by one into an ordinary adapter."""
    import hyperbooth.hypernet.train as module
    from hyperbooth.hypernet.train import HyperNetTraining
    from hyperbooth.methods.common import token_ids
    from hyperbooth.training import StepBatch

    hypernet = _hypernet(tiny_base)
    with torch.no_grad():  # the prediction is exactly zero: the student is the base itself
        hypernet.head_weight.zero_()
        shapes = {k: v.shape for k, v in hypernet(torch.zeros(3, 3, 32, 32)).items()}
    torch.manual_seed(1)
    fitted = {k: torch.randn(shape) * 0.3 for k, shape in shapes.items()}
    data = _identity_set(tiny_base, hypernet, fitted)
    seen, drawn = [], []
    hypernet.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 0, 0, 0]))
    real = module.draw_noise

    def spy(scheduler, latents, generator, max_timestep):
        noise, timesteps = real(scheduler, latents, generator, max_timestep)
        drawn.append((latents, noise, timesteps))
        return noise, timesteps

    monkeypatch.setattr(module, "draw_noise", spy)
    loss = HyperLossConfig(alpha=0.0, beta=0.0, gamma=1.0)
    training = HyperNetTraining(tiny_base, hypernet, data, loss, 2)
    try:
        training.loss(StepBatch(torch.Generator().manual_seed(0), 2))
    finally:
        training.adapter.remove()
    index = (seen[0] * 3).round().long().tolist()
    latents, noise, timesteps = drawn[0]
    noisy = tiny_base.scheduler.add_noise(latents, noise, timesteps)
    ids = token_ids(tiny_base, "a sks face")
    squared = []
    with torch.no_grad():
        hidden = tiny_base.text_encoder(ids)[0].expand(len(index), -1, -1)
        student = tiny_base.unet(noisy, timesteps, hidden).sample
        for row, i in enumerate(index):
            adapter = add_adapter(tiny_base, SMALL)
            adapter.load_state_dict({k: v[i] for k, v in fitted.items()})
            hidden = tiny_base.text_encoder(ids)[0]
            teacher = tiny_base.unet(noisy[row : row + 1], timesteps[row : row + 1], hidden)
            adapter.remove()
            squared.append((student[row] - teacher.sample[0]).square().mean())
    expected = torch.stack(squared).mean().item()
    assert expected > 1e-6
    assert training.log[-1]["distill"] == pytest.approx(expected, rel=1e-4)


def test_the_distill_term_is_zero_at_the_fitted_weights_and_trains_every_head(tiny_base):
    from hyperbooth.hypernet.train import HyperNetTraining
    from hyperbooth.training import StepBatch

    hypernet = _hypernet(tiny_base)
    with torch.no_grad():  # big enough that each layer's LiDB changes the UNet's output
        hypernet.head_weight.mul_(100)
    data = _identity_set(tiny_base, hypernet)
    loss = HyperLossConfig(alpha=0.0, beta=0.0, gamma=1.0)
    training = HyperNetTraining(tiny_base, hypernet, data, loss, 2)
    try:
        training.loss(StepBatch(torch.Generator().manual_seed(0), 2))
        assert training.log[-1]["distill"] < 1e-10
        with torch.no_grad():
            data.targets = {k: torch.zeros_like(v) for k, v in data.targets.items()}
        training.loss(StepBatch(torch.Generator().manual_seed(0), 2)).backward()
    finally:
        training.adapter.remove()
    assert training.log[-1]["distill"] > 1e-6
    grad = hypernet.head_weight.grad
    assert grad is not None and bool((grad.flatten(1).abs().sum(1) > 0).all())  # every layer


def _train(tmp_path, out: str, steps: int, *extra: str) -> int:
    return cli(
        [
            "train-hypernet", "--base", "tiny-random", "--device", "cpu",
            "--images", str(tmp_path / "faces"), "--precomputed", str(tmp_path / "pre"),
            "--out", str(tmp_path / out), "--steps", str(steps), "--batch-size", "2",
            "--width", "32", "--iterations", "2", "--lr", "1e-3", *extra,
        ]
    )  # fmt: skip


def _three_identities(tmp_path, steps: int) -> None:
    """tmp_path/faces with 3 images and tmp_path/pre with their pre-optimised LiDBs."""
    _faces(tmp_path / "faces", 3)
    assert cli(
        ["precompute", "--base", "tiny-random", "--device", "cpu", "--images",
         str(tmp_path / "faces"), "--out", str(tmp_path / "pre"), "--steps", str(steps),
         "--lidb-a", "16", "--lidb-b", "8"]
    ) == 0  # fmt: skip


def test_train_hypernet_runs_and_resumes_exactly(tmp_path):
    _three_identities(tmp_path, steps=2)
    assert _train(tmp_path, "full", 4) == 0
    assert _train(tmp_path, "split", 2, "--checkpoint-every", "2") == 0
    assert _train(tmp_path, "split", 4, "--checkpoint-every", "2", "--resume") == 0
    full = load_file(str(tmp_path / "full" / "hypernet" / "hypernet.safetensors"))
    split = load_file(str(tmp_path / "split" / "hypernet" / "hypernet.safetensors"))
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)
    # The loss terms survive the resume: the split run logs the same 4 steps as the full one.
    terms = [
        json.loads((tmp_path / run / "loss_terms.json").read_text()) for run in ("full", "split")
    ]
    assert len(terms[0]) == 4 and terms[0] == terms[1]
    # an image edited after its LiDB was fitted is refused, not paired with the old fit
    from hyperbooth.hypernet.train import load_identity_set

    first = sorted((tmp_path / "faces").iterdir())[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(first)
    with pytest.raises(HyperboothError, match="changed since its LiDB was fitted"):
        load_identity_set(load_base("tiny-random"), tmp_path / "faces", tmp_path / "pre")


@pytest.mark.parametrize("convs", [False, True], ids=["attention", "resnet-convs"])
def test_the_diffusion_loss_reaches_every_head_of_the_hypernetwork(tiny_base, convs):
    from dataclasses import replace

    from hyperbooth.adapters.config import RESNET_CONV_TARGETS
    from hyperbooth.hypernet.train import HyperNetTraining, IdentitySet
    from hyperbooth.training import StepBatch

    adapter = SMALL
    if convs:  # mini's layer set: the ResNet convolutions, UNet only
        adapter = replace(SMALL, unet_targets=RESNET_CONV_TARGETS, text_encoder_targets=())
    torch.manual_seed(0)
    layers = {k: tuple(m.weight.shape) for k, m in target_layers(tiny_base, adapter).items()}
    assert all(len(shape) == (4 if convs else 2) for shape in layers.values())
    hypernet = HyperNetwork(HyperNetConfig(adapter=adapter, **TINY_HYPER), layers)
    with torch.no_grad():
        targets = {
            k: torch.zeros(3, *v.shape[1:]) for k, v in hypernet(torch.zeros(3, 3, 32, 32)).items()
        }
    channels, side = 4, tiny_base.resolution // 8
    data = IdentitySet(
        names=["a", "b", "c"],
        pixels=torch.rand(3, 3, 32, 32) * 2 - 1,
        latent_mean=torch.randn(3, channels, side, side),
        latent_std=torch.full((3, channels, side, side), 0.1),
        targets=targets,
    )
    training = HyperNetTraining(tiny_base, hypernet, data, HyperLossConfig(beta=0.0), 2)
    try:
        loss = training.loss(StepBatch(torch.Generator().manual_seed(0), 2))
        loss.backward()
    finally:
        training.adapter.remove()
    grad = hypernet.head_weight.grad
    assert grad is not None and bool((grad.flatten(1).abs().sum(1) > 0).all())  # every layer
    assert training.log[-1]["diffusion"] > 0


def test_views_are_drawn_as_diffusion_targets_with_their_captions(tiny_base, tmp_path, monkeypatch):
    import hyperbooth.hypernet.train as module
    from hyperbooth.hypernet.train import HyperNetTraining, load_identity_set
    from hyperbooth.methods.common import token_ids
    from hyperbooth.training import StepBatch

    _three_identities(tmp_path, steps=1)
    views = tmp_path / "views" / "face_001"  # two views of the second identity only
    views.mkdir(parents=True)
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (32, 32), colour).save(views / f"{i}.png")
        (views / f"{i}.txt").write_text(f"a sks face, view {i}")
    data = load_identity_set(tiny_base, tmp_path / "faces", tmp_path / "pre", tmp_path / "views")
    assert data.views.of_identity == [[], [0, 1], []] and len(data.views.ids) == 2
    captured = []
    real = module.draw_noise

    def spy(scheduler, latents, generator, max_timestep):
        captured.append(max_timestep)
        return real(scheduler, latents, generator, max_timestep)

    monkeypatch.setattr(module, "draw_noise", spy)
    training = HyperNetTraining(
        tiny_base, _hypernet(tiny_base), data, HyperLossConfig(beta=0.0, max_timestep=300), 2
    )
    try:
        training.loss(StepBatch(torch.Generator().manual_seed(0), 2))
        ids = [token_ids(tiny_base, t)[0] for t in ("a sks face", "a sks face, view 0")]
        # Identity 1's possible targets: its reference (0), then its views (1, 2).
        options = [data.latent_mean[1], *data.views.latent_mean]
        chosen = []
        generator = torch.Generator().manual_seed(1)
        for _ in range(40):
            mean, _, caption = training._targets(torch.tensor([0, 1]), generator)
            # Identity 0 has no views: always its reference with the loss prompt.
            assert torch.equal(mean[0], data.latent_mean[0]) and torch.equal(caption[0], ids[0])
            row = next(j for j, option in enumerate(options) if torch.equal(mean[1], option))
            chosen.append((row, caption[1]))
    finally:
        training.adapter.remove()
    assert captured == [300]
    # Identity 1 draws its reference and both views, each with its own caption.
    assert {row for row, _ in chosen} == {0, 1, 2}
    assert all(torch.equal(c, ids[0]) for row, c in chosen if row == 0)
    assert all(torch.equal(c, ids[1]) for row, c in chosen if row == 1)
    with pytest.raises(HyperboothError, match="no folder named after any identity"):
        load_identity_set(tiny_base, tmp_path / "faces", tmp_path / "pre", tmp_path / "faces")


def test_the_mini_hypernet_recipe_runs_every_stage_exports_float16_and_resumes(
    tmp_path, monkeypatch
):
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import encoder_fingerprint
    from hyperbooth.miniworld.train_hypernet import (
        HYPERNET_FOLDER,
        HypernetRecipe,
        encoder_folder,
        encoder_name,
    )
    from hyperbooth.miniworld.train_hypernet import main as reproduce
    from hyperbooth.miniworld.trait_encoder import TRAIT_ENCODER, TRAIT_ENCODER_FOLDER

    recipe = {
        "identities": 3, "identities_per_step": 2, "precompute_steps": 2, "steps": 2,
        "batch_size": 2, "encoder_width": 16, "encoder_layers": 1, "width": 32,
        "checkpoint_every": 1, "views_per_identity": 2, "max_timestep": 500, "gamma": 0.5,
        "adapter": {"kind": "lidb", "rank": 2, "lidb_a": 8, "lidb_b": 4,
        "unet_targets": [r".*resnets\.\d+\.conv[12]"], "text_encoder_targets": []},
        "trait_encoder": {"examples": 64, "epochs": 1, "batch": 32, "eval_examples": 32,
                          "channels": [8, 8, 8, 8], "hidden": 16, "mixed_precision": "no"},
    }  # fmt: skip
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    argv = ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--base",
            "tiny-random", "--config", str(tmp_path / "recipe.json"),
            "--encoder-out", str(tmp_path / "encoder")]  # fmt: skip
    reproduce(argv)
    # the trait encoder: the recipe's settings over the shipped run's (seed 1, no held-out)
    encoder_info = json.loads((tmp_path / "encoder" / "judge.json").read_text())
    assert encoder_info["config"]["hidden"] == 16 and encoder_info["config"]["seed"] == 1
    assert encoder_info["config"]["exclude_held_out"] is True
    encoder_bytes = (tmp_path / "encoder" / "judge.safetensors").read_bytes()
    assert len(list((tmp_path / "work" / "pre").glob("*.safetensors"))) == 3
    assert len(list((tmp_path / "work" / "views").glob("*/*.png"))) == 6
    settings = json.loads((tmp_path / "work" / "pre" / "settings.json").read_text())
    assert settings["max_timestep"] == 500
    stored = load_file(str(tmp_path / "out" / "hypernet.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    assert (tmp_path / "out" / "loss.png").is_file()
    hypernet = load_hypernet(tmp_path / "out")
    assert hypernet.config.adapter.rank == 2 and hypernet.head_weight.dtype == torch.float32
    meta = json.loads((tmp_path / "out" / "hypernet.json").read_text())
    info = meta["info"]
    assert set(info["seconds"]) == {"identities", "encoder", "precompute", "train"}
    assert info["identities"] == 3 and set(info["trait_encoder"]) == {"accuracy", "seconds"}
    # the fingerprint of the base's own weights (not of the base with adapters wrapped in)
    assert info["base_unet"] == weights_fingerprint(load_base("tiny-random").unet)
    # the frozen encoder is referenced by its folder (absolute: loads from any working
    # directory), not copied into the file; the hash of its weights names the network
    assert meta["config"]["encoder"] == str((tmp_path / "encoder").resolve())
    assert not any(key.startswith("encoder.") for key in stored)
    assert isinstance(hypernet.encoder, TraitEncoder)
    assert info["encoder_fingerprint"] == encoder_fingerprint(str(tmp_path / "encoder"))
    first = (tmp_path / "out" / "hypernet.safetensors").read_bytes()
    (tmp_path / "encoder" / "judge.safetensors").write_bytes(b"stale")  # reinstalled from work
    reproduce(argv)  # everything is done: the rerun resumes at the end and exports the same
    assert (tmp_path / "out" / "hypernet.safetensors").read_bytes() == first
    assert (tmp_path / "encoder" / "judge.safetensors").read_bytes() == encoder_bytes
    recipe["trait_encoder"]["epochs"] = 2  # the trained one in --work no longer fits the recipe
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(HyperboothError, match=r"other settings \(epochs\); remove it"):
        reproduce(argv)
    with pytest.raises(HyperboothError, match="unknown trait_encoder field 'colour'"):
        HypernetRecipe(trait_encoder={"colour": 1})
    recipe["identities"] = 2  # fewer faces than --work holds: training would use all three
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(
        HyperboothError, match=r"identities drawn with other settings \(identities\)"
    ):
        reproduce(argv)
    terms = json.loads((tmp_path / "work" / "train" / "loss_terms.json").read_text())
    assert len(terms) == 2 and all(t["distill"] >= 0 for t in terms)
    # Without --encoder-out the encoder goes inside the export, named relative to it, never
    # over the shipped one; only the package's own export installs the package's encoder.
    assert encoder_folder(None, HYPERNET_FOLDER) == TRAIT_ENCODER_FOLDER
    assert encoder_name(TRAIT_ENCODER_FOLDER, HYPERNET_FOLDER) == TRAIT_ENCODER
    recipe["identities"], recipe["trait_encoder"]["epochs"] = 3, 1  # the settings of the run
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    out = tmp_path / "out2"  # the same --work exported again elsewhere: training resumes at its end
    reproduce([*argv[:2], "--out", str(out), *argv[4:8]])
    assert (out / "traits" / "judge.safetensors").read_bytes() == encoder_bytes
    assert (out / "hypernet.safetensors").read_bytes() == first
    assert json.loads((out / "hypernet.json").read_text())["config"]["encoder"] == "traits"
    monkeypatch.chdir(tmp_path / "work")  # resolved against the hypernetwork's folder
    assert isinstance(load_hypernet(out).encoder, TraitEncoder)
    # Another network in the encoder's place is refused, not read silently.
    weights = load_file(str(out / "traits" / "judge.safetensors"))
    save_file({k: v + 1 for k, v in weights.items()}, str(out / "traits" / "judge.safetensors"))
    with pytest.raises(HyperboothError, match="was trained with another traits encoder"):
        load_hypernet(out)


def test_the_shipped_mini_hypernet_fits_mini_and_is_small():
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import BUILT_IN, BUILT_IN_ENCODERS, encoder_fingerprint
    from hyperbooth.miniworld.judges import DEFAULT_JUDGE

    folder = BUILT_IN["mini"]
    hypernet = load_hypernet("mini")
    # it reads faces through the shipped trait encoder, which is not the scorer (the judge)
    assert hypernet.config.encoder == "mini-traits" and isinstance(hypernet.encoder, TraitEncoder)
    encoder_folder = BUILT_IN_ENCODERS["mini-traits"]
    encoder_info = json.loads((encoder_folder / "judge.json").read_text())
    judge_info = json.loads((DEFAULT_JUDGE / "judge.json").read_text())
    assert encoder_info["config"]["seed"] != judge_info["config"]["seed"]
    assert encoder_info["config"]["exclude_held_out"] is True
    weights = (encoder_folder / "judge.safetensors").read_bytes()
    assert weights != (DEFAULT_JUDGE / "judge.safetensors").read_bytes()
    files = [*folder.iterdir(), *encoder_folder.iterdir()]
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20
    info = json.loads((folder / "hypernet.json").read_text())["info"]
    assert info["identities"] >= 1000
    base = load_base("mini")
    assert info["base_unet"] == weights_fingerprint(base.unet)  # trained on the mini that ships
    # ... through the encoder that ships (load_hypernet refuses any other under that name)
    assert info["encoder_fingerprint"] == encoder_fingerprint("mini-traits")
    layers = target_layers(base, hypernet.config.adapter)
    assert list(layers) == hypernet.keys
    with torch.no_grad():
        predicted = hypernet(torch.zeros(1, 3, base.resolution, base.resolution))
    adapter = add_adapter(base, hypernet.config.adapter)
    adapter.load_state_dict({k: v[0] for k, v in predicted.items()})  # same keys and shapes


def test_an_unknown_recipe_field_is_a_one_line_error(tmp_path):
    from hyperbooth.miniworld.train_hypernet import main as reproduce

    (tmp_path / "recipe.json").write_text('{"stepz": 3}')
    with pytest.raises(HyperboothError, match="unknown recipe field 'stepz'"):
        reproduce(["--work", str(tmp_path / "w"), "--config", str(tmp_path / "recipe.json")])
    assert not (tmp_path / "w").exists()


def test_a_convolutional_encoder_gives_one_token_per_cell_and_keeps_its_batchnorm(
    tiny_base, tmp_path
):
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(tmp_path / "resnet")
    hypernet = _hypernet(tiny_base, encoder=str(tmp_path / "resnet"))
    assert hypernet.project.in_features == 16  # hidden_sizes[-1]
    features = hypernet.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 4 * 4, 32)  # 32 px -> a 4x4 map -> 16 tokens of width 32
    hypernet.train()
    assert hypernet.training and not hypernet.encoder.training  # frozen: statistics fixed
    before = {k: v.clone() for k, v in hypernet.encoder.state_dict().items()}
    hypernet(torch.rand(4, 3, 32, 32))
    assert all(torch.equal(v, hypernet.encoder.state_dict()[k]) for k, v in before.items())
    save_hypernet(hypernet, tmp_path / "h")  # BatchNorm buffers: still a clean round trip
    again = load_hypernet(tmp_path / "h")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = hypernet.eval()(images), again.eval()(images)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_encoder_recipe_trains_resumes_exactly_and_exports_a_transformers_folder(tmp_path):
    from transformers import AutoModel

    from hyperbooth.miniworld.train_encoder import (
        EncoderRecipe,
        contrastive_batch,
        info_nce,
        train_encoder,
    )

    recipe = EncoderRecipe(
        hidden_sizes=(8, 16), depths=(1, 1), embedding=8, identities_per_step=4, steps=3,
        checkpoint_every=1, eval_identities=4, mixed_precision="no",
    )  # fmt: skip
    images, count = contrastive_batch(0, recipe)
    assert images.shape == (8, 3, 64, 64) and count == 4
    assert torch.equal(images, contrastive_batch(0, recipe)[0])  # a pure function of the step
    # The loss is low when each view's partner is its nearest neighbour, high when not.
    matched = torch.eye(4).repeat(2, 1)
    shuffled = torch.cat([torch.eye(4), torch.eye(4).roll(1, 0)])
    assert info_nce(matched, 4, 0.1) < 0.01 < 5 < info_nce(shuffled, 4, 0.1)
    full = train_encoder(recipe, tmp_path / "a", tmp_path / "out_a", progress=False)
    assert train_encoder(recipe, tmp_path / "b", tmp_path / "out_b", False, stop_at=2) is None
    assert not (tmp_path / "out_b").exists()
    split = train_encoder(recipe, tmp_path / "b", tmp_path / "out_b", progress=False)
    a = AutoModel.from_pretrained(tmp_path / "out_a")
    b = AutoModel.from_pretrained(tmp_path / "out_b")
    b_state = b.state_dict()
    assert all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())
    assert next(a.parameters()).dtype in (torch.float16, torch.float32)
    assert set(full["retrieval"]) == {"held_out_top1", "siblings_top1", "chance"}
    assert split["final_loss_mean_50"] == full["final_loss_mean_50"]


def test_the_mini_encoder_by_name_says_how_to_make_it_when_absent(tiny_base, tmp_path, monkeypatch):
    from hyperbooth.hypernet import model

    monkeypatch.setitem(model.BUILT_IN_ENCODERS, "mini-encoder", tmp_path / "absent")
    with pytest.raises(
        HyperboothError, match="not installed in .*absent; train it with .*miniworld.train_encoder"
    ):
        _hypernet(tiny_base, encoder="mini-encoder")


def _tiny_judge_folder(folder) -> None:
    from dataclasses import asdict

    from hyperbooth.miniworld.judges import Judge, JudgeConfig, JudgeNet

    torch.manual_seed(0)
    config = JudgeConfig(channels=(8, 8, 8, 8), hidden=16)
    Judge(
        JudgeNet(config.channels, config.repeats, config.hidden), {"config": asdict(config)}
    ).save(folder)


def test_a_judge_format_folder_is_a_frozen_encoder_of_one_trait_token(
    tiny_base, tmp_path, monkeypatch
):
    from hyperbooth.hypernet import model
    from hyperbooth.miniworld.judges import ATTRIBUTES
    from hyperbooth.miniworld.train_hypernet import encoder_name

    _tiny_judge_folder(tmp_path / "traits")
    monkeypatch.setitem(model.BUILT_IN_ENCODERS, "mini-traits", tmp_path / "traits")
    for name in (str(tmp_path / "traits"), "mini-traits"):
        hypernet = _hypernet(tiny_base, encoder=name)
        assert isinstance(hypernet.encoder, TraitEncoder) and not hypernet.trains_encoder()
    sizes = [len(v) for v in ATTRIBUTES.values()]
    with torch.no_grad():  # 32 px images are resized to the 64 px the network reads
        token = hypernet.encoder(torch.rand(2, 3, 32, 32) * 2 - 1).last_hidden_state
    assert (
        token.shape == (2, 1, 16 + sum(sizes)) and hypernet.project.in_features == token.shape[-1]
    )
    for block in token[:, 0, 16:].split(sizes, dim=1):  # one probability block per attribute
        assert torch.allclose(block.sum(1), torch.ones(2))
    save_hypernet(hypernet, tmp_path / "h")
    assert not any(
        k.startswith("encoder.") for k in load_file(str(tmp_path / "h" / "hypernet.safetensors"))
    )
    again = load_hypernet(tmp_path / "h")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = hypernet.eval()(images), again.eval()(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert encoder_name(tmp_path / "traits", tmp_path / "h") == str((tmp_path / "traits").resolve())
    monkeypatch.setitem(model.BUILT_IN_ENCODERS, "mini-traits", tmp_path / "absent")
    with pytest.raises(HyperboothError, match="not installed in .*absent; reinstall hyperbooth"):
        _hypernet(tiny_base, encoder="mini-traits")
    with pytest.raises(HyperboothError, match="encoder folder .*gone is missing"):
        _hypernet(tiny_base, encoder=str(tmp_path / "gone"))


def test_judge_renders_can_leave_out_the_held_out_identities():
    from hyperbooth.miniworld.judges import ATTRIBUTES, render_examples
    from hyperbooth.miniworld.render import TRAITS, Identity, held_out

    def identities(labels):
        return [Identity(*row[: len(TRAITS)].tolist()) for row in labels]

    _, every = render_examples(300, seed=5, progress=False)
    _, kept = render_examples(300, seed=5, progress=False, exclude_held_out=True)
    assert every.shape == kept.shape == (300, len(ATTRIBUTES))
    assert any(held_out(i) for i in identities(every))  # about 1%: 300 draws find some
    assert not any(held_out(i) for i in identities(kept))
