"""Bases: the offline CLIP tokenizer, the built-in architectures, diffusers folders, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hyperbooth import bases
from hyperbooth.bases import (
    BUILTIN_BASES,
    MINI_FOLDER,
    Base,
    clip_tokenizer,
    load_base,
    save_base,
)
from hyperbooth.errors import HyperboothError

# Stable Diffusion 1.5's own sizes: its tokenizer, and its networks' parameter counts.
SD15_START, SD15_END = 49406, 49407
SD15_VOCAB_SIZE = 49408
SD15_MAX_LENGTH = 77
SD15_UNET_PARAMETERS = 859_520_964
SD15_TEXT_ENCODER_PARAMETERS = 123_060_480
SD15_VAE_PARAMETERS = 83_653_863
# stable-diffusion-v1-5's scheduler/scheduler_config.json.
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def state(base: Base) -> dict[str, torch.Tensor]:
    """All weights of a base, keyed by part and parameter name."""
    return {
        f"{part}.{key}": tensor
        for part in ("unet", "text_encoder", "vae")
        for key, tensor in getattr(base, part).state_dict().items()
    }


def assert_same_weights(a: Base, b: Base) -> None:
    """Assert two bases hold exactly the same tensors under the same names."""
    state_a, state_b = state(a), state(b)
    assert state_a.keys() == state_b.keys()
    for key, tensor in state_a.items():
        assert torch.equal(tensor, state_b[key]), key


def count(model: torch.nn.Module) -> int:
    """Number of parameters of a model."""
    return sum(parameter.numel() for parameter in model.parameters())


def assert_one_line_error(error: pytest.ExceptionInfo[HyperboothError], *fragments: str) -> None:
    """The message is a single line and mentions every fragment."""
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture(scope="module")
def tiny() -> Base:
    """The tiny-random base, shared by tests that only read it."""
    return load_base("tiny-random")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, tiny: Base) -> Path:
    """tiny-random saved as a diffusers folder."""
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    save_base(tiny, folder)
    return folder


# --- Tokenizer -----------------------------------------------------------------------------------


def test_clip_tokenizer_gives_sd15_ids() -> None:
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == SD15_VOCAB_SIZE
    assert tokenizer.model_max_length == SD15_MAX_LENGTH
    assert tokenizer("a photo of a cat").input_ids == [SD15_START, 320, 1125, 539, 320, 2368, 49407]
    # Lower-cased, punctuation split off, the rare token "sks" is one id.
    assert tokenizer("A photo of sks dog.").input_ids == [
        SD15_START, 320, 1125, 539, 48136, 1929, 269, SD15_END,
    ]  # fmt: skip


def test_clip_tokenizer_pads_to_77_with_end_token() -> None:
    tokenizer = clip_tokenizer()
    ids = tokenizer(
        "a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length
    ).input_ids
    assert len(ids) == SD15_MAX_LENGTH
    assert ids[:7] == [SD15_START, 320, 1125, 539, 320, 2368, SD15_END]
    assert set(ids[7:]) == {SD15_END}
    assert tokenizer.pad_token_id == SD15_END


def test_clip_tokenizer_copies_are_independent() -> None:
    first, second = clip_tokenizer(), clip_tokenizer()
    first.add_tokens(["<sks>"])
    assert len(first) == SD15_VOCAB_SIZE + 1
    assert len(second) == len(clip_tokenizer()) == SD15_VOCAB_SIZE


# --- Built-ins -------------------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert BUILTIN_BASES == ("mini", "tiny-random", "sd15-arch")


def test_a_missing_mini_names_the_command_that_rebuilds_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(bases, "MINI_FOLDER", tmp_path / "absent")
    with pytest.raises(HyperboothError, match="train_base") as error:
        load_base("mini")
    assert "\n" not in str(error.value)


def test_tiny_random_is_deterministic_and_leaves_the_rng_alone(tiny: Base) -> None:
    torch.manual_seed(1234)
    rng_state = torch.random.get_rng_state()
    again = load_base("tiny-random")
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert_same_weights(tiny, again)


def test_tiny_random_has_sd_shape(tiny: Base) -> None:
    assert tiny.name == "tiny-random"
    assert tiny.resolution == 32
    assert tiny.vae_scale_factor == 2
    names = {name for name, _ in tiny.unet.named_modules()}
    for attention in ("attn1", "attn2"):
        for projection in ("to_q", "to_k", "to_v", "to_out.0"):
            name = f"down_blocks.0.attentions.0.transformer_blocks.0.{attention}.{projection}"
            assert name in names
    assert tiny.scheduler.config.prediction_type == "epsilon"
    assert tiny.scheduler.config.num_train_timesteps == 1000
    assert tiny.scheduler.config.beta_schedule == "scaled_linear"
    for model in (tiny.unet, tiny.text_encoder, tiny.vae):
        assert not model.training
        assert not any(parameter.requires_grad for parameter in model.parameters())


def test_tiny_random_runs_end_to_end(tiny: Base) -> None:
    ids = tiny.tokenizer(
        ["a photo of sks dog"],
        padding="max_length",
        max_length=tiny.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        text = tiny.text_encoder(ids).last_hidden_state
        image = torch.zeros(1, 3, tiny.resolution, tiny.resolution)
        latents = tiny.vae.encode(image).latent_dist.mean
        noise = tiny.unet(latents, torch.tensor([10]), text).sample
    latent_side = tiny.resolution // tiny.vae_scale_factor
    assert latents.shape == noise.shape == (1, 4, latent_side, latent_side)


def test_dtype_and_to() -> None:
    base = load_base("tiny-random", dtype=torch.bfloat16)
    assert {base.unet.dtype, base.text_encoder.dtype, base.vae.dtype} == {torch.bfloat16}
    assert base.to("cpu", torch.float32) is base
    assert {base.unet.dtype, base.text_encoder.dtype, base.vae.dtype} == {torch.float32}


def test_sd15_arch_on_meta_has_sd15_sizes() -> None:
    base = load_base("sd15-arch", meta=True)
    assert count(base.unet) == SD15_UNET_PARAMETERS
    assert count(base.text_encoder) == SD15_TEXT_ENCODER_PARAMETERS
    assert count(base.vae) == SD15_VAE_PARAMETERS
    assert base.unet.device.type == "meta"
    assert base.resolution == 512
    assert base.vae_scale_factor == 8
    assert base.vae.config.scaling_factor == 0.18215


# --- Folders -------------------------------------------------------------------------------------


def test_save_then_load_round_trips(tiny: Base, tiny_folder: Path) -> None:
    loaded = load_base(str(tiny_folder))
    assert_same_weights(tiny, loaded)
    assert loaded.resolution == tiny.resolution
    assert (
        loaded.tokenizer("a photo of sks dog").input_ids
        == tiny.tokenizer("a photo of sks dog").input_ids
    )
    # Keys starting with "_" are diffusers' bookkeeping (e.g. which values were defaults).
    public = {key: value for key, value in tiny.scheduler.config.items() if not key.startswith("_")}
    assert {key: loaded.scheduler.config[key] for key in public} == public
    assert not any(parameter.requires_grad for parameter in loaded.unet.parameters())


def test_saved_folder_is_a_diffusers_pipeline(tiny_folder: Path) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_folder)
    assert pipeline.safety_checker is None


def test_folder_on_meta_counts_like_the_original(tiny: Base, tiny_folder: Path) -> None:
    base = load_base(str(tiny_folder), meta=True)
    assert base.unet.device.type == "meta"
    assert count(base.unet) == count(tiny.unet)
    assert count(base.text_encoder) == count(tiny.text_encoder)


def test_save_replaces_an_existing_folder(tiny: Base, tmp_path: Path) -> None:
    target = tmp_path / "base"
    save_base(tiny, target)
    (target / "stale.txt").write_text("from an older save")
    save_base(tiny, target)
    assert not (target / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]  # nothing left beside it


def test_save_refuses_to_overwrite_another_folder(tiny: Base, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(HyperboothError) as error:
        save_base(tiny, tmp_path)
    assert_one_line_error(error, "not a diffusers folder")
    assert (tmp_path / "notes.txt").exists()


def test_save_refuses_a_meta_base(tmp_path: Path) -> None:
    with pytest.raises(HyperboothError) as error:
        save_base(load_base("tiny-random", meta=True), tmp_path / "base")
    assert_one_line_error(error, "meta")


def test_sd15_layout_folder_loads(tiny_folder: Path, tmp_path: Path) -> None:
    """Real SD1.5 folders ship a PNDM scheduler config and vocab.json + merges.txt."""
    folder = tmp_path / "sd15-layout"
    shutil.copytree(tiny_folder, folder)
    tokenizer = clip_tokenizer()
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    (folder / "tokenizer" / "tokenizer.json").unlink()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    merge_lines = (" ".join(merge) if isinstance(merge, list) else merge for merge in merges)
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_PNDM_CONFIG))

    base = load_base(str(folder))
    prompt = "A photo of sks dog, in the style of Van Gogh!"
    assert base.tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
    assert type(base.scheduler).__name__ == "DDPMScheduler"
    assert base.scheduler.config.steps_offset == 1
    assert base.scheduler.config.clip_sample is False


# --- Errors ----------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(HyperboothError) as error:
        load_base(str(tmp_path / "absent"))
    assert_one_line_error(error, "no such folder", "tiny-random")


def test_folder_that_is_not_diffusers(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(HyperboothError) as error:
        load_base(str(tmp_path))
    assert_one_line_error(error, "model_index.json", "vae/config.json", "tiny-random")


def test_folder_with_only_bin_weights(tiny_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(HyperboothError) as error:
        load_base(str(folder))
    assert_one_line_error(error, "unet/", "safetensors")


def test_folder_without_tokenizer_vocabulary(tiny_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-vocab"
    shutil.copytree(tiny_folder, folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(HyperboothError) as error:
        load_base(str(folder))
    assert_one_line_error(error, "tokenizer/")


def test_uncached_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HyperboothError) as error:
        load_base("hyperbooth-tests/not-a-real-repo")
    assert_one_line_error(error, "Hugging Face cache", "tiny-random")


# --- mini: the miniature world's trained model, shipped in the package ---------------------------

MINI_LIMIT_BYTES = 40 * 1024 * 1024


@pytest.mark.skipif(not MINI_FOLDER.is_dir(), reason="mini is not trained in this checkout yet")
def test_mini_is_a_small_standard_diffusers_folder() -> None:
    stored = sum(path.stat().st_size for path in MINI_FOLDER.rglob("*") if path.is_file())
    assert stored <= MINI_LIMIT_BYTES
    base = load_base("mini")
    assert base.resolution == 64 and base.unet.dtype == torch.float32
    assert base.vae.config.scaling_factor != 0.18215  # measured on its own latents
    pipe = StableDiffusionPipeline.from_pretrained(str(MINI_FOLDER))
    assert pipe.unet.config.sample_size == 16
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a face with red hair", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
