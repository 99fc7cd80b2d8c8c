"""The training loop: exact resume, precision, prior preservation, accelerate-free determinism."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.errors import HyperboothError
from hyperbooth.methods import SubjectConfig, TextualInversionConfig, personalise
from hyperbooth.methods.common import class_images, class_images_folder
from hyperbooth.training import TrainConfig, make_accelerator

SMALL_LIDB = AdapterConfig(kind="lidb", lidb_a=16, lidb_b=8)


def _images(n: int = 2) -> list[Image.Image]:
    """Distinct flat-colour 32 px images (tiny-random's resolution)."""
    return [Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)) for i in range(n)]


def _final_weights(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "checkpoint" / "trainable.safetensors"))


@pytest.mark.parametrize("method", ["lora", "lidb", "dreambooth"])
def test_resume_equals_uninterrupted(tiny_base, method, tmp_path):
    config = dict(batch_size=2, gradient_accumulation=2, seed=5, device="cpu", learning_rate=1e-3)
    adapter = SMALL_LIDB if method == "lidb" else AdapterConfig(kind="lora", rank=2)
    images = _images()

    straight = tmp_path / "straight"
    personalise(
        copy.deepcopy(tiny_base),
        images,
        straight,
        method,
        adapter=adapter,
        train_config=TrainConfig(steps=4, **config),
        progress=False,
    )
    split = tmp_path / "split"
    personalise(
        copy.deepcopy(tiny_base),
        images,
        split,
        method,
        adapter=adapter,
        train_config=TrainConfig(steps=2, **config),
        progress=False,
    )
    # a kill between save_checkpoint's two renames leaves the whole new checkpoint aside
    (split / "checkpoint").rename(split / ".checkpoint.tmp")
    personalise(
        copy.deepcopy(tiny_base),
        images,
        split,
        method,
        adapter=adapter,
        train_config=TrainConfig(steps=4, **config),
        resume=True,
        progress=False,
    )

    a, b = _final_weights(straight), _final_weights(split)
    assert a.keys() == b.keys()
    changed = 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    fresh = dict(tiny_base.unet.named_parameters())
    if method == "dreambooth":
        changed = sum(not torch.equal(a[f"unet.{k}"], p) for k, p in fresh.items())
        assert changed > 0


def test_resume_with_other_settings_is_refused(tiny_base, tmp_path):
    from hyperbooth.errors import HyperboothError

    images = _images(1)

    def fit(out, resume=False, photos=images, **config):
        personalise(
            copy.deepcopy(tiny_base),
            photos,
            out,
            "lidb",
            adapter=SMALL_LIDB,
            train_config=TrainConfig(device="cpu", **config),
            resume=resume,
            progress=False,
        )

    fit(tmp_path, steps=1)
    with pytest.raises(HyperboothError, match="different settings"):
        fit(tmp_path, resume=True, steps=2, seed=9)
    fit(tmp_path / "three", steps=3, checkpoint_every=2)
    with pytest.raises(HyperboothError, match="at step 3; resume with --steps >= 3"):
        fit(tmp_path / "three", resume=True, steps=1, checkpoint_every=2)
    with pytest.raises(HyperboothError, match="different settings \\(inputs\\)"):
        other = [Image.new("RGB", (32, 32), (1, 2, 3))]  # other photos into the same run
        fit(tmp_path / "three", resume=True, photos=other, steps=4, checkpoint_every=2)
    with pytest.raises(HyperboothError, match="--device 'gpu': give auto, cpu or cuda"):
        make_accelerator(TrainConfig(device="gpu"))


def test_training_reduces_loss_and_trains_only_the_adapter(tiny_base, tmp_path):
    models = (tiny_base.unet, tiny_base.text_encoder, tiny_base.vae)
    before = {id(p): p.detach().clone() for m in models for p in m.parameters()}
    result = personalise(
        tiny_base,
        _images(1),
        tmp_path,
        "lora",
        adapter=AdapterConfig(rank=4),
        train_config=TrainConfig(steps=30, learning_rate=3e-3, device="cpu"),
        progress=False,
    )
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first
    for m in models:
        for name, p in m.named_parameters():
            if ".adapters." not in name:
                assert torch.equal(before[id(p)], p), name


