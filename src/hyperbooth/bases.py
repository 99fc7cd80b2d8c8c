"""Base models: load a diffusers folder, a Hugging Face hub id or a built-in architecture."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.constants import ENV_VARS_TRUE_VALUES
from huggingface_hub.errors import EntryNotFoundError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from hyperbooth.errors import HyperboothError

TINY_RANDOM = "tiny-random"
SD15_ARCH = "sd15-arch"
MINI = "mini"
BUILTIN_BASES: tuple[str, ...] = (MINI, TINY_RANDOM, SD15_ARCH)
# `mini` is the miniature world's trained model, a diffusers folder shipped inside the package.
MINI_FOLDER = Path(__file__).parent / "miniworld" / "weights" / "mini"

# --- The CLIP tokenizer (SD1.x's), built from OpenAI's BPE merges file ---------------------------

_BPE_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
_START_TOKEN = "<|startoftext|>"
_END_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
_BYTE_COUNT = 256
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# The vocabulary is every byte, every byte ending a word, the merges, then the two special
# tokens, so CLIP keeps exactly this many merges (49408 - 512 - 2 = 48894).
_CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 2 * _BYTE_COUNT - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters, in CLIP's order."""
    # Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted
    # past 255 so that no byte becomes whitespace or a control character inside a token.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values = printable[:]
    code_points = printable[:]
    shifted = 0
    for byte in range(_BYTE_COUNT):
        if byte not in printable:
            byte_values.append(byte)
            code_points.append(_BYTE_COUNT + shifted)
            shifted += 1
    return dict(zip(byte_values, map(chr, code_points), strict=True))


@lru_cache(maxsize=1)
def _clip_tokens_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """CLIP's 49408 tokens in id order and its BPE merges, parsed once per process."""
    text = resources.files("hyperbooth").joinpath("data", _BPE_MERGES_FILE).read_bytes()
    lines = gzip.decompress(text).decode("utf-8").split("\n")
    # Line 0 is the "#version" header.
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + _CLIP_MERGE_COUNT])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = (
        *byte_chars,
        *(char + _END_OF_WORD for char in byte_chars),
        *("".join(merge) for merge in merges),
        _START_TOKEN,
        _END_TOKEN,
    )
    return tokens, merges  # type: ignore[return-value]


def clip_tokenizer() -> CLIPTokenizer:
    """A fresh CLIP BPE tokenizer identical to SD1.5's (49408 tokens, 77 positions), built offline."""
    # Only the parsed file is cached: building a tokenizer from it (~60 ms) is cheaper than
    # deep-copying a cached one (~280 ms), and callers may add tokens (textual inversion).
    tokens, merges = _clip_tokens_and_merges()
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=list(merges),
        bos_token=_START_TOKEN,
        eos_token=_END_TOKEN,
        unk_token=_END_TOKEN,
        pad_token=_END_TOKEN,
        model_max_length=CLIP_MAX_LENGTH,
    )


# --- Built-in architectures (configs are data; weights are seeded random) -----------------------

_LATENT_CHANNELS = 4
_RGB_CHANNELS = 3
_BUILTIN_SEED = 0

# SD1.5's noise schedule (its scheduler/scheduler_config.json, the DDPM subset of it).
SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

# SD1.5's unet/config.json.
_SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": _LATENT_CHANNELS,
    "out_channels": _LATENT_CHANNELS,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    # diffusers reads SD1's "attention_head_dim" as the number of heads (8 heads everywhere).
    "attention_head_dim": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# SD1.5's vae/config.json; scaling_factor is diffusers' default, 0.18215, written out here.
_SD15_VAE: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": _RGB_CHANNELS,
    "out_channels": _RGB_CHANNELS,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": _LATENT_CHANNELS,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

# SD1.5's text_encoder/config.json (the CLIP ViT-L/14 text tower), except that the special
# token ids are the tokenizer's real ones: SD1.5 ships eos_token_id=2, which makes transformers
# pool at the highest id and so at a token added for textual inversion instead of at the end.
_SD15_TEXT: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": CLIP_VOCAB_SIZE - 2,
    "eos_token_id": CLIP_VOCAB_SIZE - 1,
    "pad_token_id": CLIP_VOCAB_SIZE - 1,
}

