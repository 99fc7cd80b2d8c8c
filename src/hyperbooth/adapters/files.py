"""Adapter files: one safetensors file, tensors keyed by module path, config in its metadata."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.inject import Adapter, add_adapter, base_fingerprint, target_layers
from hyperbooth.adapters.layers import LiDBWeights, make_weights, shaped_factors
from hyperbooth.atomic import atomic_file, load_tensors, unreadable_tensors
from hyperbooth.errors import HyperboothError

FORMAT = "hyperbooth.adapter/1"
METADATA_KEY = "hyperbooth"
_ADAPTER_HINT = "pass an adapter written by hyperbooth"
PART_SEPARATOR = "/"  # a multi-part file keys its tensors as part/key


def aux_checksum(adapter: Adapter) -> float:
    """A float64 sum of every LiDB aux basis: detects bases regenerated differently on load."""
    return _aux_sum(adapter.weights().values())


def _aux_sum(layers: Iterable[torch.nn.Module]) -> float:
    """The float64 sum of the LiDB aux bases among these layers' adapter weights."""
    total = 0.0
    for weights in layers:
        if isinstance(weights, LiDBWeights):
            total += weights.lidb_a_aux.double().sum().item()
            total += weights.lidb_b_aux.double().sum().item()
    return total


def _check_aux(checksum: float, file: AdapterFile, path: str | Path) -> None:
    """Refuse LiDB aux bases that differ from the ones the adapter was trained with."""
    if abs(checksum - file.aux_checksum) > 1e-6 * max(1.0, abs(file.aux_checksum)):
        raise HyperboothError(
            f"{path}: LiDB aux bases regenerated from seed {file.config.seed} do not match the "
            f"ones it was trained with (checksum {checksum:.9g} vs {file.aux_checksum:.9g})"
        )


