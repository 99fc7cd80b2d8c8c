"""Train `mini`: a small Stable-Diffusion-architecture model of the miniature world, from scratch.

Four stages, each resumable from files in a work folder:
  1. vae:      AutoencoderKL on fresh renders (64x64 RGB -> 16x16x8 latents).
  2. data:     render the training set once, encode it with the frozen VAE, tokenise captions.
  3. text:     CLIPTextModel learns to say which attributes a caption names (then frozen).
  4. denoiser: UNet2DConditionModel, v-prediction on a zero-terminal-SNR schedule, EMA weights.
The result is a standard diffusers folder (float16 safetensors) that `load_base` and
`StableDiffusionPipeline.from_pretrained` read.

    python -m hyperbooth.miniworld.train_base --work runs/mini --out runs/mini/model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from hyperbooth.adapters.files import atomic_save_safetensors
from hyperbooth.atomic import atomic_file, write_text
from hyperbooth.bases import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    SD15_SCHEDULER,
    Base,
    clip_tokenizer,
    save_base,
)
from hyperbooth.diffusion import noised_loss
from hyperbooth.errors import HyperboothError, run_module
from hyperbooth.machine import CPU_PRECISIONS, cpu_precision, machine_info
from hyperbooth.miniworld import recipe_from_json
from hyperbooth.miniworld.captions import (
    MENTION_PROBABILITY,
    ExampleInfo,
    sample_caption,
    sample_training_example,
)
from hyperbooth.miniworld.render import CONTEXT_ATTRIBUTES, NAMEABLE_TRAITS, SIZE, feature_map


@dataclass
class MiniConfig:
    """Every size and schedule of the mini model and its training run."""

    seed: int = 0
    threads: int = 2
    # bf16 autocast for the VAE where the CPU has bf16 in hardware ("auto": AMX-BF16 made it ~2x
    # faster; an AVX2-only CPU emulates bf16, 15x slower than float32) but not for the denoiser:
    # at 16x16 latents its small matmuls ran 1.5x slower in bf16 than in float32. Each is one
    # of machine.CPU_PRECISIONS; the report records what "auto" became.
    mixed_precision: str = "auto"
    denoiser_mixed_precision: str = "no"
    # VAE: two downsamplings, 64x64 -> 16x16. It is fully convolutional (no mid-block attention),
    # so it trains on random crops at a quarter of the cost and still encodes whole images.
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_norm_groups: int = 8
    latent_channels: int = 8  # 8 rather than SD's 4: the 16x16 grid then keeps marks and brows
    vae_steps: int = 2400
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    # Training set, rendered once and cached as latents.
    examples: int = 100_000
    # How often a training caption names each attribute (0.5 up to v3, 0.8 from v4: the shipped
    # model names traits more often, so it learnt them). The text stage keeps
    # captions.MENTION_PROBABILITY: it learns to read any subset.
    caption_mention_probability: float = 0.8
    # Text encoder: a small CLIP text tower over CLIP's full BPE vocabulary. SD's text encoder
    # comes pretrained and frozen; ours is first taught to say which attributes a caption names
    # (a head per attribute on the pooled output), then frozen for the denoiser, like SD's.
    # Trained jointly from scratch instead (v0-v2), the UNet barely read it within budget.
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    text_steps: int = 800  # 0: no pretraining
    text_batch: int = 128
    text_lr: float = 1e-3
    freeze_text_encoder: bool = True
    # UNet at 16x16 latents, cross-attention at 16x16 and 8x8 (and in the middle).
    unet_channels: tuple[int, ...] = (48, 96, 192)
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    # The caption's pooled state added to the time embedding, so every ResNet block (where a face
    # lives, docs/MINIWORLD.md) sees the prompt, not only the cross-attention layers: diffusers'
    # addition_embed_type="text" (as in DeepFloyd IF); StableDiffusionPipeline still runs it.
    unet_text_time_embedding: bool = False
    denoiser_steps: int = 6000
    denoiser_batch: int = 32
    denoiser_lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty captions teach the unconditional branch (guidance)
    # Extra loss weight on each face's feature region (render.feature_map: brows, eyes, glasses,
    # nose, mouth, marks), 10-30% of a picture by framing: there the diffusion loss is 1 + this
    # times the rest's. Small features barely move a plain MSE. 0: plain, as up to v4.
    face_loss_weight: float = 3.0
    min_snr_gamma: float | None = 5.0  # loss weighting that speeds convergence; None: plain MSE
    # SD1.5's schedule keeps 0.068 of the signal at t=999. On a 16x16 latent the spatial mean of
    # that signal is as strong as the noise's, so the model read background colour from x_T and
    # ignored the prompt (v0: obedience at chance). A zero-terminal-SNR schedule removes the leak;
    # it needs v-prediction (Lin et al. 2023, "Common diffusion noise schedules ... are flawed").
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    sample_every: int = 500  # write a grid of EMA samples to the work folder (0: never)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("caption_mention_probability", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise HyperboothError(f"{name} is a probability: give 0-1, got {value}")
        if self.face_loss_weight < 0:
            raise HyperboothError(f"face_loss_weight must be >= 0, got {self.face_loss_weight}")
        for name in ("mixed_precision", "denoiser_mixed_precision"):
            if getattr(self, name) not in CPU_PRECISIONS:
                raise HyperboothError(
                    f"{name} must be one of {CPU_PRECISIONS}, got {getattr(self, name)!r}"
                )


def build_models(config: MiniConfig) -> Base:
    """The untrained mini architecture with seeded random weights."""
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_size=config.text_hidden,
            intermediate_size=config.text_intermediate,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            projection_dim=config.text_hidden,
            hidden_act="quick_gelu",
            bos_token_id=CLIP_VOCAB_SIZE - 2,
            eos_token_id=CLIP_VOCAB_SIZE - 1,
            pad_token_id=CLIP_VOCAB_SIZE - 1,
        )
    )
    levels = len(config.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2 ** (len(config.vae_channels) - 1),
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.unet_heads,
        norm_num_groups=min(32, config.unet_channels[0] // 2),
        addition_embed_type="text" if config.unet_text_time_embedding else None,
        addition_embed_type_num_heads=config.unet_heads,
    )
    scheduler = DDPMScheduler(
        **{
            **SD15_SCHEDULER,
            "prediction_type": config.prediction_type,
            "rescale_betas_zero_snr": config.zero_terminal_snr,
            "timestep_spacing": "trailing" if config.zero_terminal_snr else "leading",
        }
    )
    return Base(unet, text_encoder, clip_tokenizer(), vae, scheduler, "mini", SIZE)


def _autocast(precision: str):
    """bf16 autocast on the CPU when asked for ("auto": where the CPU has bf16 in hardware)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_precision(precision) == "bf16")


