"""Injection by module-path pattern, and the handle to one named adapter inside a base.

Tensors are keyed ``<component>.<module path>.<parameter>`` where the parameter name carries
the method prefix (``lora_down``, ``lidb_a_train``...). Files, checkpoints, merging, export and
the hypernetwork's outputs all use these keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from hyperbooth.adapters.config import COMPONENTS, AdapterConfig
from hyperbooth.adapters.layers import (
    AdaptedLayer,
    AdapterWeights,
    Box,
    can_adapt,
    make_weights,
    shaped_factors,
    wrap_layer,
)
from hyperbooth.errors import HyperboothError


def components(base: object) -> dict[str, nn.Module]:
    """The adaptable models of a base (anything with .unet and .text_encoder), by name."""
    return {name: getattr(base, name) for name in COMPONENTS if hasattr(base, name)}


def find_targets(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Paths of the adaptable layers (wrapped or not, see can_adapt) fully matching a pattern."""
    compiled = [re.compile(p) for p in patterns]
    found = []
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            pass
        elif not can_adapt(module) or path.endswith(".base_layer"):
            continue
        if any(p.fullmatch(path) for p in compiled):
            found.append(path)
    return found


def target_layers(base: object, config: AdapterConfig) -> dict[str, nn.Module]:
    """Every layer the config adapts, keyed '<component>.<path>'; errors if a pattern matches nothing."""
    layers: dict[str, nn.Module] = {}
    for component, model in components(base).items():
        for pattern in config.targets(component):
            paths = find_targets(model, (pattern,))
            if not paths:
                raise HyperboothError(
                    f"layer pattern {pattern!r} matches no nn.Linear or (ungrouped) nn.Conv2d in the {component}; "
                    f"check it against the module names (e.g. 'down_blocks.0.attentions.0."
                    f"transformer_blocks.0.attn1.to_q' or 'encoder.layers.0.self_attn.q_proj')"
                )
            for path in paths:
                layers[f"{component}.{path}"] = model.get_submodule(path)
    return dict(sorted(layers.items()))