@pytest.mark.filterwarnings("ignore:--mixed-precision bf16 on a CPU without")  # emulated here
def test_bf16_autocast_keeps_trainable_tensors_float32(tiny_base, tmp_path):
    result = personalise(
        tiny_base,
        _images(1),
        tmp_path,
        "lidb",
        adapter=SMALL_LIDB,
        train_config=TrainConfig(steps=2, mixed_precision="bf16", device="cpu"),
        progress=False,
    )
    weights = _final_weights(tmp_path)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_prior_preservation_generates_and_reuses_class_images(tiny_base, tmp_path):
    subject = SubjectConfig(prior_preservation=True, num_class_images=2)
    personalise(
        copy.deepcopy(tiny_base),
        _images(1),
        tmp_path,
        "lidb",
        subject=subject,
        adapter=SMALL_LIDB,
        train_config=TrainConfig(steps=1, device="cpu"),
        progress=False,
    )
    folder = class_images_folder(tmp_path, "a face")
    files = sorted(folder.glob("*.png"))
    assert len(files) == 2 and folder.parent == tmp_path / "class_images"
    stamps = [f.stat().st_mtime_ns for f in files]
    personalise(
        copy.deepcopy(tiny_base),
        _images(1),
        tmp_path / "again",
        "lidb",
        subject=SubjectConfig(
            prior_preservation=True,
            num_class_images=2,
            class_images_dir=str(folder),
        ),
        adapter=SMALL_LIDB,
        train_config=TrainConfig(steps=1, device="cpu"),
        progress=False,
    )
    assert [f.stat().st_mtime_ns for f in files] == stamps
    # images drawn for "a face" never stand in for another class
    other = SubjectConfig(class_name="cat", prior_preservation=True, num_class_images=2)
    with pytest.raises(HyperboothError, match="drawn for 'a face', not 'a cat'"):
        class_images(tiny_base, replace(other, class_images_dir=str(folder)), folder, False)
    assert len(class_images(tiny_base, other, class_images_folder(tmp_path, "a cat"), False)) == 2


