"""Custom Diffusion (METHOD 2): only the cross-attention K/V projections and new words train.

Each concept gets a modifier token (V*, e.g. `<new1>`) added to the tokenizer and initialised
from a rare word; the UNet's `attn2.to_k` / `attn2.to_v` weights (optionally `to_q`, `to_out.0`)
train with it. The subject's images are augmented by random rescaling (0.4-1.4x): a shrunk
image is pasted on a grey canvas, its prompt starts "a far away" / "very small" and the loss
covers only where the image is; an enlarged one is cropped and says "zoomed in" / "close up".
A regularisation set (real captioned images, or class images drawn by the frozen model) keeps
the rest of the model's vocabulary in place. Several concepts train jointly with one modifier
token each.

The result is one safetensors file: `unet.<module path>.weight` holds each trained weight's
*delta* from the base, `embeddings.<token>` each modifier token's vector; its metadata carries
the config, the concepts and the base fingerprint. Loading with plain diffusers is a few lines
(see `docs/CUSTOM_DIFFUSION.md`); `load_custom_diffusion` does it for hyperbooth bases.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from hyperbooth.adapters.files import atomic_save_safetensors
from hyperbooth.adapters.inject import base_fingerprint
from hyperbooth.diffusion import diffusion_loss, sample_latents
from hyperbooth.errors import HyperboothError
from hyperbooth.methods.common import (
    SubjectConfig,
    SubjectData,
    encode_images,
    rescaled_copies,
    token_ids,
)
from hyperbooth.methods.textual_inversion import add_new_token, add_word
from hyperbooth.training import StepBatch

CUSTOM_DIFFUSION_FILE = "custom_diffusion.safetensors"
FORMAT = "hyperbooth.custom-diffusion/1"
METADATA_KEY = "hyperbooth"
KV_SUFFIXES = ("attn2.to_k", "attn2.to_v")
QO_SUFFIXES = ("attn2.to_q", "attn2.to_out.0")


@dataclass
class CustomDiffusionConfig:
    """What trains besides K/V, how the modifier tokens start and how images are augmented."""

    # V* starts from a rare word. The paper's "ktn" is two BPE tokens in CLIP's vocabulary;
    # "sks" (DreamBooth's rare word) is one.
    initializer: str = "sks"
    train_q_out: bool = False  # also attn2.to_q and attn2.to_out.0
    rescale: bool = True  # the 0.4-1.4x rescale augmentation with masked loss
    augmentations: int = 8  # rescaled copies per training image (the first is the image itself)
    seed: int = 0


def cross_attention_layers(unet: nn.Module, train_q_out: bool = False) -> dict[str, nn.Module]:
    """The UNet linears Custom Diffusion trains, keyed 'unet.<module path>'."""
    suffixes = KV_SUFFIXES + (QO_SUFFIXES if train_q_out else ())
    layers = {
        f"unet.{name}": module
        for name, module in unet.named_modules()
        if name.endswith(suffixes) and isinstance(module, nn.Linear)
    }
    if not layers:
        raise HyperboothError("this UNet has no cross-attention (attn2) layers to train")
    return layers


@dataclass
class Bank:
    """Every augmented training image, encoded once: latents, loss masks, token ids."""

    mean: torch.Tensor  # (M, C, h, w)
    std: torch.Tensor
    mask: torch.Tensor  # (M, 1, h, w)
    ids: torch.Tensor  # (M, 77)


def build_bank(
    base: object,
    concepts: list[tuple[SubjectConfig, list[Image.Image]]],
    config: CustomDiffusionConfig,
    device: torch.device,
) -> Bank:
    """Augment and encode every concept's images; each copy keeps its own prompt."""
    grid = base.vae_scale_factor
    pictures, masks, prompts = [], [], []
    copies = config.augmentations if config.rescale else 1
    for c, (subject, images) in enumerate(concepts):
        more = rescaled_copies(
            images, subject.image_prompts(len(images)), copies, [config.seed, c], grid
        )
        pictures.extend(more.images)
        masks.extend(more.regions)
        prompts.extend(more.prompts)
    mean, std = encode_images(base, pictures, device)
    mask = torch.stack(masks)[:, None].to(device)
    return Bank(mean, std, mask, token_ids(base, prompts).to(device))


