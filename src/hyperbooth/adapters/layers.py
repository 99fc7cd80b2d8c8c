"""Adapter weights and the wrappers that add them to a frozen nn.Linear or nn.Conv2d.

Every weight-space adapter reduces to low-rank factors ``down`` (r x in) and ``up`` (out x r),
so ``delta W = up @ down``; a Conv2d is the matrix (out, in * kh * kw). A leading batch dimension on the factors is the per-sample path:
element i of the input batch uses factors[i] (pre-optimising many identities at once, the
hypernetwork's predictions).
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from hyperbooth.adapters.config import AdapterConfig


def layer_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one layer's aux bases, from the adapter seed and the layer key."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def orthogonal_rows(n_rows: int, n_cols: int, seed: int) -> torch.Tensor:
    """Random rows of unit norm, mutually orthogonal when n_rows <= n_cols; float32 on CPU.

    Generated on the CPU in float64 from a private generator, so the same seed gives the same
    bits in any process and for any target device (move the result afterwards). Recent results
    are cached per process (a service predicting many subjects regenerates the same bases), and
    every call returns its own copy.
    """
    return _orthogonal_rows(n_rows, n_cols, seed).clone()


@functools.lru_cache(maxsize=512)  # SD1.5's default LiDB layer set needs 400
def _orthogonal_rows(n_rows: int, n_cols: int, seed: int) -> torch.Tensor:
    """orthogonal_rows, uncached; callers must not modify the result."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float64)
    if n_rows <= n_cols:
        q, r = torch.linalg.qr(gaussian.T)  # (n_cols, n_rows), orthonormal columns
        rows = (q * torch.sign(torch.diagonal(r))).T  # sign fix makes the factorisation unique
    else:
        # More rows than dimensions (only in tiny test models): orthogonality is impossible,
        # keep unit-norm random rows.
        rows = gaussian / gaussian.norm(dim=1, keepdim=True)
    return rows.to(torch.float32).contiguous()