def test_max_timestep_bounds_the_training_timesteps(tiny_base):
    from hyperbooth.diffusion import diffusion_loss

    seen = []
    unet = tiny_base.unet

    def record(module, args, kwargs):
        seen.append(args[1].clone())

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    size = unet.config.sample_size
    latents = torch.randn(64, unet.config.in_channels, size, size)
    hidden = torch.randn(64, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        diffusion_loss(unet, tiny_base.scheduler, latents, hidden, torch.Generator().manual_seed(0),
                       max_timestep=50)  # fmt: skip
    handle.remove()
    assert int(seen[0].max()) < 50 and len(set(seen[0].tolist())) > 10
    with pytest.raises(ValueError, match="max_timestep"):
        diffusion_loss(unet, tiny_base.scheduler, latents, hidden, torch.Generator(),
                       max_timestep=1001)  # fmt: skip
    with pytest.raises(HyperboothError, match="max-timestep"):
        SubjectConfig(max_timestep=0)
    with pytest.raises(HyperboothError, match="past this base's 1000 timesteps"):
        personalise(tiny_base, _images(1), "/nonexistent/never-written", "lora",
                    subject=SubjectConfig(max_timestep=5000), progress=False)  # fmt: skip


def test_a_checkpoint_from_before_a_new_unset_setting_still_resumes(tiny_base, tmp_path):
    import json

    images = _images(1)
    run = {"adapter": SMALL_LIDB, "progress": False}
    personalise(copy.deepcopy(tiny_base), images, tmp_path, "lidb",
                train_config=TrainConfig(steps=1, device="cpu"), **run)  # fmt: skip
    state_file = tmp_path / "checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["run"]["subject"]["max_timestep"]  # as a checkpoint written before the setting
    state_file.write_text(json.dumps(state))
    personalise(copy.deepcopy(tiny_base), images, tmp_path, "lidb", resume=True,
                train_config=TrainConfig(steps=2, device="cpu"), **run)  # fmt: skip
    assert json.loads(state_file.read_text())["step"] == 2
    with pytest.raises(HyperboothError, match=r"different settings \(subject\)"):
        personalise(copy.deepcopy(tiny_base), images, tmp_path, "lidb", resume=True,
                    subject=SubjectConfig(max_timestep=500),
                    train_config=TrainConfig(steps=3, device="cpu"), **run)  # fmt: skip


def test_rescaled_copies_train_with_their_own_prompt_and_loss_mask(
    tiny_base, tmp_path, monkeypatch
):
    from hyperbooth.methods import common
    from hyperbooth.methods.common import SMALL_WORDS, prepare_subject, token_ids
    from hyperbooth.methods.lora import AdapterDreamBooth, AdapterMethodConfig
    from hyperbooth.training import StepBatch

    subject = SubjectConfig(rescale_copies=6)
    data = prepare_subject(tiny_base, subject, _images(2), torch.device("cpu"), tmp_path, False)
    assert data.instance_mean.shape[0] == 12 and data.instance_ids.shape[0] == 12
    masks = data.instance_mask.flatten(1).mean(1)
    assert data.instance_mask.shape[1] == 1 and masks[0] == 1 and masks[6] == 1  # the originals
    assert torch.equal(data.instance_ids[0], token_ids(tiny_base, "a sks face")[0])
    decoded = tiny_base.tokenizer.batch_decode(data.instance_ids, skip_special_tokens=True)
    prompts = [" ".join(p.replace("</w>", " ").split()) for p in decoded]
    assert any(m < 1 for m in masks)  # some copies are shrunk, and only they are masked
    for prompt, share in zip(prompts, masks.tolist(), strict=True):
        assert prompt.endswith("sks face")
        if any(prompt.startswith(w.strip()) for w in SMALL_WORDS):
            assert share < 1

    seen = {}

    def spy(*args, **kwargs):
        seen["hidden"], seen["mask"] = args[3], kwargs["mask"]
        return real(*args, **kwargs)

    real = common.diffusion_loss
    monkeypatch.setattr(common, "diffusion_loss", spy)
    config = AdapterMethodConfig(adapter=SMALL_LIDB, train_text_encoder=False)
    method = AdapterDreamBooth(tiny_base, subject, data, config)
    generator = torch.Generator().manual_seed(3)
    index = torch.randint(0, 12, (5,), generator=torch.Generator().manual_seed(3))
    method.loss(StepBatch(generator, 5)).backward()
    assert torch.equal(seen["mask"], data.instance_mask[index])
    for row, i in zip(seen["hidden"], index.tolist(), strict=True):
        assert torch.equal(row, tiny_base.text_encoder(data.instance_ids[i : i + 1])[0][0])

    with pytest.raises(HyperboothError, match="--rescale"):
        SubjectConfig(rescale_copies=-1)
    with pytest.raises(HyperboothError, match="--templates draw a prompt per sample"):
        personalise(tiny_base, _images(1), tmp_path / "ti", "textual-inversion",
                    subject=SubjectConfig(token="<me>", rescale_copies=2), progress=False,
                    textual_inversion=TextualInversionConfig(templates=("a {}",)))  # fmt: skip


def test_a_new_word_trains_in_each_copy_s_own_prompt(tiny_base, tmp_path):
    from hyperbooth.methods.common import prepare_subject, token_ids
    from hyperbooth.methods.textual_inversion import TextualInversion

    base = copy.deepcopy(tiny_base)
    subject = SubjectConfig(token="<me>", rescale_copies=3)
    data = prepare_subject(base, subject, _images(2), torch.device("cpu"), tmp_path, False)
    before = list(data.prompts)
    assert len(before) == 6 and all("<me> face" in p for p in before)
    method = TextualInversion(base, subject, data, TextualInversionConfig(vectors=2))
    # Every copy keeps its own words ("zoomed in ...") with the token now the word's 2 entries.
    expected = [p.replace("<me>", "<me> <me>_1") for p in before]
    assert torch.equal(data.instance_ids, token_ids(base, expected))
    assert len(set(map(tuple, data.instance_ids.tolist()))) > 1
    result = personalise(copy.deepcopy(tiny_base), _images(1), tmp_path / "piv", "lora",
                         subject=SubjectConfig(token="<me>", rescale_copies=2), pivotal=True,
                         train_text_encoder=False,
                         train_config=TrainConfig(steps=2, device="cpu"), progress=False)  # fmt: skip
    assert (result.output.parent / "learned_embeds.safetensors").is_file()
    assert method.trainable()["textual_inversion.vectors"].shape[0] == 2


def test_each_image_trains_with_its_own_caption(tiny_base, tmp_path):
    from hyperbooth.methods.common import prepare_subject, token_ids

    captions = ("a sks face on a white background", "a sks face, pencil sketch")
    subject = SubjectConfig(instance_prompts=captions)
    data = prepare_subject(tiny_base, subject, _images(2), torch.device("cpu"), tmp_path, False)
    assert torch.equal(data.instance_ids, token_ids(tiny_base, list(captions)))
    assert torch.equal(data.instance_mask, torch.ones_like(data.instance_mask))  # nothing masked
    with pytest.raises(HyperboothError, match="2 captions for 3 images"):
        prepare_subject(tiny_base, subject, _images(3), torch.device("cpu"), tmp_path, False)
    with pytest.raises(HyperboothError, match="does not contain the token 'sks'"):
        SubjectConfig(instance_prompts=("a sks face", "a face"))
    with pytest.raises(HyperboothError, match="--rescale and --captions give each photo"):
        personalise(tiny_base, _images(1), tmp_path / "ti", "textual-inversion",
                    subject=SubjectConfig(token="<me>", instance_prompts=("a <me> face",)),
                    textual_inversion=TextualInversionConfig(templates=("a {}",)),
                    progress=False)  # fmt: skip


def test_train_captions_reads_a_txt_beside_each_image(tmp_path, capsys):
    import json

    from hyperbooth.cli import main as cli

    folder = tmp_path / "photos"
    folder.mkdir()
    for k, image in enumerate(_images(2)):
        image.save(folder / f"{k}.png")
    (folder / "0.txt").write_text("a sks face on a white background\n")
    args = ["train", "--method", "lidb", "--base", "tiny-random", "--images", str(folder)]
    args += ["--captions", "--steps", "1", "--device", "cpu", "--json", "--out"]
    assert cli([*args, str(tmp_path / "a")]) == 2  # 1.png has no caption
    assert "1.txt is missing" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (folder / "1.txt").write_text("a sks face,\npencil sketch\n")  # lines join with a space
    assert cli([*args, str(tmp_path / "b")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompt"] == ["a sks face on a white background", "a sks face, pencil sketch"]


def test_a_caption_file_that_is_not_text_is_a_one_line_error(tmp_path):
    from hyperbooth.atomic import read_lines

    (tmp_path / "0.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(HyperboothError, match="0.txt is not UTF-8 text; save the caption as UTF-8"):
        read_lines(tmp_path / "0.txt", "caption")


def test_masks_weigh_the_loss_on_the_subject_region(tiny_base, tmp_path):
    import numpy as np

    from hyperbooth.diffusion import diffusion_loss
    from hyperbooth.methods.common import prepare_subject

    mask = np.zeros((32, 32), dtype=np.float32)
    mask[:16, :16] = 1.0  # the top-left quarter is the subject
    mask[16:20, 16:20] = 0.5
    subject = SubjectConfig(mask_weight=3.0)
    data = prepare_subject(
        tiny_base, subject, _images(1), torch.device("cpu"), tmp_path, False, masks=[mask]
    )
    grid = tiny_base.vae_scale_factor
    weights = data.instance_mask[0, 0]
    assert weights.shape == (32 // grid, 32 // grid)
    half = 16 // grid
    assert torch.all(weights[:half, :half] == 4.0) and weights[-1, -1] == 1.0
    assert weights[half, half] == 1.0 + 3.0 * 0.5 * min(1.0, 4 / grid) ** 2  # area-averaged
    # The loss is the weighted mean: equal to the plain mean when every weight is equal.
    latents = torch.randn(
        1, *data.instance_mean.shape[1:], generator=torch.Generator().manual_seed(0)
    )
    hidden = tiny_base.text_encoder(data.instance_ids)[0]
    plain = diffusion_loss(
        tiny_base.unet, tiny_base.scheduler, latents, hidden, torch.Generator().manual_seed(1)
    )
    flat = diffusion_loss(
        tiny_base.unet, tiny_base.scheduler, latents, hidden, torch.Generator().manual_seed(1),
        mask=torch.full_like(data.instance_mask, 4.0),
    )  # fmt: skip
    torch.testing.assert_close(plain, flat)
    for bad, message in [
        ([mask, mask], "2 masks for 1 images"),
        ([mask * 2], r"masks must be in \[0, 1\]"),
    ]:
        with pytest.raises(HyperboothError, match=message):
            prepare_subject(tiny_base, subject, _images(1), torch.device("cpu"), tmp_path, False,
                            masks=bad)  # fmt: skip


def test_rescaled_copies_move_the_subject_mask_with_the_image(tiny_base, tmp_path):
    import numpy as np
    from PIL import Image

    from hyperbooth.methods.common import prepare_subject, rescale_image

    mask = np.zeros((32, 32), dtype=np.float32)
    mask[:16, :16] = 1.0
    image = Image.fromarray((mask[..., None] * 255).repeat(3, 2).astype(np.uint8))
    rng = np.random.default_rng(0)
    same = rescale_image(image, 1.0, rng, grid=4, subject_mask=mask)
    np.testing.assert_allclose(same[3], mask, atol=1 / 255)
    small, region, _, moved = rescale_image(image, 0.5, rng, grid=4, subject_mask=mask)
    # The mask lands where the image's white quarter landed, and nowhere outside the paste.
    white = np.asarray(small)[..., 0] > 200
    assert np.abs((moved > 0.5) ^ white).mean() < 0.02
    assert moved[np.kron(region, np.ones((4, 4))) == 0].max() == 0
    assert abs(moved.sum() - mask.sum() / 4) < 0.05 * mask.sum() / 4
    large, _, _, moved = rescale_image(image, 1.3, rng, grid=4, subject_mask=mask)
    assert np.abs((moved > 0.5) ^ (np.asarray(large)[..., 0] > 200)).mean() < 0.02

    subject = SubjectConfig(rescale_copies=4, mask_weight=3.0)
    data = prepare_subject(
        tiny_base, subject, [image], torch.device("cpu"), tmp_path, False, masks=[mask]
    )
    plain = prepare_subject(
        tiny_base, SubjectConfig(mask_weight=3.0), [image], torch.device("cpu"), tmp_path,
        False, masks=[mask],
    )  # fmt: skip
    weights = data.instance_mask[:, 0]
    assert weights.shape[0] == 4 and torch.equal(weights[0], plain.instance_mask[0, 0])
    assert weights.max() == 4.0 and weights.min() >= 0
    shrunk = [k for k in range(4) if (weights[k] == 0).any()]
    assert shrunk  # a shrunk copy: no loss on its padding, the face weighed inside the paste
    assert all((weights[k] > 1).any() for k in shrunk)


def test_masks_weigh_a_new_word_too_but_not_with_templates(tiny_base, tmp_path):
    import numpy as np

    from hyperbooth.methods import TextualInversionConfig

    mask = np.ones((32, 32), dtype=np.float32)
    subject = SubjectConfig(token="<me>", mask_weight=3.0)
    train = TrainConfig(steps=1, learning_rate=0.01, device="cpu")
    result = personalise(copy.deepcopy(tiny_base), _images(1), tmp_path / "lora", "lora", subject,
                         SMALL_LIDB, train, train_text_encoder=False, progress=False,
                         pivotal=True, masks=[mask])  # fmt: skip
    assert (result.output.parent / "learned_embeds.safetensors").is_file()
    with pytest.raises(HyperboothError, match="--templates"):
        personalise(copy.deepcopy(tiny_base), _images(1), tmp_path / "ti", "textual-inversion",
                    subject, train_config=train, progress=False, masks=[mask],
                    textual_inversion=TextualInversionConfig(templates=("a {} face",)))  # fmt: skip


def test_train_masks_reads_one_mask_per_image_by_name(tmp_path, capsys):
    import json

    from hyperbooth.cli import main as cli

    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for k, image in enumerate(_images(2)):
        image.save(photos / f"{k}.png")
    Image.new("L", (32, 32), 255).save(masks / "0.png")
    args = ["train", "--method", "lora", "--base", "tiny-random", "--images", str(photos)]
    args += ["--steps", "1", "--device", "cpu", "--json", "--masks", str(masks), "--out"]
    cases = [
        ([], "no mask for 1.png"),
        (["--mask-weight", "-1"], "--mask-weight must be >= 0"),
    ]
    for extra, message in cases:
        assert cli([*args[:-1], *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    Image.new("L", (16, 16), 0).save(masks / "1.png")
    assert cli([*args, str(tmp_path / "bad")]) == 2
    assert "1.png is 16x16 but 1.png is 32x32" in capsys.readouterr().err
    Image.new("L", (32, 32), 0).save(masks / "1.png")
    assert cli([*args, str(tmp_path / "ok")]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    no_masks = [a for a in args if a not in ("--masks", str(masks))]
    assert cli([*no_masks[:-1], "--mask-weight", "2", "--out", str(tmp_path / "c")]) == 2
    assert "pass --masks DIR too" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "c").exists()


def test_lr_schedule_is_diffusers_and_resumes_exactly(tiny_base, tmp_path, monkeypatch):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from hyperbooth import training
    from hyperbooth.training import lr_factor

    assert lr_factor(TrainConfig(steps=10)) is None  # constant: the rate is never touched
    factor = lr_factor(TrainConfig(steps=10, lr_scheduler="cosine", lr_warmup_steps=2))
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = get_cosine_schedule_with_warmup(probe, 2, 10)
    for step in range(10):  # diffusers' order: optimizer.step() at rate(step), then .step()
        assert factor(step) == pytest.approx(probe.param_groups[0]["lr"])
        reference.step()
    assert factor(0) == 0 and factor(2) == 1 and 0 < factor(9) < 0.1
    assert lr_factor(TrainConfig(steps=4, lr_warmup_steps=2))(3) == 1  # constant after warm-up
    with pytest.raises(HyperboothError, match="--lr-scheduler must be one of"):
        TrainConfig(lr_scheduler="exponential")
    with pytest.raises(HyperboothError, match="--lr-warmup-steps must be >= 0"):
        TrainConfig(lr_warmup_steps=-1)

    config = dict(seed=5, device="cpu", learning_rate=1e-2, lr_scheduler="cosine")
    adapter = AdapterConfig(kind="lora", rank=2)
    straight = personalise(copy.deepcopy(tiny_base), _images(), tmp_path / "straight", "lora",
                           adapter=adapter, train_config=TrainConfig(steps=4, **config),
                           progress=False)  # fmt: skip
    constant = personalise(copy.deepcopy(tiny_base), _images(), tmp_path / "constant", "lora",
                           adapter=adapter, train_config=TrainConfig(steps=4, seed=5, device="cpu",
                           learning_rate=1e-2), progress=False)  # fmt: skip
    real = training.step_generator

    def interrupted(seed, step, micro, rank):
        if step == 2:
            raise KeyboardInterrupt  # killed after the step-2 checkpoint
        return real(seed, step, micro, rank)

    monkeypatch.setattr(training, "step_generator", interrupted)
    run = dict(adapter=adapter, progress=False,
               train_config=TrainConfig(steps=4, checkpoint_every=2, **config))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        personalise(copy.deepcopy(tiny_base), _images(), tmp_path / "split", "lora", **run)
    monkeypatch.setattr(training, "step_generator", real)
    resumed = personalise(copy.deepcopy(tiny_base), _images(), tmp_path / "split", "lora",
                          resume=True, **run)  # fmt: skip
    from safetensors.torch import load_file

    a, b = load_file(str(straight.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(str(constant.output))
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the schedule changed the fit


def test_the_fp16_loss_scaler_state_survives_a_checkpoint(tmp_path):
    from hyperbooth.training import load_checkpoint, make_adamw, save_checkpoint

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = make_adamw([{"params": [weight]}], 1e-3, 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale((weight * float("inf")).sum()).backward()  # an overflow: the scale backs off
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 512.0
    save_checkpoint(tmp_path, 1, {"w": weight}, optimizer, {"x": 1}, scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert load_checkpoint(tmp_path, {"w": weight}, optimizer, {"x": 1}, fresh) == 1
    assert fresh.state_dict() == scaler.state_dict()
