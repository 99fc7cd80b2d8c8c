"""Custom Diffusion: what trains, the file round trip, plain diffusers loading, the merge."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hyperbooth.cli import main as cli
from hyperbooth.diffusion import diffusion_loss
from hyperbooth.errors import HyperboothError
from hyperbooth.merge import caption_features, closed_form_merge, merge_custom_diffusion, residuals
from hyperbooth.methods import CustomDiffusionConfig, SubjectConfig, personalise_concepts
from hyperbooth.methods.common import rescale_image
from hyperbooth.methods.custom_diffusion import (
    cross_attention_layers,
    load_custom_diffusion,
    read_custom_diffusion,
)
from hyperbooth.training import TrainConfig
from test_export import _pipeline  # a plain diffusers pipeline, no hyperbooth code

EMBEDDING = "embeddings.token_embedding.weight"
COLOURS = {"<new1>": (190, 90, 40), "<new2>": (30, 60, 200)}


def _captioned(folder, count: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 120, 90)).save(folder / f"r{i}.png")
        (folder / f"r{i}.txt").write_text(f"a face number {i}")
    return folder


def _fit(base, tmp_path, tokens=("<new1>",), steps: int = 3, **config):
    concepts = [
        (
            SubjectConfig(
                token=t,
                class_name="face",
                regularisation_dir=str(_captioned(tmp_path / "reg")),
            ),
            [Image.new("RGB", (32, 32), COLOURS[t])],
        )
        for t in tokens
    ]
    return personalise_concepts(
        base,
        concepts,
        tmp_path / "-".join(t.strip("<>") for t in tokens),
        CustomDiffusionConfig(augmentations=3, **config),
        TrainConfig(steps=steps, learning_rate=0.05, device="cpu"),
        progress=False,
    )


def test_only_cross_attention_kv_and_the_new_row_train(tiny_base, tmp_path):
    unet_before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in tiny_base.text_encoder.state_dict().items()}
    rows = len(tiny_base.tokenizer)
    result = _fit(tiny_base, tmp_path)
    kv = {f"{k.removeprefix('unet.')}.weight" for k in cross_attention_layers(tiny_base.unet)}
    assert kv and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in kv)
    unet_after = tiny_base.unet.state_dict()
    changed = {k for k, v in unet_before.items() if not torch.equal(unet_after[k], v)}
    assert changed == kv
    te_after = tiny_base.text_encoder.state_dict()
    assert all(torch.equal(te_after[k], v) for k, v in te_before.items() if k != EMBEDDING)
    assert torch.equal(te_after[EMBEDDING][:rows], te_before[EMBEDDING])
    meta, deltas, vectors = read_custom_diffusion(result.output)
    assert {k.removeprefix("unet.") for k in deltas} == kv
    assert list(vectors) == ["<new1>"] and meta["concepts"][0]["prompt"] == "a <new1> face"
    for key, delta in deltas.items():
        name = key.removeprefix("unet.")
        torch.testing.assert_close(unet_before[name] + delta, unet_after[name])


def test_our_loader_and_plain_diffusers_give_the_trained_model(tiny_base, tmp_path):
    fresh = copy.deepcopy(tiny_base)
    result = _fit(tiny_base, tmp_path)
    ours = copy.deepcopy(fresh)
    assert load_custom_diffusion(result.output, ours) == ["<new1>"]
    # The documented plain-diffusers recipe (docs/CUSTOM_DIFFUSION.md), verbatim in spirit.
    pipe = _pipeline(copy.deepcopy(fresh))
    tensors = load_file(str(result.output))
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("unet."):
                pipe.unet.get_parameter(key.removeprefix("unet.")).add_(value)
            else:
                pipe.load_textual_inversion(value, token=key.removeprefix("embeddings."))
    ids = ours.tokenizer("a <new1> face", padding="max_length", max_length=77, return_tensors="pt")
    theirs_ids = pipe.tokenizer(
        "a <new1> face", padding="max_length", max_length=77, return_tensors="pt"
    )
    assert torch.equal(ids.input_ids, theirs_ids.input_ids)
    config = ours.unet.config
    latents = torch.randn(
        1, config.in_channels, config.sample_size, config.sample_size,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    t = torch.tensor([500])
    with torch.no_grad():
        hidden = ours.text_encoder(ids.input_ids)[0]
        torch.testing.assert_close(pipe.text_encoder(ids.input_ids)[0], hidden, atol=0, rtol=0)
        torch.testing.assert_close(tiny_base.text_encoder(ids.input_ids)[0], hidden)
        mine = ours.unet(latents, t, hidden).sample
        theirs = pipe.unet(latents, t, hidden).sample
        trained = tiny_base.unet(latents, t, hidden).sample
        untouched = fresh.unet(latents, t, hidden).sample
    torch.testing.assert_close(mine, theirs, atol=0, rtol=0)  # diffusers == ours
    torch.testing.assert_close(mine, trained, atol=1e-6, rtol=1e-5)  # == the trained model
    assert (mine - untouched).abs().max() > 1e-4  # and loading had an effect


def test_joint_training_keeps_one_token_per_concept(tiny_base, tmp_path):
    result = _fit(tiny_base, tmp_path, tokens=("<new1>", "<new2>"))
    meta, _, vectors = read_custom_diffusion(result.output)
    assert sorted(vectors) == ["<new1>", "<new2>"]
    assert [c["token"] for c in meta["concepts"]] == ["<new1>", "<new2>"]
    assert not torch.equal(vectors["<new1>"], vectors["<new2>"])


def test_each_class_draws_its_own_prior_images_and_a_batch_may_exceed_the_bank(tiny_base, tmp_path):
    from hyperbooth.methods.common import CLASS_PROMPT_FILE, class_images_folder

    concepts = [
        (
            SubjectConfig(token=token, class_name=name, num_class_images=2),
            [Image.new("RGB", (32, 32), COLOURS[token])],
        )
        for token, name in (("<new1>", "face"), ("<new2>", "cat"))
    ]
    result = personalise_concepts(
        tiny_base,
        concepts,
        tmp_path,
        CustomDiffusionConfig(rescale=False, augmentations=1),  # a bank of 2 images...
        TrainConfig(steps=1, batch_size=4, device="cpu"),  # ...and batches of 4
        progress=False,
    )
    assert result.output.is_file()
    for prompt in ("a face", "a cat"):
        folder = class_images_folder(tmp_path, prompt)
        assert (folder / CLASS_PROMPT_FILE).read_text().strip() == prompt
        assert len(list(folder.glob("*.png"))) == 2


def test_train_q_out_adds_query_and_output_projections(tiny_base, tmp_path):
    result = _fit(tiny_base, tmp_path, train_q_out=True, rescale=False)
    _, deltas, _ = read_custom_diffusion(result.output)
    suffixes = {k.split("attn2.")[1] for k in deltas}
    assert suffixes == {"to_k.weight", "to_v.weight", "to_q.weight", "to_out.0.weight",
                        "to_out.0.bias"}  # fmt: skip
    # the closed-form merge solves K/V only: such files are refused in one line, not a traceback
    plain = _fit(copy.deepcopy(tiny_base), tmp_path, tokens=("<new2>",)).output
    with pytest.raises(HyperboothError, match="trained with --train-q-out"):
        merge_custom_diffusion([result.output, plain], tiny_base, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_rescale_masks_the_padding_and_names_the_framing():
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    rng = np.random.default_rng(0)
    small, mask, prefix = rescale_image(image, 0.45, rng, grid=4)
    assert prefix in ("a far away ", "very small ")
    side = int(round(64 * 0.45 / 4)) * 4 // 4
    assert mask.sum() == side * side and mask.shape == (16, 16)
    pixels = np.asarray(small)
    ys, xs = np.nonzero(np.kron(mask, np.ones((4, 4))))
    assert (pixels[ys, xs] == (255, 0, 0)).all()  # the image lies exactly under the mask
    assert (pixels[np.kron(mask, np.ones((4, 4))) == 0] == 128).all()
    large, mask, prefix = rescale_image(image, 1.3, rng, grid=4)
    assert prefix in ("zoomed in ", "close up ") and mask.all() and large.size == (64, 64)
    same, mask, prefix = rescale_image(image, 1.0, rng, grid=4)
    assert prefix == "" and mask.all()


def test_masked_loss_ignores_the_masked_out_region(tiny_base):
    base = tiny_base
    c, s = base.unet.config.in_channels, base.unet.config.sample_size
    latents = torch.randn(2, c, s, s, generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(2, 77, base.unet.config.cross_attention_dim)
    full = torch.ones(2, 1, s, s)

    def loss(lat, mask):
        return diffusion_loss(
            base.unet, base.scheduler, lat, hidden, torch.Generator().manual_seed(0), mask=mask
        )

    torch.testing.assert_close(loss(latents, full), loss(latents, None))
    mask = full.clone()
    mask[:, :, :, s // 2 :] = 0
    # The UNet mixes pixels, so changing the masked half changes predictions everywhere;
    # what must hold is that the loss averages only where the mask is 1.
    lat = latents.clone().requires_grad_(True)
    value = loss(lat, mask)
    value.backward()
    assert torch.isfinite(value) and lat.grad is not None
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    with torch.no_grad():
        noisy = base.scheduler.add_noise(latents, noise, t)
        pred = base.unet(noisy, t, hidden).sample
        assert base.scheduler.config.prediction_type == "epsilon"
        squared = (pred - noise) ** 2
        by_hand = squared[..., : s // 2].mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(value.detach(), by_hand)


def test_merge_meets_its_constraint_on_random_data():
    g = torch.Generator().manual_seed(0)
    out, d, n, m = 24, 32, 200, 6
    w0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    c_reg = torch.randn(n, d, generator=g, dtype=torch.float64)
    c_tgt = torch.randn(m, d, generator=g, dtype=torch.float64)
    v_tgt = torch.randn(m, out, generator=g, dtype=torch.float64)
    w = closed_form_merge(w0, c_reg, c_tgt, v_tgt)
    assert (w @ c_tgt.T - v_tgt.T).abs().max() < 1e-6
    # Optimal: any other W meeting the constraint drifts further on the regularisation rows.
    basis = torch.linalg.svd(c_tgt).Vh[m:]  # directions W may change without moving targets
    other = w + torch.randn(out, d - m, generator=g, dtype=torch.float64) @ basis * 0.1
    assert (other @ c_tgt.T - v_tgt.T).abs().max() < 1e-6
    assert torch.linalg.norm(c_reg @ (other - w0).T) > torch.linalg.norm(c_reg @ (w - w0).T)
    target, drift = residuals(w, w0, c_reg, c_tgt, v_tgt)
    assert target < 1e-9 and 0 < drift


def test_merge_of_two_concepts_keeps_each_concepts_prompt_mapping(tiny_base, tmp_path):
    fresh = copy.deepcopy(tiny_base)
    first = _fit(copy.deepcopy(fresh), tmp_path, tokens=("<new1>",)).output
    second = _fit(copy.deepcopy(fresh), tmp_path, tokens=("<new2>",)).output
    captions = [f"a face with {c} hair" for c in ("red", "blue", "black", "blond")] * 40
    report = merge_custom_diffusion(
        [first, second], copy.deepcopy(fresh), tmp_path / "ab.safetensors", captions
    )
    assert report.tokens == ["<new1>", "<new2>"] and report.target_residual_max < 1e-6
    merged = copy.deepcopy(fresh)
    load_custom_diffusion(report.output, merged)
    for path, token in ((first, "<new1>"), (second, "<new2>")):
        alone = copy.deepcopy(fresh)
        load_custom_diffusion(path, alone)
        features = caption_features(
            alone, [f"a {token} face"], alone.tokenizer.convert_tokens_to_ids([token])
        )
        for key in read_custom_diffusion(path)[1]:
            name = key.removeprefix("unet.")
            mapped = features.float() @ merged.unet.get_parameter(name).T
            expected = features.float() @ alone.unet.get_parameter(name).T
            torch.testing.assert_close(mapped, expected, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_one_line_errors(tiny_base, tmp_path):
    (tmp_path / "empty").mkdir()
    subject = SubjectConfig(token="<x>", regularisation_dir=str(tmp_path / "empty"))
    with pytest.raises(HyperboothError, match="no captioned images"):
        personalise_concepts(
            copy.deepcopy(tiny_base), [(subject, [Image.new("RGB", (32, 32))])], tmp_path / "o"
        )
    known = SubjectConfig(token="face", regularisation_dir=str(_captioned(tmp_path / "reg")))
    with pytest.raises(HyperboothError, match="already in the vocabulary"):
        personalise_concepts(
            copy.deepcopy(tiny_base), [(known, [Image.new("RGB", (32, 32))])], tmp_path / "o"
        )
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"not a file")
    with pytest.raises(HyperboothError, match="not a readable safetensors"):
        read_custom_diffusion(bogus)


def test_cli_trains_jointly_merges_and_generates(tmp_path):
    for token, colour in COLOURS.items():
        folder = tmp_path / token.strip("<>")
        folder.mkdir()
        Image.new("RGB", (32, 32), colour).save(folder / "x.png")
    reg = str(_captioned(tmp_path / "reg"))
    common = ["--base", "tiny-random", "--device", "cpu", "--steps", "2", "--regularisation", reg]
    for token in COLOURS:
        name = token.strip("<>")
        args = ["train", "--method", "custom-diffusion", *common, "--token", token]
        assert (
            cli([*args, "--images", str(tmp_path / name), "--out", str(tmp_path / f"r{name}")]) == 0
        )
    joint = ["train", "--method", "custom-diffusion", *common, "--images", "unused"]
    joint += [f"--concept={t}:face:{tmp_path / t.strip('<>')}" for t in COLOURS]
    assert cli([*joint, "--out", str(tmp_path / "joint")]) == 0
    files = [str(tmp_path / f"r{t.strip('<>')}" / "custom_diffusion.safetensors") for t in COLOURS]
    merged = tmp_path / "ab.safetensors"
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(f"a face with {c} eyes" for c in ("red", "blue", "green")) * 30)
    merge = ["merge", *files, "--base", "tiny-random", "--captions", str(captions)]
    assert cli([*merge, "--out", str(merged)]) == 0
    grid = tmp_path / "grid.png"
    generate = ["generate", "--base", "tiny-random", "--custom-diffusion", str(merged)]
    generate += ["--prompt", "a <new1> face next to a <new2> face", "--n", "1", "--steps", "2"]
    assert cli([*generate, "--out", str(grid)]) == 0 and grid.is_file()
    assert cli(["merge", files[0], "--base", "tiny-random", "--out", str(merged)]) == 2
    assert cli(["merge", *files, "--base", "tiny-random", "--out", str(tmp_path / "x.png")]) == 2