def _batch_images(
    rng: np.random.Generator, n: int, mention_probability: float = MENTION_PROBABILITY
) -> tuple[torch.Tensor, list[str], list[ExampleInfo]]:
    """n fresh training renders as (n, 3, 64, 64) in [-1, 1], with their captions and infos."""
    images, captions, infos = [], [], []
    for _ in range(n):
        image, text, info = sample_training_example(rng, mention_probability=mention_probability)
        images.append(image)
        captions.append(text)
        infos.append(info)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions, infos


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the scheduler's prediction type.

    Low-noise steps, which are easy and would otherwise dominate the gradient, are damped:
    min(SNR, gamma) / SNR for epsilon; min(SNR + 1, gamma) / (SNR + 1) for v-prediction, which
    keeps full weight at t=999 (SNR 0 under a zero-terminal-SNR schedule), where only the prompt
    says what to draw. None: all 1.
    """
    if gamma is None:
        return torch.ones(len(timesteps))
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_state(
    path: Path, modules: dict[str, torch.nn.Module], optimizer, step: int, losses: list
) -> None:
    """A resumable checkpoint: module weights + optimizer state (safetensors) + step (JSON)."""
    from hyperbooth.training import optimizer_tensors

    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    atomic_save_safetensors(tensors, path.with_suffix(".weights.safetensors"))
    opt_tensors, opt_info = optimizer_tensors(optimizer)
    atomic_save_safetensors(opt_tensors, path.with_suffix(".optimizer.safetensors"))
    write_text(
        path.with_suffix(".json"),
        json.dumps({"step": step, "losses": losses, "optimizer": opt_info}),
    )


def _load_state(path: Path, modules: dict[str, torch.nn.Module], optimizer) -> tuple[int, list]:
    """Restore a checkpoint written by _save_state; (0, []) when there is none."""
    from hyperbooth.training import load_optimizer

    if not path.with_suffix(".json").is_file():
        return 0, []
    state = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path.with_suffix(".weights.safetensors")))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    load_optimizer(
        optimizer, load_file(str(path.with_suffix(".optimizer.safetensors"))), state["optimizer"]
    )
    return int(state["step"]), state["losses"]


def train_vae(base: Base, config: MiniConfig, work: Path) -> tuple[list[float], float]:
    """Stage 1: reconstruct fresh crops; (losses, whole-image test MSE). Sets the scaling factor."""
    vae = base.vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    checkpoint = work / "vae"
    start, losses = _load_state(checkpoint, {"vae": vae}, optimizer)
    for step in tqdm(
        range(start, config.vae_steps), initial=start, total=config.vae_steps, desc="vae"
    ):
        rng = np.random.default_rng([config.seed, 1, step])
        pixels, _, _ = _batch_images(rng, config.vae_batch)
        # One random crop per batch, on the latent grid so crops line up with whole-image latents.
        factor = 2 ** (len(config.vae_channels) - 1)
        top, left = rng.integers(0, (SIZE - config.vae_crop) // factor + 1, 2) * factor
        pixels = pixels[:, :, top : top + config.vae_crop, left : left + config.vae_crop]
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.vae_steps, config.vae_lr, 50)
        with _autocast(config.mixed_precision):
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(
                posterior.sample(generator=torch.Generator().manual_seed(step))
            ).sample
        mse = torch.nn.functional.mse_loss(reconstruction.float(), pixels)
        loss = mse + config.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mse.item())
        if (step + 1) % config.checkpoint_every == 0:
            _save_state(checkpoint, {"vae": vae}, optimizer, step + 1, losses)
    _save_state(checkpoint, {"vae": vae}, optimizer, config.vae_steps, losses)
    vae.eval().requires_grad_(False)
    with torch.no_grad(), _autocast(config.mixed_precision):
        pixels, _, _ = _batch_images(np.random.default_rng([config.seed, 2]), 256)
        latents = vae.encode(pixels).latent_dist.mean
        reconstruction = vae.decode(latents).sample.float()
    vae.register_to_config(scaling_factor=float(1.0 / latents.float().std()))
    return losses, torch.nn.functional.mse_loss(reconstruction, pixels).item()


@torch.no_grad()
def attribute_heads() -> dict[str, int]:
    """What the text stage predicts from a caption: attribute -> values (0 means unnamed)."""
    heads = {name: len(v) for name, v in {**NAMEABLE_TRAITS, **CONTEXT_ATTRIBUTES}.items()}
    for side in ("left", "right"):
        heads |= {f"{side}.{name}": len(v) for name, v in NAMEABLE_TRAITS.items()}
    return heads


def _caption_batch(
    base: Base, rng: np.random.Generator, n: int, heads: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """n fresh captions as token ids, and per head the named value + 1 (0: not named)."""
    captions = [sample_caption(rng) for _ in range(n)]
    # Padded to the longest caption only: attention is causal, so the pooled (end-of-text)
    # state is the same as with 77 positions, at a fraction of the cost.
    ids = base.tokenizer(
        [c.text for c in captions],
        padding="longest",
        max_length=CLIP_MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    targets = torch.tensor(
        [[c.mentioned.get(name, -1) + 1 for name in heads] for c in captions], dtype=torch.long
    )
    return ids, targets


def _attribute_loss(
    logits: torch.Tensor, targets: torch.Tensor, heads: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the heads, and which predictions were right (B, heads)."""
    loss, right, start = 0.0, [], 0
    for k, size in enumerate(heads.values()):
        part = logits[:, start : start + size + 1]
        loss = loss + torch.nn.functional.cross_entropy(part, targets[:, k])
        right.append(part.argmax(1) == targets[:, k])
        start += size + 1
    return loss, torch.stack(right, 1)