@dataclass
class AdapterFile:
    """An adapter as stored: config, tensors by key, and where it came from."""

    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    base_fingerprint: str
    base_name: str = ""
    aux_checksum: float = 0.0
    info: dict | None = None
    layer_shapes: dict[str, tuple[int, ...]] | None = None  # key -> the base layer's weight shape

    def materialize(
        self, path: str | Path = "adapter"
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Plain LoRA factors per layer, scale folded into up, without needing the base model.

        The LiDB aux bases are regenerated from the seed and checked against the file's
        checksum, as loading onto a base does; `path` names the file in that error.
        """
        if not self.layer_shapes:
            raise HyperboothError(
                "this adapter file records no layer shapes; load it onto its base instead"
            )
        out, built = {}, []
        for key, shape in self.layer_shapes.items():
            in_features = math.prod(shape[1:])
            weights = make_weights(
                self.config, key, torch.nn.Linear(in_features, shape[0], device="meta")
            )
            weights.load_state_dict(
                {name: self.tensors[f"{key}.{name}"] for name, _ in weights.named_parameters()},
                strict=False,
                assign=True,
            )
            with torch.no_grad():
                down, up = weights.factors()
            out[key] = shaped_factors(down, self.config.scale * up, shape)
            built.append(weights)
        _check_aux(_aux_sum(built), self, path)
        return out


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file via a temp file + rename, so no half-written file remains."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_file(path) as temporary:
        save_file(contiguous, str(temporary), metadata=metadata)


def save_adapter(
    adapter: Adapter, path: str | Path, base_name: str = "", info: dict | None = None
) -> None:
    """Save an adapter's trainable tensors with its config and base fingerprint."""
    atomic_save_safetensors(adapter.state_dict(), path, adapter_metadata(adapter, base_name, info))


def adapter_metadata(adapter: Adapter, base_name: str = "", info: dict | None = None) -> dict:
    """The safetensors metadata of an adapter file: config, fingerprint, aux checksum, shapes."""
    meta = {
        "format": FORMAT,
        "config": json.loads(adapter.config.to_json()),
        "base_fingerprint": adapter.fingerprint,
        "base_name": base_name,
        "aux_checksum": aux_checksum(adapter),
        "info": info or {},
        # Weight shape per layer, in key order: enough to rebuild LiDB bases without the base model.
        "layer_shapes": [list(layer.weight.shape) for layer in adapter.layers.values()],
    }
    return {METADATA_KEY: json.dumps(meta)}


def _read_file(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The hyperbooth metadata and the tensors of an adapter file (safetensors only)."""
    meta = _read_meta(path)
    return meta, load_tensors(path, _ADAPTER_HINT)


def _read_meta(path: str | Path) -> dict:
    """The hyperbooth metadata of an adapter file, from its header alone."""
    path = Path(path)
    if path.is_dir():
        raise HyperboothError(
            f"{path} is a folder, not an adapter file; a DreamBooth model folder is a diffusers "
            "model already (pass it as --base), an adapter is one .safetensors file"
        )
    if not path.is_file():
        raise HyperboothError(f"adapter file not found: {path} (check the path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable_tensors(path, e, _ADAPTER_HINT) from e
    if METADATA_KEY not in metadata:
        raise HyperboothError(
            f"{path} has no hyperbooth metadata; it is not a hyperbooth adapter "
            "(diffusers/kohya LoRA files are loaded by their own tools)"
        )
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise HyperboothError(f"{path}: its hyperbooth metadata is damaged (not a JSON object)")
    if meta.get("format") != FORMAT:
        hint = ""
        if str(meta.get("format", "")).startswith("hyperbooth.custom-diffusion"):
            hint = "; it is a Custom Diffusion file: draw with it through --custom-diffusion"
        raise HyperboothError(
            f"{path} has adapter format {meta.get('format')!r}, expected {FORMAT!r}{hint}"
        )
    return meta


def adapter_infos(path: str | Path) -> list[dict]:
    """The `info` of every adapter a file holds, read from its header without the tensors."""
    meta = _read_meta(path)
    return [part.get("info") or {} for part in meta.get("parts", [meta])]


def _adapter_file(meta: dict, tensors: dict[str, torch.Tensor]) -> AdapterFile:
    """One adapter from its metadata and its (unprefixed) tensors."""
    return AdapterFile(
        config=AdapterConfig.from_json(meta["config"]),
        tensors=tensors,
        base_fingerprint=meta["base_fingerprint"],
        base_name=meta.get("base_name", ""),
        aux_checksum=float(meta.get("aux_checksum", 0.0)),
        info=meta.get("info") or {},
        layer_shapes=_layer_shapes(tensors, meta.get("layer_shapes")),
    )


def read_adapter_parts(path: str | Path) -> dict[str, AdapterFile]:
    """Every adapter a file holds, by part name ("" for an ordinary one-adapter file)."""
    meta, tensors = _read_file(path)
    try:
        if "parts" not in meta:
            return {"": _adapter_file(meta, tensors)}
        parts = {}
        for part in meta["parts"]:
            prefix = f"{part['name']}{PART_SEPARATOR}"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            parts[part["name"]] = _adapter_file(part, own)
        return parts
    except (KeyError, TypeError, ValueError) as error:
        reason = f"missing {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
        raise HyperboothError(
            f"{path}: cannot read its adapter settings ({reason}); it may come from a newer "
            "hyperbooth (upgrade) or be damaged"
        ) from None


def read_adapter(path: str | Path) -> AdapterFile:
    """Read a one-adapter file without touching any model."""
    parts = read_adapter_parts(path)
    if len(parts) != 1:
        raise HyperboothError(
            f"{path} holds {len(parts)} adapters ({', '.join(parts)}); read it with "
            "read_adapter_parts or load_adapters"
        )
    return next(iter(parts.values()))


def save_adapter_parts(
    parts: dict[str, tuple[Adapter, dict | None]], path: str | Path, base_name: str = ""
) -> None:
    """Save adapters that act together (a predicted LiDB + a relaxed LoRA) as one file.

    Tensors are keyed '<part>/<component>.<path>.<parameter>'; each part keeps its own config.
    """
    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for name, (adapter, info) in parts.items():
        if not name or PART_SEPARATOR in name:
            raise ValueError(f"a part name must be non-empty, without {PART_SEPARATOR!r}: {name!r}")
        meta = json.loads(adapter_metadata(adapter, base_name, info)[METADATA_KEY])
        metas.append({**meta, "name": name})
        tensors.update({f"{name}{PART_SEPARATOR}{k}": v for k, v in adapter.state_dict().items()})
    metadata = {METADATA_KEY: json.dumps({"format": FORMAT, "parts": metas})}
    atomic_save_safetensors(tensors, path, metadata)


def combine_factors(
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapters acting together as one LoRA: per layer, downs stacked by rows, ups by columns.

    (down_1; down_2) and (up_1 | up_2) give up_1 down_1 + up_2 down_2: rank r1 + r2, no SVD.
    """
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for one in factors:
        for key, (down, up) in one.items():
            if key in combined:
                old_down, old_up = combined[key]
                combined[key] = (torch.cat([old_down, down]), torch.cat([old_up, up], dim=1))
            else:
                combined[key] = (down, up)
    return dict(sorted(combined.items()))


def _layer_shapes(tensors: dict[str, torch.Tensor], shapes: list | None) -> dict | None:
    """Pair the stored weight shapes with the layer keys (sorted, as saved)."""
    if shapes is None:
        return None
    keys = sorted({key.rpartition(".")[0] for key in tensors})
    if len(keys) != len(shapes):
        raise HyperboothError(
            f"adapter metadata lists {len(shapes)} layer shapes for {len(keys)} layers"
        )
    return {key: tuple(int(n) for n in shape) for key, shape in zip(keys, shapes, strict=True)}


def check_fits(file: AdapterFile, base: object, path: str | Path = "adapter") -> None:
    """Raise a one-line error unless the adapter's layers exist with the same shapes in base."""
    try:
        fingerprint = base_fingerprint(target_layers(base, file.config))
    except HyperboothError:
        fingerprint = "(its layers are missing)"
    if fingerprint != file.base_fingerprint:
        made_for = f" ({file.base_name})" if file.base_name else ""
        raise HyperboothError(
            f"{path} was made for another base{made_for}: fingerprint {file.base_fingerprint}, "
            f"this base gives {fingerprint}; pass the --base it was trained on"
        )


def load_adapters(
    path: str | Path, base: object, name: str | None = None, weight: float = 1.0
) -> list[Adapter]:
    """Inject every adapter a file holds (parts are named <name>_<part>), all at `weight`."""
    name = name or Path(path).stem
    loaded: list[Adapter] = []
    try:
        for part, file in read_adapter_parts(path).items():
            loaded.append(_inject(file, path, base, f"{name}_{part}" if part else name, weight))
    except HyperboothError:
        for adapter in loaded:
            adapter.remove()
        raise
    return loaded


def load_adapter(
    path: str | Path, base: object, name: str | None = None, weight: float = 1.0
) -> Adapter:
    """Read a one-adapter file and inject it into base under `name` (default: the file stem)."""
    return _inject(read_adapter(path), path, base, name or Path(path).stem, weight)


def _inject(file: AdapterFile, path: str | Path, base: object, name: str, weight: float) -> Adapter:
    """Check that the adapter fits, add it to the base, verify its LiDB bases, scale it."""
    check_fits(file, base, path)

    adapter = add_adapter(base, file.config, name)
    try:  # a file that does not load leaves the base as it was
        adapter.load_state_dict(file.tensors)
        _check_aux(aux_checksum(adapter), file, path)
    except BaseException:
        adapter.remove()
        raise
    adapter.set_scale(weight)
    return adapter