class AdapterWeights(nn.Module):
    """Base class: trainable tensors that yield low-rank factors (down, up) for one layer."""

    n_samples: int | None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (down, up): (r, in) and (out, r), or (B, r, in) and (B, out, r) per sample."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The dense weight change up @ down: (out, in), or (B, out, in) per sample."""
        down, up = self.factors()
        return up @ down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the layer output for input x (..., in)."""
        down, up = self.factors()
        if down.dim() == 2:
            return F.linear(F.linear(x, down), up)
        batch = down.shape[0]
        if x.shape[0] != batch:
            raise ValueError(
                f"per-sample adapter holds {batch} weight sets but the input batch is {x.shape[0]}"
            )
        flat = x.reshape(batch, -1, x.shape[-1])  # (B, tokens, in)
        hidden = torch.bmm(flat, down.transpose(1, 2))  # (B, tokens, r)
        out = torch.bmm(hidden, up.transpose(1, 2))  # (B, tokens, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class LoRAWeights(AdapterWeights):
    """Plain LoRA: both factors train; up starts at zero so the adapter starts as a no-op."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        seed: int,
        n_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.n_samples = n_samples
        lead = (n_samples,) if n_samples else ()
        # peft's initialisation (kaiming-uniform down, zero up), drawn from the layer's own seed
        # so that a run is reproducible whatever the global RNG state.
        # Every per-sample set starts where a single adapter would: fitting K subjects at once
        # is then the same as fitting each alone.
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)
        down = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        self.lora_down = nn.Parameter(down.repeat(*lead, 1, 1))
        self.lora_up = nn.Parameter(torch.zeros(*lead, out_features, rank))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (down, up) directly."""
        return self.lora_down, self.lora_up


class LiDBWeights(AdapterWeights):
    """Lightweight DreamBooth: down = A_train @ A_aux, up = B_aux @ B_train, aux bases frozen.

    A_aux (a, in) and B_aux^T (b, out) have random orthonormal rows regenerated from the seed;
    they are buffers that are never saved (the seed is).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        a: int,
        b: int,
        seed: int,
        n_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.n_samples = n_samples
        lead = (n_samples,) if n_samples else ()
        self.register_buffer("lidb_a_aux", orthogonal_rows(a, in_features, seed), persistent=False)
        self.register_buffer(
            "lidb_b_aux",
            orthogonal_rows(b, out_features, seed + 1).T.contiguous(),
            persistent=False,
        )
        # Unit-norm aux rows: A_train ~ N(0, 1/a) gives down rows of norm ~1; B_train = 0 so the
        # adapter starts as a no-op.
        generator = torch.Generator().manual_seed(seed + 2)
        a_train = torch.randn(rank, a, generator=generator) / math.sqrt(a)
        self.lidb_a_train = nn.Parameter(a_train.repeat(*lead, 1, 1))  # per-sample: same start
        self.lidb_b_train = nn.Parameter(torch.zeros(*lead, b, rank))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialise the rank-r factors (cheap: independent of the number of tokens)."""
        down = self.lidb_a_train @ self.lidb_a_aux  # (..., r, in)
        up = self.lidb_b_aux @ self.lidb_b_train  # (..., out, r)
        return down, up


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of a layer as a matrix: a Conv2d's input is its flattened (in, kh, kw) patch."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"grouped convolutions (groups={layer.groups}) cannot be adapted")
        return layer.weight[0].numel(), layer.out_channels
    return layer.in_features, layer.out_features


def make_weights(
    config: AdapterConfig, key: str, base: nn.Module, n_samples: int | None = None
) -> AdapterWeights:
    """Build the adapter weights of `config` for one base layer identified by `key`.

    Everything random (LiDB aux bases, initial values) derives from (config.seed, key).
    """
    in_features, out_features = layer_dims(base)
    if config.kind == "lidb":
        return LiDBWeights(
            in_features,
            out_features,
            config.rank,
            config.lidb_a,
            config.lidb_b,
            layer_seed(config.seed, key),
            n_samples,
        )
    return LoRAWeights(
        in_features, out_features, config.rank, layer_seed(config.seed, key), n_samples
    )


def shaped_factors(
    down: torch.Tensor, up: torch.Tensor, weight_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors in the layout of the layer they adapt: a conv gets (r, in, kh, kw) and (out, r, 1, 1)."""
    if len(weight_shape) == 2:
        return down, up
    return down.reshape(down.shape[0], *weight_shape[1:]), up.reshape(*up.shape, 1, 1)


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of width and height


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """(height, width): the share of each grid cell that the box covers."""

    def cover(start: float, end: float, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, dtype=torch.float32) / cells
        return ((edges[1:].clamp(start, end) - edges[:-1].clamp(start, end)) * cells).clamp(0, 1)

    x0, y0, x1, y1 = box
    return cover(y0, y1, height)[:, None] * cover(x0, x1, width)[None, :]