def train_text_encoder(base: Base, config: MiniConfig, work: Path) -> tuple[list[float], float]:
    """Stage 0: teach the text encoder which attributes a caption names; (losses, test accuracy)."""
    heads = attribute_heads()
    text_encoder = base.text_encoder.train().requires_grad_(True)
    head = torch.nn.Linear(config.text_hidden, sum(n + 1 for n in heads.values()))
    params = [*text_encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.text_lr, weight_decay=0.01)
    checkpoint = work / "text"
    start, losses = _load_state(checkpoint, {"text_encoder": text_encoder, "head": head}, optimizer)
    for step in tqdm(
        range(start, config.text_steps), initial=start, total=config.text_steps, desc="text"
    ):
        ids, targets = _caption_batch(
            base, np.random.default_rng([config.seed, 4, step]), config.text_batch, heads
        )
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.text_steps, config.text_lr, 100)
        loss, _ = _attribute_loss(head(text_encoder(ids).pooler_output), targets, heads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % config.checkpoint_every == 0:
            _save_state(
                checkpoint,
                {"text_encoder": text_encoder, "head": head},
                optimizer,
                step + 1,
                losses,
            )
    _save_state(
        checkpoint,
        {"text_encoder": text_encoder, "head": head},
        optimizer,
        config.text_steps,
        losses,
    )
    text_encoder.eval()
    with torch.no_grad():
        ids, targets = _caption_batch(base, np.random.default_rng([config.seed, 5]), 1024, heads)
        _, right = _attribute_loss(head(text_encoder(ids).pooler_output), targets, heads)
    return losses, float(right.float().mean())


def encode_dataset(base: Base, config: MiniConfig, work: Path) -> dict[str, torch.Tensor]:
    """Stage 2: render config.examples training images once; keep latent mean/std and token ids.

    Also each image's feature map (render.feature_map) averaged onto the latent grid, for
    face_loss_weight.
    """
    path = work / "dataset.safetensors"
    if path.is_file():
        return load_file(str(path))
    scale = base.vae.config.scaling_factor
    means, stds, ids, features = [], [], [], []
    rng = np.random.default_rng([config.seed, 3])
    chunk = 256
    for _ in tqdm(range(0, config.examples, chunk), desc="encode"):
        pixels, captions, infos = _batch_images(rng, chunk, config.caption_mention_probability)
        maps = [feature_map(i.context, i.seed, pair=len(i.identities) == 2) for i in infos]
        with _autocast(config.mixed_precision):
            posterior = base.vae.encode(pixels).latent_dist
        grid = posterior.mean.shape[-1]
        features.append(
            torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(np.stack(maps)), grid).half()
        )
        means.append((posterior.mean.float() * scale).half())
        stds.append((posterior.std.float() * scale).half())
        ids.append(
            base.tokenizer(
                captions,
                padding="max_length",
                max_length=CLIP_MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).input_ids.int()
        )
    data = {
        "mean": torch.cat(means),
        "std": torch.cat(stds),
        "ids": torch.cat(ids),
        "features": torch.cat(features),
    }
    atomic_save_safetensors(data, path)
    return data