# tiny-random keeps SD's shape (cross-attention at the high-resolution level and in the middle,
# plain ResNet blocks at the low one) at a size where a training step takes milliseconds on CPU.
_TINY_LATENT_SIZE = 16
_TINY_UNET: dict[str, Any] = {
    **_SD15_UNET,
    "sample_size": _TINY_LATENT_SIZE,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
# Two levels: one 2x downsampling, so 32 px images give 16x16 latents.
_TINY_VAE: dict[str, Any] = {
    **_SD15_VAE,
    "sample_size": 32,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
_TINY_TEXT: dict[str, Any] = {
    **_SD15_TEXT,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}

_BUILTIN_CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    TINY_RANDOM: (_TINY_UNET, _TINY_TEXT, _TINY_VAE),
    SD15_ARCH: (_SD15_UNET, _SD15_TEXT, _SD15_VAE),
}


@dataclass
class Base:
    """A Stable Diffusion-family model: the five parts every method needs."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    vae: AutoencoderKL
    scheduler: SchedulerMixin  # the training noise scheduler
    name: str  # the spec it was loaded from
    resolution: int  # natural image side in pixels

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Base:
        """Move the three networks (in place) to a device and optionally a dtype."""
        for model in (self.unet, self.text_encoder, self.vae):
            # diffusers 0.42 logs a float32 warning on any to() naming a dtype, even an unchanged one.
            if dtype is None or model.dtype == dtype:
                model.to(device)
            else:
                model.to(device, dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along one side (8 for SD1.5)."""
        return _vae_scale_factor(self.vae)


def _vae_scale_factor(vae: AutoencoderKL) -> int:
    """Each VAE level but the last halves the image, as StableDiffusionPipeline computes it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _natural_resolution(spec: str, unet: UNet2DConditionModel, vae: AutoencoderKL) -> int:
    """Image side the base was trained at: the UNet's latent size in pixels (the pipeline's default)."""
    if isinstance(unet.config.sample_size, int):
        return unet.config.sample_size * _vae_scale_factor(vae)
    if isinstance(vae.config.sample_size, int):
        return vae.config.sample_size
    raise HyperboothError(
        f"cannot load base {spec!r}: neither unet nor vae config gives a square sample_size"
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run with the CPU RNG seeded, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_builtin(
    spec: str, meta: bool
) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL, DDPMScheduler]:
    """Construct a built-in architecture with seeded random weights (or none, on meta)."""
    unet_config, text_config, vae_config = _BUILTIN_CONFIGS[spec]
    # Always built on CPU (or meta) so the weights do not depend on a default device; each part
    # has its own seed so changing one config leaves the others' weights unchanged.
    with torch.device("meta" if meta else "cpu"):
        with _seeded(_BUILTIN_SEED):
            unet = UNet2DConditionModel(**unet_config)
        with _seeded(_BUILTIN_SEED + 1):
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        with _seeded(_BUILTIN_SEED + 2):
            vae = AutoencoderKL(**vae_config)
    return unet, text_encoder, vae, DDPMScheduler(**SD15_SCHEDULER)


# --- Diffusers folders and hub ids ----------------------------------------------------------------

_FOLDER_PARTS = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer/",
    "scheduler/scheduler_config.json",
)
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# A hub id is "owner/name"; anything else that does not exist on disk is a missing folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What huggingface_hub, diffusers and transformers raise for a missing, unreachable or broken
# checkpoint (HfHubHTTPError and LocalEntryNotFoundError are OSErrors, HFValidationError a
# ValueError); they become one-line HyperboothErrors.
_LOAD_ERRORS = (OSError, ValueError, EntryNotFoundError)


def _usage() -> str:
    """The fix every load error suggests."""
    return (
        "pass --base with a local diffusers folder (model_index.json, unet/, vae/, text_encoder/, "
        f"tokenizer/, scheduler/) or one of: {', '.join(BUILTIN_BASES)}"
    )


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors run to paragraphs)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _check_folder(spec: str, folder: Path) -> None:
    """Raise a one-line error unless `folder` is a diffusers folder with safetensors weights."""
    if not folder.is_dir():
        raise HyperboothError(f"cannot load base {spec!r}: it is a file, not a folder; {_usage()}")
    missing = [part for part in _FOLDER_PARTS if not (folder / part).exists()]
    if missing:
        raise HyperboothError(
            f"cannot load base {spec!r}: not a diffusers folder, missing {', '.join(missing)}; "
            f"{_usage()}"
        )
    for part in _WEIGHT_FOLDERS:
        files = [path.name for path in (folder / part).iterdir()]
        if any(name.endswith(".safetensors") for name in files):
            continue
        if any(name.endswith(_PICKLE_SUFFIXES) for name in files):
            # Pickled weights can run arbitrary code when loaded, so they are never read.
            raise HyperboothError(
                f"cannot load base {spec!r}: {part}/ has only pickled (.bin) weights; convert the "
                "folder to safetensors, e.g. StableDiffusionPipeline.from_pretrained(folder)"
                ".save_pretrained(new_folder, safe_serialization=True)"
            )
        raise HyperboothError(f"cannot load base {spec!r}: {part}/ has no .safetensors weights")


def _hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set now (huggingface_hub itself reads it only at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ENV_VARS_TRUE_VALUES


def _load_parts(
    spec: str, source: str, dtype: torch.dtype, meta: bool, local_files_only: bool
) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL, CLIPTokenizer, DDPMScheduler]:
    """Load the five parts with diffusers' and transformers' own loaders (safetensors only)."""
    hub = {"local_files_only": local_files_only}
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
    if tokenizer.vocab_size < _BYTE_COUNT:
        # transformers 5 builds an empty tokenizer, silently, when it finds no vocabulary files.
        raise HyperboothError(
            f"cannot load base {spec!r}: tokenizer/ has no vocabulary "
            "(tokenizer.json, or vocab.json and merges.txt)"
        )
    scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub)
    if meta:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **hub)
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **hub)
        text_config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", **hub)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
            vae = AutoencoderKL.from_config(vae_config)
            text_encoder = CLIPTextModel(text_config)
        return unet, text_encoder, vae, tokenizer, scheduler
    weights = {"use_safetensors": True, **hub}
    unet = UNet2DConditionModel.from_pretrained(
        source, subfolder="unet", torch_dtype=dtype, **weights
    )
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **weights)
    # transformers 5 would otherwise load in the checkpoint's own dtype ("auto").
    text_encoder = CLIPTextModel.from_pretrained(
        source, subfolder="text_encoder", dtype=dtype, **weights
    )
    return unet, text_encoder, vae, tokenizer, scheduler


def _load_folder(
    spec: str, folder: Path, dtype: torch.dtype, meta: bool
) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL, CLIPTokenizer, DDPMScheduler]:
    """Load a local diffusers folder, never touching the network."""
    _check_folder(spec, folder)
    try:
        return _load_parts(spec, str(folder), dtype, meta, local_files_only=True)
    except _LOAD_ERRORS as error:
        raise HyperboothError(f"cannot load base {spec!r}: {_first_line(error)}") from error


def _load_hub(
    spec: str, dtype: torch.dtype, meta: bool
) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL, CLIPTokenizer, DDPMScheduler]:
    """Load a hub id from the Hugging Face cache if it is there, else download it."""
    not_found = (
        f"cannot load base {spec!r}: not a diffusers folder and not in the Hugging Face cache "
        f"(no network?); {_usage()}"
    )
    # huggingface_hub retries an unreachable server for ~25 s per file, so a cached copy is
    # read without asking the server for updates; the network is used only to fill gaps.
    if isinstance(try_to_load_from_cache(spec, "model_index.json"), str):
        try:
            return _load_parts(spec, spec, dtype, meta, local_files_only=True)
        except _LOAD_ERRORS as error:
            if _hub_offline():
                raise HyperboothError(
                    f"cannot load base {spec!r}: incomplete in the Hugging Face cache and "
                    f"HF_HUB_OFFLINE is set ({_first_line(error)})"
                ) from error
    elif _hub_offline():
        raise HyperboothError(not_found)
    try:
        # One small file first: a missing repo or network fails here, once, not per part.
        hf_hub_download(spec, "model_index.json")
        return _load_parts(spec, spec, dtype, meta, local_files_only=False)
    except _LOAD_ERRORS as error:
        raise HyperboothError(f"{not_found} ({_first_line(error)})") from error


def load_base(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    meta: bool = False,
) -> Base:
    """Load a base from a built-in name, a diffusers folder or a hub id, frozen and in eval mode.

    With `meta=True` only the architecture is built, on the meta device (for counting
    parameters); `device` is then ignored.
    """
    path = Path(spec).expanduser()
    if spec == MINI:
        if not MINI_FOLDER.is_dir():
            raise HyperboothError(
                f"the built-in base {MINI!r} is missing from this installation ({MINI_FOLDER}); "
                "reinstall hyperbooth, or rebuild it with `python -m hyperbooth.miniworld.train_base "
                f"--work runs/mini --out {MINI_FOLDER}`"
            )
        unet, text_encoder, vae, tokenizer, scheduler = _load_folder(spec, MINI_FOLDER, dtype, meta)
    elif spec in BUILTIN_BASES:
        unet, text_encoder, vae, scheduler = _build_builtin(spec, meta)
        tokenizer = clip_tokenizer()
    elif path.exists():
        unet, text_encoder, vae, tokenizer, scheduler = _load_folder(spec, path, dtype, meta)
    elif _HUB_ID.fullmatch(spec):
        unet, text_encoder, vae, tokenizer, scheduler = _load_hub(spec, dtype, meta)
    else:
        raise HyperboothError(f"cannot load base {spec!r}: no such folder; {_usage()}")

    base = Base(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        scheduler=scheduler,
        name=spec,
        resolution=_natural_resolution(spec, unet, vae),
    )
    for model in (base.unet, base.text_encoder, base.vae):
        # Methods switch on training and gradients for exactly what they train.
        model.eval().requires_grad_(False)
    return base.to("meta" if meta else device, dtype)


def to_pipeline(base: Base, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over the base's own modules (no safety checker)."""
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=scheduler or base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _save_text_encoder(model: torch.nn.Module, folder: Path) -> None:
    """A transformers model's config.json and model.safetensors, as its save_pretrained writes them."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(folder / "config.json")
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_base(base: Base, folder: str | Path) -> None:
    """Write `base` as a diffusers folder with safetensors weights, replacing `folder` atomically."""
    target = Path(folder).expanduser()
    models = (base.unet, base.text_encoder, base.vae)
    if any(param.is_meta for model in models for param in model.parameters()):
        raise HyperboothError(f"cannot save base {base.name!r}: it was built with meta=True")
    if target.exists() and not (target / "model_index.json").is_file():
        if not target.is_dir() or any(target.iterdir()):
            raise HyperboothError(
                f"refusing to overwrite {str(target)!r}: it exists and is not a diffusers folder"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target (same filesystem, so the renames below are atomic) and hidden.
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    replaced = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    try:
        to_pipeline(base).save_pretrained(staging, safe_serialization=True)
        text_encoder = staging / "text_encoder"
        if not any(text_encoder.glob("*.safetensors")):
            # transformers writes nothing from a process whose torch.distributed rank is not 0
            # (a benchmark shard saving its own fits): write the same two files ourselves.
            _save_text_encoder(base.text_encoder, text_encoder)
        if not target.exists():
            os.replace(staging, target)
            return
        # A directory cannot be renamed over a non-empty one: move the old one aside first,
        # and put it back if the swap fails.
        os.replace(target, replaced)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(replaced, target)
            raise
        shutil.rmtree(replaced)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
