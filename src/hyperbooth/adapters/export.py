"""Export an adapter as a plain LoRA file: diffusers (peft keys) or kohya (A1111, ComfyUI).

Every adapter materialises into per-layer LoRA factors ``down`` (r, in) and ``up`` (out, r) with
its scale folded into ``up`` (``Adapter.materialize``), so both formats store scale 1: diffusers
files carry no alphas (diffusers then sets alpha = rank), kohya files carry ``alpha = rank``.
Layouts and the reasons for them: docs/EXPORT.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from hyperbooth.adapters.config import COMPONENTS
from hyperbooth.adapters.files import (
    atomic_save_safetensors,
    combine_factors,
    load_adapters,
    read_adapter_parts,
)
from hyperbooth.choices import EXPORT_FORMATS
from hyperbooth.errors import HyperboothError

# The file name diffusers' load_lora_weights looks for when given a folder.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# transformers 5 flattened CLIPTextModel (``encoder.layers.0...``), but transformers 4, A1111,
# ComfyUI and published SD LoRAs name its modules ``text_model.encoder.layers.0...``; both
# formats keep that segment (diffusers 0.42 strips it again when the model lacks it).
_TEXT_MODEL = "text_model."


def _split(key: str, down: Tensor, up: Tensor) -> tuple[str, str]:
    """Check one layer's factors and return (component, module path inside the component)."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"factor key {key!r} does not start with one of {COMPONENTS}")
    if down.dim() != up.dim() or down.dim() not in (2, 4) or down.shape[0] != up.shape[1]:
        raise ValueError(
            f"{key}: expected down (r, in) and up (out, r) (a conv: (r, in, kh, kw) and "
            f"(out, r, 1, 1)), got {tuple(down.shape)} and "
            f"{tuple(up.shape)} (per-sample adapters cannot be exported as one LoRA)"
        )
    if component == "text_encoder" and not path.startswith(_TEXT_MODEL):
        path = _TEXT_MODEL + path
    return component, path


def to_diffusers(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """peft-style keys as diffusers reads them: '<component>.<path>.lora_A.weight' / 'lora_B'."""
    tensors = {}
    for key, (down, up) in factors.items():
        component, path = _split(key, down, up)
        # No alphas: diffusers then uses lora_alpha = r for every layer, i.e. scale 1.
        tensors[f"{component}.{path}.lora_A.weight"] = down
        tensors[f"{component}.{path}.lora_B.weight"] = up
    return tensors


def to_kohya(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """kohya sd-scripts keys: 'lora_unet_<path>' / 'lora_te_text_model_<path>', '.' -> '_'."""
    tensors = {}
    for key, (down, up) in factors.items():
        component, path = _split(key, down, up)
        # sd-scripts names a module by its diffusers/transformers path with dots as underscores
        # (to_out.0 -> to_out_0); A1111 and ComfyUI map these names onto their own modules.
        name = _KOHYA_PREFIXES[component] + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        # Readers scale by alpha / rank; the adapter's scale is already in `up`.
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    return tensors


def _target_file(fmt: str, out_path: str | Path) -> Path:
    """The file an export to `out_path` writes (a diffusers export may name a folder)."""
    if fmt not in EXPORT_FORMATS:
        raise HyperboothError(f"unknown export format {fmt!r}; pass one of {EXPORT_FORMATS}")
    out = Path(out_path).expanduser()
    if out.suffix == ".safetensors":
        return out
    if fmt == "diffusers":
        return out / DIFFUSERS_WEIGHT_NAME
    raise HyperboothError(
        f"a kohya export is one file: pass --out ending in .safetensors "
        f"(e.g. subject.safetensors), got {str(out_path)!r}"
    )


def export_adapter(
    adapter_path: str | Path, fmt: str, out_path: str | Path, base: object | None = None
) -> Path:
    """Convert a hyperbooth adapter file to `fmt` and write it; returns the written file.

    Without a base, the factors are rebuilt from the file alone (it records every layer's
    shape and the LiDB seed); with one, the adapter is first checked to fit that base.
    """
    target = _target_file(fmt, out_path)
    # A file of several parts (HyperDreamBooth: prediction + relaxed LoRA) exports as one LoRA
    # whose rank is the sum of theirs.
    if base is None:
        parts = read_adapter_parts(adapter_path).values()
        factors = combine_factors([part.materialize(adapter_path) for part in parts])
    else:
        adapters = load_adapters(adapter_path, base, name="export")
        try:
            factors = combine_factors([adapter.materialize() for adapter in adapters])
        finally:
            # Export must not leave the adapter acting inside the caller's base.
            for adapter in adapters:
                adapter.remove()
    tensors = to_diffusers(factors) if fmt == "diffusers" else to_kohya(factors)
    atomic_save_safetensors(tensors, target)
    return target