class AdaptedLayer(nn.Module):
    """A frozen layer plus any number of named adapters, each with its own scale.

    An adapter may also have a region (a box of the picture): on a layer whose output is a
    spatial grid its contribution is then kept only there (regional composition of subjects).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merged: list[str] = []
        self.disabled = False
        self.regions: dict[str, Box] = {}
        self.sample_size: tuple[int, int] | None = None  # the UNet input's (H, W), for tokens

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (some callers read it directly)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias."""
        return self.base_layer.bias

    def add(self, name: str, weights: AdapterWeights, scale: float) -> None:
        """Attach adapter weights under a name."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already attached to this layer")
        self.adapters[name] = weights.to(self.base_layer.weight.device)
        self.scales[name] = scale

    def remove(self, name: str) -> None:
        """Detach an adapter (unmerging it first if merged)."""
        if name in self.merged:
            self.unmerge(name)
        del self.adapters[name]
        del self.scales[name]
        self.regions.pop(name, None)

    def _delta(self, name: str) -> torch.Tensor:
        """The scaled weight change of one adapter, in the base weight's shape and dtype."""
        weights = self.adapters[name]
        if weights.n_samples:
            raise ValueError("a per-sample adapter cannot be merged into one base weight")
        delta = self.scales[name] * weights.delta_weight()
        return delta.reshape(self.base_layer.weight.shape).to(self.base_layer.weight.dtype)

    def merge(self, name: str) -> None:
        """Add the adapter's delta into the base weight; it then stops acting as a side path."""
        if name in self.merged:
            return
        if name in self.regions:
            raise ValueError(f"adapter {name!r} has a region; a merged weight acts everywhere")
        with torch.no_grad():
            self.base_layer.weight += self._delta(name)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        """Subtract a merged adapter's delta from the base weight again."""
        if name not in self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight -= self._delta(name)
        self.merged.remove(name)

    def adapter_output(self, weights: AdapterWeights, x: torch.Tensor) -> torch.Tensor:
        """One adapter's (unscaled) contribution to the layer output for input x."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus every active, unmerged adapter's scaled contribution."""
        out = self.base_layer(x)
        if self.disabled:
            if self.merged:
                raise RuntimeError("cannot disable adapters that are merged; unmerge them first")
            return out
        for name, weights in self.adapters.items():
            scale = self.scales[name]
            if name in self.merged or scale == 0:
                continue
            param = next(weights.parameters())
            # Under autocast the matmuls pick their own precision; otherwise match the adapter dtype.
            autocast = torch.is_autocast_enabled(x.device.type)
            delta = self.adapter_output(weights, x if autocast else x.to(param.dtype))
            if name in self.regions:
                delta = delta * self._region_mask(self.regions[name], delta).to(delta.dtype)
            out = out + scale * delta.to(out.dtype)
        return out

    def _region_mask(self, box: Box, delta: torch.Tensor) -> torch.Tensor:
        """The box as a mask broadcastable to delta: (B, C, H, W) maps or (B, H*W, C) tokens."""
        if delta.dim() == 4:
            return box_mask(box, *delta.shape[-2:]).to(delta.device)
        if delta.dim() == 2:  # no spatial grid (a time embedding): it acts everywhere
            return torch.ones((), device=delta.device)
        tokens = delta.shape[1]
        if delta.dim() != 3 or self.sample_size is None:
            raise ValueError("a region needs a spatial output: (B, C, H, W) or (B, H*W, C)")
        height, width = self.sample_size
        factor = math.sqrt(height * width / tokens)  # the downsampling from input to this layer
        rows, cols = round(height / factor), round(width / factor)
        if rows * cols != tokens:
            raise ValueError(f"{tokens} tokens are not a grid of a {height}x{width} input")
        return box_mask(box, rows, cols).reshape(1, tokens, 1).to(delta.device)


class AdaptedLinear(AdaptedLayer):
    """A frozen nn.Linear plus named adapters."""

    @property
    def in_features(self) -> int:
        """Input width of the wrapped layer."""
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        """Output width of the wrapped layer."""
        return self.base_layer.out_features

    def adapter_output(self, weights: AdapterWeights, x: torch.Tensor) -> torch.Tensor:
        """x through down then up."""
        return weights(x)


class AdaptedConv2d(AdaptedLayer):
    """A frozen nn.Conv2d plus named adapters: down is a conv like the base's, up a 1x1 conv."""

    def adapter_output(self, weights: AdapterWeights, x: torch.Tensor) -> torch.Tensor:
        """x through the down conv (per sample: one group per batch element), then up."""
        conv = self.base_layer
        down, up = weights.factors()
        kernel = conv.weight.shape[1:]
        options = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
        if down.dim() == 2:
            hidden = F.conv2d(x, down.reshape(down.shape[0], *kernel), **options)
            return F.conv2d(hidden, up[:, :, None, None])
        batch, rank = down.shape[:2]
        if x.shape[0] != batch:
            raise ValueError(
                f"per-sample adapter holds {batch} weight sets but the input batch is {x.shape[0]}"
            )
        grouped = x.reshape(1, -1, *x.shape[2:])  # (1, B*in, H, W): one group per element
        hidden = F.conv2d(grouped, down.reshape(batch * rank, *kernel), groups=batch, **options)
        height, width = hidden.shape[2:]
        out = torch.bmm(up, hidden.reshape(batch, rank, -1))  # (B, out, H'W')
        return out.reshape(batch, -1, height, width)


def can_adapt(layer: nn.Module) -> bool:
    """Whether a layer can carry adapters: an nn.Linear, or an ungrouped zero-padded nn.Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros"
    return isinstance(layer, nn.Linear)


def wrap_layer(layer: nn.Module) -> AdaptedLayer:
    """The adapted wrapper of a layer that can_adapt accepts."""
    return AdaptedConv2d(layer) if isinstance(layer, nn.Conv2d) else AdaptedLinear(layer)