class CustomDiffusion:
    """Cross-attention K/V (+ modifier tokens) fine-tuning for one or several concepts."""

    name = "custom-diffusion"
    default_learning_rate = 1e-5  # diffusers' train_custom_diffusion example, per sample

    def __init__(
        self,
        base: object,
        concepts: list[tuple[SubjectConfig, list[Image.Image]]],
        regularisation: list[tuple[SubjectData, float]],
        config: CustomDiffusionConfig,
    ) -> None:
        """regularisation: each prior set once, with its prior weight."""
        self.base, self.config = base, config
        self.subjects = [subject for subject, _ in concepts]
        # One batch mixes concepts, so they share one timestep range (the tightest asked for).
        limits = [s.max_timestep for s in self.subjects if s.max_timestep is not None]
        self.max_timestep = min(limits) if limits else None
        tokens = [s.token for s in self.subjects]
        if len(set(tokens)) != len(tokens):
            raise HyperboothError(f"each concept needs its own token, got {tokens}")
        initial = base.tokenizer(config.initializer, add_special_tokens=False).input_ids
        if len(initial) != 1:
            raise HyperboothError(
                f"--initializer {config.initializer!r} is {len(initial)} tokens; pass one word "
                "that the tokenizer keeps whole (default sks)"
            )
        self.token_ids = torch.tensor([add_new_token(base, t, 1)[0] for t in tokens])
        embedding = base.text_encoder.get_input_embeddings()
        self.frozen = embedding.weight.detach().clone()
        start = self.frozen[initial[0]].clone()
        self.vectors = nn.Parameter(start.repeat(len(tokens), 1).to(embedding.weight.device))
        self.weight_name = next(
            name for name, p in base.text_encoder.named_parameters() if p is embedding.weight
        )
        base.unet.requires_grad_(False)
        base.text_encoder.requires_grad_(False)
        self.layers = cross_attention_layers(base.unet, config.train_q_out)
        self.initial = {}
        for key, layer in self.layers.items():
            for name, parameter in layer.named_parameters():
                parameter.requires_grad_(True)
                self.initial[f"{key}.{name}"] = parameter.detach().clone()
        device = embedding.weight.device
        self.bank = build_bank(base, concepts, config, device)
        self.regularisation = [(r, w) for r, w in regularisation if r.class_mean is not None]
        self.hidden_cache: dict[str, torch.Tensor] = {}

    def trainable(self) -> dict[str, nn.Parameter]:
        """The cross-attention weights (keyed by module path) and the modifier vectors."""
        out = {
            f"{key}.{name}": p
            for key, layer in self.layers.items()
            for name, p in layer.named_parameters()
        }
        return out | {"custom_diffusion.vectors": self.vectors}

    def embedding_matrix(self) -> torch.Tensor:
        """The frozen embedding matrix with the modifier rows replaced by the trainable vectors."""
        return self.frozen.index_put((self.token_ids.to(self.frozen.device),), self.vectors)

    def encode_new(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of prompts that use modifier tokens (recomputed: the vectors train)."""
        replaced = {self.weight_name: self.embedding_matrix()}
        return functional_call(self.base.text_encoder, replaced, (ids,), strict=False)[0]

    def encode_fixed(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states of regularisation captions (no new words), cached per caption."""
        rows = []
        for row in ids:
            key = str(row.tolist())
            if key not in self.hidden_cache:
                with torch.no_grad():
                    self.hidden_cache[key] = self.base.text_encoder(row[None])[0]
            rows.append(self.hidden_cache[key])
        return torch.cat(rows)

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """Masked diffusion loss on augmented concept images + prior_weight x regularisation."""
        g, n, bank = batch.generator, batch.batch_size, self.bank
        index = torch.randint(0, len(bank.mean), (n,), generator=g)
        means, stds, masks = [bank.mean[index]], [bank.std[index]], [bank.mask[index]]
        hidden = [self.encode_new(bank.ids[index])]
        weights = []
        for data, weight in self.regularisation:
            pick = torch.randint(0, data.class_mean.shape[0], (n,), generator=g)
            means.append(data.class_mean[pick])
            stds.append(data.class_std[pick])
            masks.append(torch.ones_like(masks[0]))  # n rows, however few images the bank has
            ids = data.class_ids
            hidden.append(self.encode_fixed(ids[pick] if ids.shape[0] > 1 else ids.expand(n, -1)))
            weights.append(weight)
        latents = sample_latents(torch.cat(means), torch.cat(stds), g)
        per_sample = diffusion_loss(
            self.base.unet,
            self.base.scheduler,
            latents,
            torch.cat(hidden),
            g,
            reduce=False,
            mask=torch.cat(masks),
            max_timestep=self.max_timestep,
        )
        loss = per_sample[:n].mean()
        for k, weight in enumerate(weights, start=1):
            loss = loss + weight * per_sample[k * n : (k + 1) * n].mean()
        return loss

    def deltas(self) -> dict[str, torch.Tensor]:
        """Each trained tensor minus its value in the base, keyed 'unet.<path>.<name>'."""
        return {
            key: (p.detach() - self.initial[key]).float()
            for key, p in self.trainable().items()
            if key in self.initial
        }

    def save(self, out_dir: Path) -> Path:
        """Write <out>/custom_diffusion.safetensors; the base keeps the new words in place."""
        with torch.no_grad():
            self.base.text_encoder.get_input_embeddings().weight[self.token_ids] = self.vectors
        concepts = [
            {"token": s.token, "class_name": s.class_name, "prompt": s.prompt}
            for s in self.subjects
        ]
        embeddings = {s.token: self.vectors[i : i + 1] for i, s in enumerate(self.subjects)}
        path = Path(out_dir) / CUSTOM_DIFFUSION_FILE
        save_custom_diffusion(
            path, self.deltas(), embeddings, self.base, concepts, {"config": asdict(self.config)}
        )
        return path


def save_custom_diffusion(
    path: str | Path,
    deltas: dict[str, torch.Tensor],
    embeddings: dict[str, torch.Tensor],
    base: object,
    concepts: list[dict],
    info: dict | None = None,
) -> None:
    """Write K/V deltas and modifier vectors with the concepts and the base fingerprint."""
    layers = {key.rpartition(".")[0]: None for key in deltas}
    modules = {key: base.unet.get_submodule(key.removeprefix("unet.")) for key in layers}
    meta = {
        "format": FORMAT,
        "method": "custom-diffusion",
        "concepts": concepts,
        "base_name": getattr(base, "name", ""),
        "base_fingerprint": base_fingerprint(modules),
        **(info or {}),
    }
    tensors = dict(deltas) | {f"embeddings.{t}": v.reshape(1, -1) for t, v in embeddings.items()}
    atomic_save_safetensors(tensors, path, {METADATA_KEY: json.dumps(meta)})


def read_custom_diffusion(
    path: str | Path,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metadata, deltas by 'unet.<path>.<name>', vectors by token) of a Custom Diffusion file."""
    path = Path(path)
    if path.is_dir():
        path = path / CUSTOM_DIFFUSION_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        raise HyperboothError(f"no Custom Diffusion file at {path} (pass its .safetensors)")
    try:
        with safe_open(str(path), "pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - a corrupt file is the user's input
        raise HyperboothError(f"{path} is not a readable safetensors file ({error})") from None
    if meta.get("format") != FORMAT:
        raise HyperboothError(
            f"{path} is not a hyperbooth Custom Diffusion file (train one with "
            "`hyperbooth train --method custom-diffusion`)"
        )
    deltas = {k: v for k, v in tensors.items() if k.startswith("unet.")}
    vectors = {k.removeprefix("embeddings."): v for k, v in tensors.items() if k.startswith("emb")}
    return meta, deltas, vectors


def check_layers(meta: dict, deltas: dict[str, torch.Tensor], base: object, path: object) -> None:
    """One-line error unless every delta names a base module of the same shape (the fingerprint)."""
    layers = sorted({key.rpartition(".")[0] for key in deltas})
    try:
        modules = {key: base.unet.get_submodule(key.removeprefix("unet.")) for key in layers}
    except AttributeError:
        modules = None
    if modules is None or base_fingerprint(modules) != meta.get("base_fingerprint"):
        made_for = f" ({meta['base_name']})" if meta.get("base_name") else ""
        raise HyperboothError(
            f"{path} was made for another base{made_for}; pass the --base it was trained on"
        )


def load_custom_diffusion(path: str | Path, base: object, weight: float = 1.0) -> list[str]:
    """Add a file's modifier tokens to the base and its K/V deltas (times weight) to the UNet."""
    meta, deltas, vectors = read_custom_diffusion(path)
    check_layers(meta, deltas, base, path)
    with torch.no_grad():
        for key, delta in deltas.items():
            parameter = base.unet.get_parameter(key.removeprefix("unet."))
            parameter.add_(weight * delta.to(parameter.device, parameter.dtype))
    for token, vector in vectors.items():
        add_word(base, token, vector)
    return list(vectors)