def train_denoiser(
    base: Base, data: dict[str, torch.Tensor], config: MiniConfig, work: Path
) -> list[float]:
    """Stage 3: the UNet (and the text encoder unless frozen) on cached latents, with EMA copies."""
    trains_text = not config.freeze_text_encoder
    unet = base.unet.train().requires_grad_(True)
    text_encoder = base.text_encoder.train(trains_text).requires_grad_(trains_text)
    live = {"unet": unet} | ({"text_encoder": text_encoder} if trains_text else {})
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in live.items()}
    params = [p for m in live.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.denoiser_lr, weight_decay=0.01, fused=True)
    checkpoint = work / "denoiser"
    modules = live | {f"ema_{name}": m for name, m in ema.items()}
    start, losses = _load_state(checkpoint, modules, optimizer)
    empty = base.tokenizer(
        "", padding="max_length", max_length=CLIP_MAX_LENGTH, return_tensors="pt"
    ).input_ids
    n = data["mean"].shape[0]
    num_timesteps = base.scheduler.config.num_train_timesteps
    if config.face_loss_weight and "features" not in data:
        raise HyperboothError(
            f"{work / 'dataset.safetensors'} predates feature maps; delete it so that the data "
            "stage renders them, or set face_loss_weight to 0"
        )
    bar = tqdm(
        range(start, config.denoiser_steps),
        initial=start,
        total=config.denoiser_steps,
        desc="denoiser",
    )
    for step in bar:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        index = torch.randint(0, n, (config.denoiser_batch,), generator=generator)
        ids = data["ids"][index].long()
        drop = torch.rand(config.denoiser_batch, generator=generator) < config.caption_dropout
        ids[drop] = empty
        noise = torch.randn(data["mean"][index].shape, generator=generator)
        latents = data["mean"][index].float() + data["std"][index].float() * noise
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.denoiser_steps, config.denoiser_lr, config.warmup_steps)
        with _autocast(config.denoiser_mixed_precision):
            with torch.set_grad_enabled(trains_text):
                hidden = text_encoder(ids)[0]
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, num_timesteps, (len(latents),), generator=generator)
            weights = None
            if config.face_loss_weight:
                weights = 1 + config.face_loss_weight * data["features"][index].float()[:, None]
            per_sample = noised_loss(
                unet, base.scheduler, latents, hidden, noise, timesteps, reduce=False, mask=weights
            )
            loss = (
                snr_weights(base.scheduler, timesteps, config.min_snr_gamma) * per_sample
            ).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for name, module in live.items():
                for e, p in zip(ema[name].parameters(), module.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % config.checkpoint_every == 0:
            _save_state(checkpoint, modules, optimizer, step + 1, losses)
        if config.sample_every and (step + 1) % config.sample_every == 0:
            sampler_text = ema.get("text_encoder", text_encoder)
            write_samples(base, ema["unet"], sampler_text, work / "samples" / f"{step + 1:06d}.png")
    _save_state(checkpoint, modules, optimizer, config.denoiser_steps, losses)
    base.unet = ema["unet"].eval()
    base.text_encoder = ema.get("text_encoder", text_encoder).eval()
    return losses


SAMPLE_PROMPTS = (
    "a face",
    "a face with red hair and blue eyes",
    "a face with blond curly hair wearing a crown on a green background",
    "a pencil sketch of a bald face with round glasses",
    "a flat cartoon of a face with black long hair, close up",
    "a face with dark skin wearing a hat, far away, on a striped yellow background",
    "a face with gray hair in inverted colours",
    "a face with brown hair next to a face with blue hair",
)


def write_samples(base: Base, unet, text_encoder, path: Path) -> None:
    """A grid of samples of SAMPLE_PROMPTS (two seeds each) from the given denoiser weights."""
    from hyperbooth.generate import generate_images, image_grid

    sampler = copy.copy(base)
    sampler.unet, sampler.text_encoder = unet.eval(), text_encoder.eval()
    images = generate_images(sampler, SAMPLE_PROMPTS, n=2, steps=20, batch_size=8, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cell=128).save(path)


def export(base: Base, folder: Path, config: MiniConfig, report: dict) -> None:
    """Write the trained model as a float16 diffusers folder with its recipe beside it."""
    half = copy.copy(base)
    half.unet, half.text_encoder, half.vae = (
        copy.deepcopy(m).half() for m in (base.unet, base.text_encoder, base.vae)
    )
    save_base(half, folder)
    # Stored in float16, loaded in float32: diffusers loads float32 by default, transformers 5
    # loads the dtype its config names, and a pipeline of mixed dtypes fails on the CPU.
    text_config = folder / "text_encoder" / "config.json"
    write_text(
        text_config,
        json.dumps(json.loads(text_config.read_text()) | {"dtype": "float32"}, indent=2),
    )
    write_text(
        folder / "hyperbooth_mini.json", json.dumps({"config": asdict(config), **report}, indent=2)
    )


def plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    """The loss curve of each stage (raw and smoothed over 50 steps), as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(losses), figsize=(5 * len(losses), 3.5))
    for axis, (stage, values) in zip(np.atleast_1d(axes), losses.items(), strict=True):
        steps = np.arange(1, len(values) + 1)
        axis.plot(steps, values, color="0.8", linewidth=0.5, label="per step")
        if len(values) >= 50:
            smooth = np.convolve(values, np.ones(50) / 50, mode="valid")
            axis.plot(steps[49:], smooth, color="C0", label="mean of 50")
        axis.set_yscale("log")
        axis.set_xlabel("step")
        titles = {
            "vae": "VAE reconstruction MSE",
            "text": "text encoder: attribute loss",
            "denoiser": "diffusion loss",
        }
        axis.set_title(titles[stage])
        axis.legend()
    figure.tight_layout()
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    pyplot.close(figure)


def reuse_encoders(base: Base, source: str) -> None:
    """Put the VAE and text encoder of a trained mini-architecture folder (or "mini") into base."""
    from hyperbooth.bases import MINI, load_base

    if source != MINI and not Path(source, "model_index.json").is_file():
        raise HyperboothError(
            f"--init-from {source}: no diffusers folder there (no model_index.json); give a "
            "folder that train_base wrote (its --out), or mini"
        )
    trained = load_base(source)
    for name in ("vae", "text_encoder"):
        try:
            getattr(base, name).load_state_dict(getattr(trained, name).float().state_dict())
        except RuntimeError as error:
            raise HyperboothError(
                f"--init-from {source}: its {name} does not match this recipe's "
                f"({str(error).splitlines()[0]}); give a folder trained with the same sizes"
            ) from None
    base.vae.register_to_config(scaling_factor=trained.vae.config.scaling_factor)
    base.vae.eval().requires_grad_(False)
    base.text_encoder.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    """Run every stage (each resumes from --work) and export the model to --out."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", required=True, help="folder for checkpoints and the cached data set"
    )
    parser.add_argument("--out", required=True, help="diffusers folder to write")
    parser.add_argument("--config", default=None, help="JSON file overriding MiniConfig fields")
    parser.add_argument(
        "--init-from",
        default=None,
        help="a trained mini-architecture folder (or mini) whose VAE and text encoder to reuse: "
        "the vae and text stages are skipped and only the data and denoiser stages run",
    )
    args = parser.parse_args(argv)
    config = recipe_from_json(MiniConfig, args.config)
    torch.set_num_threads(config.threads)
    base = build_models(config)
    if args.init_from:  # a folder that does not fit fails here, before anything is written
        reuse_encoders(base, args.init_from)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    write_text(work / "config.json", json.dumps(asdict(config), indent=2))
    times: dict[str, float] = {}
    vae_losses, vae_test_mse, text_losses, text_accuracy = [], None, [], None
    if not args.init_from:
        started = time.perf_counter()
        vae_losses, vae_test_mse = train_vae(base, config, work)
        times["vae"] = time.perf_counter() - started
    started = time.perf_counter()
    data = encode_dataset(base, config, work)
    times["data"] = time.perf_counter() - started
    if config.text_steps and not args.init_from:
        started = time.perf_counter()
        text_losses, text_accuracy = train_text_encoder(base, config, work)
        tqdm.write(f"text encoder: attribute accuracy {text_accuracy:.4f} on fresh captions")
        times["text"] = time.perf_counter() - started
    started = time.perf_counter()
    denoiser_losses = train_denoiser(base, data, config, work)
    times["denoiser"] = time.perf_counter() - started
    report = {
        "seconds": times,
        "machine": machine_info(),
        "mixed_precision": {
            "vae": cpu_precision(config.mixed_precision),
            "denoiser": cpu_precision(config.denoiser_mixed_precision),
        },
        "init_from": args.init_from,
        "vae_final_mse": float(np.mean(vae_losses[-50:])) if vae_losses else None,
        "vae_test_mse": vae_test_mse,
        "text_attribute_accuracy": text_accuracy,
        "denoiser_final_loss": float(np.mean(denoiser_losses[-100:])),
    }
    losses = {"vae": vae_losses, "text": text_losses, "denoiser": denoiser_losses}
    losses = {stage: values for stage, values in losses.items() if values}
    write_text(work / "losses.json", json.dumps(losses))
    plot_losses(losses, work / "loss.png")
    export(base, Path(args.out), config, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_module(main, "hyperbooth.miniworld.train_base")
