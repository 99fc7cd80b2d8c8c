"""What every method shares: the subject's prompts and cached latents, and the batch loss."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hyperbooth.atomic import write_text
from hyperbooth.diffusion import check_max_timestep, diffusion_loss, sample_latents
from hyperbooth.errors import HyperboothError
from hyperbooth.images import IMAGE_SUFFIXES, collect_images, load_image, save_png, to_tensor
from hyperbooth.training import StepBatch

SMALL_WORDS = ("a far away ", "very small ")
LARGE_WORDS = ("zoomed in ", "close up ")


@dataclass
class SubjectConfig:
    """Who the subject is and how prompts name it (DreamBooth's "a [V] [class]")."""

    token: str = "sks"
    class_name: str = "face"
    instance_prompt: str | None = None  # default "a {token} {class_name}"
    # One prompt per training image (its caption, e.g. from name.txt beside name.png), each with
    # the token; None: `prompt` for every image.
    instance_prompts: tuple[str, ...] | None = None
    prior_preservation: bool = False
    prior_weight: float = 1.0
    num_class_images: int = 100
    class_prompt: str | None = None  # default "a {class_name}"
    class_images_dir: str | None = None  # default <out>/class_images/<prompt>; reused across runs
    # Real regularisation images, each with its own caption (name.png + name.txt); when set it
    # replaces the generated class images (Custom Diffusion's retrieved set, METHOD 2).
    regularisation_dir: str | None = None
    # Fit the subject only at timesteps below this (None: all). Pairs with generating with the
    # adapter switched on below the same timestep, so the prompt alone lays out the picture.
    max_timestep: int | None = None
    # Custom Diffusion's augmentation for any method: this many copies of each image (the first
    # unchanged) rescaled 0.4-1.4x, a shrunk one pasted on grey with the loss masked to it and
    # "a far away"/"very small" before the prompt, an enlarged one cropped with "zoomed in"/"close
    # up". 0: the images as given.
    rescale_copies: int = 0
    # With a mask per image (white on the subject, e.g. a face parser's), the loss weighs each
    # latent pixel 1 + mask_weight * mask: the fit spends itself on the subject, not the scene.
    mask_weight: float = 0.0

    def __post_init__(self) -> None:
        check_max_timestep(self.max_timestep)
        if self.mask_weight < 0:
            raise HyperboothError(f"--mask-weight must be >= 0, got {self.mask_weight}")
        if self.rescale_copies < 0:
            raise HyperboothError(f"--rescale takes a count >= 0, got {self.rescale_copies}")
        if not self.token or any(c.isspace() for c in self.token):
            raise HyperboothError(f"--token must be one word, got {self.token!r}")
        for given in (self.instance_prompt, *(self.instance_prompts or ())):
            if given is not None and self.token not in given.split():
                raise HyperboothError(
                    f"the prompt {given!r} does not contain the token {self.token!r}; "
                    f"write it in, e.g. 'a {self.token} {self.class_name}'"
                )

    @property
    def prompt(self) -> str:
        """The instance prompt."""
        return self.instance_prompt or f"a {self.token} {self.class_name}"

    @property
    def per_image_prompts(self) -> bool:
        """Whether each training image has a prompt of its own (--captions, --rescale copies)."""
        return bool(self.rescale_copies) or self.instance_prompts is not None

    def image_prompts(self, count: int) -> list[str]:
        """The prompt of each of count training images."""
        if self.instance_prompts is None:
            return [self.prompt] * count
        if len(self.instance_prompts) != count:
            raise HyperboothError(
                f"{len(self.instance_prompts)} captions for {count} images; give one per image"
            )
        return list(self.instance_prompts)

    @property
    def prior_prompt(self) -> str:
        """The class prompt for prior preservation."""
        return self.class_prompt or f"a {self.class_name}"


def token_ids(base: object, prompt: str | list[str]) -> torch.Tensor:
    """Tokenise a prompt (or a list of them) to (N, 77) ids, padded to the model's length."""
    return base.tokenizer(
        prompt,
        padding="max_length",
        max_length=base.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def rescale_image(
    image: Image.Image,
    scale: float,
    rng: np.random.Generator,
    grid: int,
    subject_mask: np.ndarray | None = None,
) -> tuple[Image.Image, np.ndarray, str] | tuple[Image.Image, np.ndarray, str, np.ndarray]:
    """One rescale augmentation: (image, mask on the latent grid, prompt prefix).

    `grid` is the VAE's downsampling factor: sizes and offsets are multiples of it, so the mask
    lines up with latent pixels. With `subject_mask` (H, W) in [0, 1], the same move is applied
    to it and it comes back fourth, at image resolution (zero where the image was padded).
    """
    size = image.width
    new = max(grid, int(round(size * scale / grid)) * grid)
    latent = size // grid
    mask = np.ones((latent, latent), dtype=np.float32)
    resized = image.resize((new, new), Image.Resampling.BICUBIC)
    moved = None
    if subject_mask is not None:
        pixels = np.clip(np.asarray(subject_mask, dtype=np.float32), 0, 1) * 255
        moved = Image.fromarray(pixels.astype(np.uint8)).resize(
            (new, new), Image.Resampling.BILINEAR
        )
    prefix = ""
    if new < size:
        top, left = (rng.integers(0, (size - new) // grid + 1, 2) * grid).tolist()
        canvas = Image.new("RGB", (size, size), (128, 128, 128))
        canvas.paste(resized, (left, top))
        mask[:] = 0
        mask[top // grid : (top + new) // grid, left // grid : (left + new) // grid] = 1
        prefix = str(rng.choice(SMALL_WORDS)) if new < 0.6 * size else ""
        resized = canvas
        if moved is not None:
            blank = Image.new("L", (size, size), 0)
            blank.paste(moved, (left, top))
            moved = blank
    elif new > size:
        top, left = rng.integers(0, new - size + 1, 2).tolist()
        resized = resized.crop((left, top, left + size, top + size))
        prefix = str(rng.choice(LARGE_WORDS))
        if moved is not None:
            moved = moved.crop((left, top, left + size, top + size))
    if moved is None:
        return resized, mask, prefix
    return resized, mask, prefix, np.asarray(moved, dtype=np.float32) / 255


@dataclass
class Copies:
    """Rescaled training images, each with its loss region on the latent grid and its prompt."""

    images: list[Image.Image]
    regions: list[torch.Tensor]  # (h, w): 0 where a shrunk copy was padded
    prompts: list[str]
    masks: list[np.ndarray] | None = None  # the subject masks, moved with their images


def rescaled_copies(
    images: list[Image.Image],
    prompts: list[str],
    copies: int,
    seed: list[int],
    grid: int,
    masks: list[np.ndarray] | None = None,
) -> Copies:
    """`copies` rescale augmentations of each image (the first unchanged), each with its prompt."""
    out = Copies([], [], [], None if masks is None else [])
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        rng = np.random.default_rng([*seed, i])
        for k in range(max(copies, 1)):
            scale = 1.0 if k == 0 else float(rng.uniform(0.4, 1.4))
            moved = rescale_image(image, scale, rng, grid, None if masks is None else masks[i])
            out.images.append(moved[0])
            out.regions.append(torch.from_numpy(moved[1]))
            out.prompts.append(moved[2] + prompt)
            if out.masks is not None:
                out.masks.append(moved[3])
    return out


def loss_weights(
    masks: list[np.ndarray], count: int, subject: SubjectConfig, grid: int
) -> torch.Tensor:
    """(N, 1, h, w) per-latent-pixel loss weights 1 + mask_weight * (the mask, area-averaged)."""
    if len(masks) != count:
        raise HyperboothError(f"{len(masks)} masks for {count} images; give one per image")
    stacked = torch.stack([torch.as_tensor(np.asarray(m, dtype=np.float32)) for m in masks])
    if stacked.min() < 0 or stacked.max() > 1 or stacked.shape[-1] % grid:
        raise HyperboothError(
            f"masks must be in [0, 1] and sized like the images (a multiple of {grid} pixels)"
        )
    pooled = torch.nn.functional.avg_pool2d(stacked[:, None], grid)
    return 1.0 + subject.mask_weight * pooled


@torch.no_grad()
def encode_images(
    base: object, images: list[Image.Image], device: torch.device, chunk: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posteriors of images as (mean, std), already multiplied by vae.config.scaling_factor."""
    means, stds = [], []
    scale = base.vae.config.scaling_factor
    for start in range(0, len(images), chunk):
        pixels = torch.stack([to_tensor(im) for im in images[start : start + chunk]])
        pixels = pixels.to(device, base.vae.dtype)
        posterior = base.vae.encode(pixels).latent_dist
        means.append(posterior.mean.float() * scale)
        stds.append(posterior.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


CLASS_PROMPT_FILE = "class_prompt.txt"  # what the generated class images in a folder show


def class_images_folder(out_dir: Path, prompt: str) -> Path:
    """The default folder of generated class images for one prior prompt, inside out_dir."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48] or "class"
    return out_dir / "class_images" / f"{slug}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def class_images(
    base: object, subject: SubjectConfig, folder: Path, progress: bool = True
) -> list[Image.Image]:
    """The prior-preservation images: reuse what is in folder, generate the rest with the frozen base.

    A folder this function generated into records its prompt, and is refused for another one
    (a folder of the user's own photos, without that record, is taken as it is).
    """
    from hyperbooth.generate import generate_images

    folder.mkdir(parents=True, exist_ok=True)
    record = folder / CLASS_PROMPT_FILE
    if record.is_file() and record.read_text(errors="replace").strip() != subject.prior_prompt:
        raise HyperboothError(
            f"{folder} holds class images drawn for {record.read_text(errors='replace').strip()!r}"
            f", not {subject.prior_prompt!r}; give --class-images another folder"
        )
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = subject.num_class_images - len(have)
    if missing > 0:
        write_text(record, subject.prior_prompt + "\n")
        # Seeds continue after the existing images, so an interrupted generation resumes.
        images = generate_images(
            base, [subject.prior_prompt], n=missing, seed=len(have), progress=progress
        )[0]
        for i, image in enumerate(images):
            save_png(image, folder / f"class_{len(have) + i:05d}.png")
    return [
        load_image(p, base.resolution) for p in collect_images(folder)[: subject.num_class_images]
    ]


@dataclass
class SubjectData:
    """Cached, device-resident training data: latent posteriors and token ids."""

    instance_mean: torch.Tensor  # (N, 4, h, w)
    instance_std: torch.Tensor
    instance_ids: torch.Tensor  # (1, 77), or (T, 77): prompt templates, one drawn per sample
    # With rescale_copies or instance_prompts: each latent's loss mask (N, 1, h, w), and
    # instance_ids is (N, 77), each latent's own prompt.
    instance_mask: torch.Tensor | None = None
    class_mean: torch.Tensor | None = None
    class_std: torch.Tensor | None = None
    class_ids: torch.Tensor | None = None  # (1, 77), or (N, 77): one caption per class image
    hidden_cache: dict[str, torch.Tensor] = field(default_factory=dict)
    # The instance prompts as text, one per row of instance_ids (a new word re-tokenises them).
    prompts: list[str] = field(default_factory=list)


def prepare_subject(
    base: object,
    subject: SubjectConfig,
    images: list[Image.Image],
    device: torch.device,
    out_dir: Path,
    progress: bool = True,
    masks: list[np.ndarray] | None = None,
) -> SubjectData:
    """Encode the subject (and class) images once; tokenise the prompts once.

    masks: one (H, W) array in [0, 1] per image (the subject's region), weighted by
    subject.mask_weight in the loss.
    """
    if not images:
        raise HyperboothError(
            "no training images given; pass --images with 1-5 photos of the subject"
        )
    grid = base.vae_scale_factor
    # (N, 1, h, w) per-latent loss weights, when latents differ in mask or prompt; computed
    # (and the masks checked) before any copies are made.
    weights = None if masks is None else loss_weights(masks, len(images), subject, grid)
    check_max_timestep(subject.max_timestep, base.scheduler.config.num_train_timesteps)
    prompts = subject.prompt
    if subject.per_image_prompts:
        copies = rescaled_copies(
            images, subject.image_prompts(len(images)), subject.rescale_copies, [0], grid, masks
        )
        images, prompts = copies.images, copies.prompts
        regions = torch.stack(copies.regions)[:, None]  # where each copy's loss counts
        if copies.masks is not None:  # the masks moved with their copies
            regions = regions * loss_weights(copies.masks, len(images), subject, grid)
        weights = regions
    mean, std = encode_images(base, images, device)
    data = SubjectData(mean, std, token_ids(base, prompts).to(device))
    data.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if weights is not None:
        data.instance_mask = weights.to(device)
    if subject.regularisation_dir:
        from hyperbooth.retrieve import captioned_images

        pairs = captioned_images(subject.regularisation_dir)[: subject.num_class_images]
        pictures = [load_image(path, base.resolution) for path, _ in pairs]
        data.class_mean, data.class_std = encode_images(base, pictures, device)
        data.class_ids = token_ids(base, [caption for _, caption in pairs]).to(device)
    elif subject.prior_preservation:
        folder = (
            Path(subject.class_images_dir)
            if subject.class_images_dir
            else class_images_folder(out_dir, subject.prior_prompt)
        )
        pictures = class_images(base, subject, folder, progress)
        data.class_mean, data.class_std = encode_images(base, pictures, device)
        data.class_ids = token_ids(base, subject.prior_prompt).to(device)
    return data


class SubjectMethod:
    """The DreamBooth-family loss: diffusion loss on the subject, plus the class prior if asked."""

    name = "subject"
    default_learning_rate = 1e-4

    def __init__(self, base: object, subject: SubjectConfig, data: SubjectData) -> None:
        self.base = base
        self.subject = subject
        self.data = data

    def text_encoder_trains(self) -> bool:
        """Whether any text-encoder tensor is trainable (then embeddings cannot be cached)."""
        return any(p.requires_grad for p in self.base.text_encoder.parameters())

    def encode_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder hidden states for ids (1, 77); cached while the text encoder is frozen."""
        if self.text_encoder_trains():
            return self.base.text_encoder(ids)[0]
        key = str(ids.tolist())
        if key not in self.data.hidden_cache:
            with torch.no_grad():
                self.data.hidden_cache[key] = self.base.text_encoder(ids)[0]
        return self.data.hidden_cache[key]

    def indexed_hidden(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Hidden states of the prompts of images `index` (one shared prompt, or each its own)."""
        if ids.shape[0] == 1:
            return self.encode_prompt(ids).expand(len(index), -1, -1)
        return torch.cat([self.encode_prompt(ids[i : i + 1]) for i in index.tolist()])

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """Mean diffusion loss on the subject + prior_weight * mean loss on class images."""
        g, n, data = batch.generator, batch.batch_size, self.data
        index = torch.randint(0, data.instance_mean.shape[0], (n,), generator=g)
        means, stds = [data.instance_mean[index]], [data.instance_std[index]]
        mask = None
        if data.instance_mask is not None:  # each latent its own prompt and mask
            hidden = [self.indexed_hidden(data.instance_ids, index)]
            mask = [data.instance_mask[index]]
        elif data.instance_ids.shape[0] == 1:
            hidden = [self.encode_prompt(data.instance_ids).expand(n, -1, -1)]
        else:  # prompt templates: each sample draws one
            pick = torch.randint(0, data.instance_ids.shape[0], (n,), generator=g)
            hidden = [self.encode_prompt(data.instance_ids[pick.to(data.instance_ids.device)])]
        if data.class_mean is not None:
            index = torch.randint(0, data.class_mean.shape[0], (n,), generator=g)
            means.append(data.class_mean[index])
            stds.append(data.class_std[index])
            hidden.append(self.indexed_hidden(data.class_ids, index))
            if mask is not None:
                mask.append(torch.ones_like(mask[0]))
        latents = sample_latents(torch.cat(means), torch.cat(stds), g)
        per_sample = diffusion_loss(
            self.base.unet, self.base.scheduler, latents, torch.cat(hidden), g, reduce=False,
            mask=None if mask is None else torch.cat(mask), max_timestep=self.subject.max_timestep,
        )  # fmt: skip
        loss = per_sample[:n].mean()
        if data.class_mean is not None:
            loss = loss + self.subject.prior_weight * per_sample[n:].mean()
        return loss
