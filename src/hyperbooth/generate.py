"""Base + adapters + prompts -> images, and the PNG grid that shows them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from hyperbooth.adapters.inject import subject_guidance, switch_adapters
from hyperbooth.errors import HyperboothError


def make_pipeline(base: object) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over the base's own (possibly adapted) modules."""
    from hyperbooth.bases import to_pipeline

    pipe = to_pipeline(base, DPMSolverMultistepScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(
    base: object,
    prompts: Sequence[str],
    n: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 4,
    negative_prompt: str | None = None,
    progress: bool = True,
    adapter_below: int | None = None,
    subject_scale: float | None = None,
) -> list[list[Image.Image]]:
    """n images per prompt; image j of every prompt uses seed + j, so results are repeatable.

    With adapter_below, the UNet's adapters act only at timesteps below it (`switch_adapters`);
    with subject_scale, the bare base follows the prompt and the adapters add the subject at
    that scale (`subject_guidance`), below adapter_below if it is given too.
    """
    for flag, value in (("--n", n), ("--steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise HyperboothError(f"{flag} must be >= 1, got {value}")
    timesteps = base.scheduler.config.num_train_timesteps
    if adapter_below is not None and adapter_below > timesteps:  # below 0 switch_adapters refuses
        raise HyperboothError(
            f"--adapter-below {adapter_below} is past this base's {timesteps} timesteps; "
            f"give 0-{timesteps}"
        )
    # both check their settings here, before any work
    switch = switch_adapters(base, None if subject_scale is not None else adapter_below)
    guide = subject_guidance(base, subject_scale, guidance, below=adapter_below)
    pipe = make_pipeline(base)
    size = base.resolution
    out: list[list[Image.Image]] = [[] for _ in prompts]
    jobs = [(p, j) for p in range(len(prompts)) for j in range(n)]
    bar = tqdm(total=len(jobs), desc="generate", disable=not progress)
    with switch, guide:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed + j) for _, j in chunk]
            images = pipe(
                [prompts[p] for p, _ in chunk],
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                height=size,
                width=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
            ).images
            for (p, _), image in zip(chunk, images, strict=True):
                out[p].append(image)
            bar.update(len(chunk))
    bar.close()
    return out


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    labels: Sequence[str] | None = None,
    cell: int | None = None,
    reference: Image.Image | None = None,
) -> Image.Image:
    """Lay images out in rows (one per prompt), each with its label above; optional reference column."""
    cell = cell or max(64, max(im.width for row in rows for im in row))
    label_h = 14 if labels else 0
    columns = max(len(r) for r in rows) + (1 if reference is not None else 0)
    grid = Image.new("RGB", (columns * cell, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, row in enumerate(rows):
        top = r * (cell + label_h)
        if labels:
            draw.text((2, top + 1), labels[r], fill="black", font=font)
        images = ([reference] if reference is not None else []) + list(row)
        for c, image in enumerate(images):
            resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
            grid.paste(
                image.convert("RGB").resize((cell, cell), resample), (c * cell, top + label_h)
            )
    return grid