def base_fingerprint(layers: Mapping[str, nn.Module]) -> str:
    """A hash of the adapted layers' keys and weight shapes: equal iff an adapter fits."""
    lines = [f"{key}:{tuple(layer.weight.shape)}" for key, layer in sorted(layers.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of a model's own weights as float16: the same whichever dtype holds them, and
    whether or not adapter wrappers (even removed ones) still hold its layers."""
    digest = hashlib.sha256()
    adapter_prefixes = tuple(
        f"{path}.adapters."
        for path, module in model.named_modules()
        if isinstance(module, AdaptedLayer)
    )
    own = {
        name.replace(".base_layer.", "."): tensor
        for name, tensor in model.state_dict().items()
        if not name.startswith(adapter_prefixes)
    }
    for name, tensor in sorted(own.items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().to("cpu", torch.float16).contiguous().view(torch.uint8).numpy()
        )
    return digest.hexdigest()[:16]


def _wrap(model: nn.Module, path: str) -> AdaptedLayer:
    """Replace the layer at `path` by its adapted wrapper (idempotent)."""
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLayer):
        return module
    wrapped = wrap_layer(module)
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, wrapped)
    return wrapped


class Adapter:
    """One named adapter injected into a base: its config, its layers and its tensors by key."""

    def __init__(
        self,
        config: AdapterConfig,
        name: str,
        layers: dict[str, AdaptedLayer],
        fingerprint: str,
    ) -> None:
        self.config = config
        self.name = name
        self.layers = layers
        self.fingerprint = fingerprint

    # -- tensors by key ------------------------------------------------------------------
    def weights(self) -> dict[str, AdapterWeights]:
        """The per-layer weight modules, keyed '<component>.<path>'."""
        return {key: layer.adapters[self.name] for key, layer in self.layers.items()}

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable tensors keyed '<component>.<path>.<parameter>'."""
        for key, weights in self.weights().items():
            for pname, param in weights.named_parameters():
                yield f"{key}.{pname}", param

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors, in key order."""
        return [p for _, p in self.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached trainable tensors by key (what a file stores)."""
        return {k: p.detach() for k, p in self.named_parameters()}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into the adapter; keys and shapes must match exactly."""
        own = dict(self.named_parameters())
        missing, unexpected = set(own) - set(tensors), set(tensors) - set(own)
        if missing or unexpected:
            raise HyperboothError(
                f"adapter tensors do not match its layers: {len(missing)} missing "
                f"(e.g. {sorted(missing)[:1]}), {len(unexpected)} unexpected "
                f"(e.g. {sorted(unexpected)[:1]}); was the file made with another layer set?"
            )
        with torch.no_grad():
            for key, param in own.items():
                value = tensors[key]
                if value.shape != param.shape:
                    raise HyperboothError(
                        f"adapter tensor {key} has shape {tuple(value.shape)}, "
                        f"the layer needs {tuple(param.shape)}"
                    )
                param.copy_(value)

    def module_parameter_names(self) -> dict[str, tuple[str, str]]:
        """Key -> (component, parameter name inside that component's model), for functional_call."""
        names = {}
        for key, _ in self.named_parameters():
            component, _, rest = key.partition(".")
            path, _, pname = rest.rpartition(".")
            names[key] = (component, f"{path}.adapters.{self.name}.{pname}")
        return names

    # -- behaviour -----------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Trainable numbers in this adapter."""
        return sum(p.numel() for p in self.parameters())

    def set_scale(self, weight: float) -> None:
        """Set the output scale to config.scale * weight on every layer."""
        for layer in self.layers.values():
            if self.name in layer.merged:
                raise RuntimeError(f"adapter {self.name!r} is merged; unmerge before rescaling")
            layer.scales[self.name] = self.config.scale * weight

    def merge(self) -> None:
        """Fold the adapter into the base weights."""
        for layer in self.layers.values():
            layer.merge(self.name)

    def unmerge(self) -> None:
        """Take the adapter back out of the base weights."""
        for layer in self.layers.values():
            layer.unmerge(self.name)

    def remove(self) -> None:
        """Detach the adapter from every layer (unmerging first)."""
        for layer in self.layers.values():
            layer.remove(self.name)

    def materialize(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Plain LoRA factors per layer, scale folded into up, in each layer's layout (a conv's
        down is (r, in, kh, kw) and up (out, r, 1, 1)): key -> (down, up)."""
        out = {}
        with torch.no_grad():
            for key, layer in self.layers.items():
                down, up = layer.adapters[self.name].factors()
                down, up = shaped_factors(down, layer.scales[self.name] * up, layer.weight.shape)
                out[key] = (down.detach().clone(), up.detach().clone())
        return out


def add_adapter(
    base: object,
    config: AdapterConfig,
    name: str = "default",
    n_samples: int | None = None,
) -> Adapter:
    """Inject a fresh adapter into every layer the config targets; returns its handle.

    n_samples > 0 gives every layer a leading batch dimension: batch element i uses set i.
    """
    targets = target_layers(base, config)
    fingerprint = base_fingerprint(targets)
    if any(name in layer.adapters for layer in adapted_layers(base).values()):
        raise HyperboothError(
            f"the base already carries an adapter named {name!r}; remove it or use another name"
        )
    models = components(base)
    layers: dict[str, AdaptedLayer] = {}
    for key in targets:
        component, _, path = key.partition(".")
        layer = _wrap(models[component], path)
        layer.add(name, make_weights(config, key, layer.base_layer, n_samples), config.scale)
        layers[key] = layer
    return Adapter(config, name, layers, fingerprint)


def adapted_layers(base: object) -> dict[str, AdaptedLayer]:
    """Every adapted layer in the base, keyed '<component>.<path>'."""
    found = {}
    for component, model in components(base).items():
        for path, module in model.named_modules():
            if isinstance(module, AdaptedLayer):
                found[f"{component}.{path}"] = module
    return found


CROSS_ATTENTION_KV = re.compile(r"attn2\.to_[kv]$")  # they read the text tokens, not the picture


def parse_region(spec: str) -> Box:
    """A region spec (left, right, top, bottom, full, or x0,y0,x1,y1 as fractions) as a box."""
    named = {
        "full": (0.0, 0.0, 1.0, 1.0),
        "left": (0.0, 0.0, 0.5, 1.0),
        "right": (0.5, 0.0, 1.0, 1.0),
        "top": (0.0, 0.0, 1.0, 0.5),
        "bottom": (0.0, 0.5, 1.0, 1.0),
    }
    if spec in named:
        return named[spec]
    try:
        x0, y0, x1, y1 = (float(v) for v in spec.split(","))
    except ValueError:
        raise HyperboothError(
            f"region {spec!r}: give left, right, top, bottom, full or x0,y0,x1,y1 in [0, 1]"
        ) from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise HyperboothError(f"region {spec!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return (x0, y0, x1, y1)


def _record_sample_size(unet: nn.Module, args: tuple, kwargs: dict) -> None:
    """UNet forward pre-hook: tell its regional layers the input's (H, W)."""
    sample = args[0] if args else kwargs["sample"]
    for module in unet.modules():
        if isinstance(module, AdaptedLayer) and module.regions:
            module.sample_size = tuple(sample.shape[-2:])


def set_region(base: object, adapters: list[Adapter], box: Box | None) -> None:
    """Keep the adapters' UNet contributions inside a box of the picture (None: everywhere).

    Layers without a spatial output (cross-attention K/V, which read the text; time
    embeddings; the text encoder) still act everywhere.
    """
    for adapter in adapters:
        for key, layer in adapter.layers.items():
            if not key.startswith("unet.") or CROSS_ATTENTION_KV.search(key):
                continue
            if box is None:
                layer.regions.pop(adapter.name, None)
            elif adapter.name in layer.merged:
                raise HyperboothError(
                    f"adapter {adapter.name!r} is merged; a region needs it unmerged"
                )
            else:
                layer.regions[adapter.name] = box
    if box is not None and not hasattr(base.unet, "_hyperbooth_region_hook"):
        hook = base.unet.register_forward_pre_hook(_record_sample_size, with_kwargs=True)
        base.unet._hyperbooth_region_hook = hook


class disable_adapters:
    """Context manager: run the base as if no (unmerged) adapter were attached."""

    def __init__(self, base: object) -> None:
        self.layers = list(adapted_layers(base).values())

    def __enter__(self) -> None:
        for layer in self.layers:
            layer.disabled = True

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.disabled = False


def _unet_layers(base: object) -> list[AdaptedLayer]:
    """The base's adapted UNet layers (text-encoder adapters excluded)."""
    return [layer for key, layer in adapted_layers(base).items() if key.startswith("unet.")]


def _call_timestep(args: tuple, kwargs: dict) -> float:
    """The timestep of a UNet call (the first element's, for a batch of timesteps)."""
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return float(torch.as_tensor(timestep).flatten()[0])


class switch_adapters:
    """Context manager: the UNet's adapters act only at timesteps below `below`.

    The first, noisiest sampling steps then run on the bare base, so the prompt alone lays out
    the picture (background, style, framing) and the subject's adapter draws it in afterwards.
    Text-encoder adapters stay on. Works for any pipeline: a forward pre-hook on the UNet reads
    each call's timestep.
    """

    def __init__(self, base: object, below: int | None) -> None:
        self.unet = base.unet
        self.below = below
        self.layers = _unet_layers(base)
        if below is not None and below < 0:
            raise HyperboothError(f"--adapter-below must be a timestep >= 0, got {below}")
        if below is not None and any(layer.merged for layer in self.layers):
            raise HyperboothError(
                "a merged adapter cannot be switched on at a timestep; load it unmerged"
            )
        self.handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Disable the adapters when this call's timestep is at or above `below`."""
        off = _call_timestep(args, kwargs) >= self.below
        for layer in self.layers:
            layer.disabled = off

    def __enter__(self) -> switch_adapters:
        if self.below is not None and self.layers:
            self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        for layer in self.layers:
            layer.disabled = False


def _halve(value: object, batch: int) -> object:
    """The second half of every tensor (in dicts too) whose first dimension is `batch`."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[batch // 2 :]
    if isinstance(value, dict):
        return {key: _halve(item, batch) for key, item in value.items()}
    return value


class subject_guidance:
    """Context manager: the bare base follows the prompt, the UNet's adapters add only the subject.

    A classifier-free-guided UNet call sees [unconditional; conditional]. Both halves run on the
    bare base (e_u, e_c) and the conditional half once more with the adapters on (e_s); the
    conditional output becomes e_c + (scale / guidance) (e_s - e_c), so the pipeline's own
    guidance step yields e_u + guidance (e_c - e_u) + scale (e_s - e_c). The prompt's pull comes
    from the base alone, the subject's from the adapters' difference. One more UNet pass per
    step; text-encoder adapters (and new words) stay on in both. With `below`, the subject is
    added only at timesteps below it: the bare base alone lays out the first steps.
    """

    def __init__(
        self, base: object, scale: float | None, guidance: float, below: int | None = None
    ) -> None:
        self.unet = base.unet
        self.scale = scale
        self.guidance = guidance
        self.below = below
        self.layers = _unet_layers(base)
        if scale is not None and scale < 0:
            raise HyperboothError(f"--subject-guidance must be >= 0, got {scale}")
        if below is not None and below < 0:
            raise HyperboothError(f"--adapter-below must be a timestep >= 0, got {below}")
        if scale is not None and guidance <= 1:
            raise HyperboothError(
                f"--subject-guidance needs classifier-free guidance above 1 (--guidance), "
                f"got {guidance}"
            )
        if scale is not None and any(layer.merged for layer in self.layers):
            raise HyperboothError("--subject-guidance needs the adapters unmerged; load them so")
        self.handles: list = []
        self.inside = False

    def _disable(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The guided call itself runs on the bare base."""
        if not self.inside:
            for layer in self.layers:
                layer.disabled = True

    def _add_subject(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        """Rerun the conditional half with the adapters on and blend it into the output."""
        if self.inside:
            return output
        if self.below is not None and _call_timestep(args, kwargs) >= self.below:
            return output
        sample = args[0] if args else kwargs["sample"]
        batch = sample.shape[0]
        if batch % 2:
            raise HyperboothError("--subject-guidance needs a guided batch [unconditional; prompt]")
        half_args = tuple(_halve(value, batch) for value in args)
        half_kwargs = {key: _halve(value, batch) for key, value in kwargs.items()}
        for layer in self.layers:
            layer.disabled = False
        self.inside = True
        try:
            subject = module(*half_args, **half_kwargs)
        finally:
            self.inside = False
        subject = subject[0] if isinstance(subject, tuple) else subject.sample
        guided = output[0] if isinstance(output, tuple) else output.sample
        conditional = guided[batch // 2 :]
        blended = conditional + (self.scale / self.guidance) * (subject - conditional)
        guided = torch.cat([guided[: batch // 2], blended])
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output

    def __enter__(self) -> subject_guidance:
        if self.scale is not None and self.layers:
            self.handles = [
                self.unet.register_forward_pre_hook(self._disable, with_kwargs=True),
                self.unet.register_forward_hook(self._add_subject, with_kwargs=True),
            ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for layer in self.layers:
            layer.disabled = False
