"""Adapter configuration: what kind of weights, what shape, and which layers they adapt."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

ADAPTER_KINDS = ("lora", "lidb")
COMPONENTS = ("unet", "text_encoder")

# METHOD 3.1: every attn1/attn2 projection of the UNet, and the text encoder's attention and MLP.
# Patterns are matched with re.fullmatch against module paths inside each component.
DEFAULT_UNET_TARGETS = (r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",)
# The ResNet convolutions of a UNet: where a small UNet such as `mini` keeps what a face looks
# like (docs/MINIWORLD.md: attention-only adapters barely move its identity score).
RESNET_CONV_TARGETS = (r".*resnets\.\d+\.conv[12]",)
DEFAULT_TEXT_ENCODER_TARGETS = (
    r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    r".*mlp\.(fc1|fc2)",
)


@dataclass(frozen=True)
class AdapterConfig:
    """A weight-space adapter: LoRA of rank r, or Lightweight DreamBooth (LiDB) with aux sizes a, b."""

    kind: str = "lora"
    rank: int = 1
    # Output scale is alpha / rank, as in LoRA; None means alpha = rank (scale 1).
    alpha: float | None = None
    # LiDB only: trainable A_train is (rank x lidb_a), B_train is (lidb_b x rank); the frozen
    # aux bases are regenerated from `seed` (METHOD 3.1: a = 100, b = 50).
    lidb_a: int = 100
    lidb_b: int = 50
    seed: int = 0
    unet_targets: tuple[str, ...] = DEFAULT_UNET_TARGETS
    text_encoder_targets: tuple[str, ...] = DEFAULT_TEXT_ENCODER_TARGETS
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.kind == "lidb" and (self.lidb_a < 1 or self.lidb_b < 1):
            raise ValueError(f"LiDB sizes must be >= 1, got a={self.lidb_a}, b={self.lidb_b}")
        if not self.unet_targets and not self.text_encoder_targets:
            raise ValueError("an adapter needs at least one target pattern")
        # Tuples survive JSON as lists; normalise so equal configs compare equal.
        object.__setattr__(self, "unet_targets", tuple(self.unet_targets))
        object.__setattr__(self, "text_encoder_targets", tuple(self.text_encoder_targets))
        for pattern in (*self.unet_targets, *self.text_encoder_targets):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad target pattern {pattern!r}: {e}") from e

    @property
    def scale(self) -> float:
        """The factor applied to the low-rank product."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def targets(self, component: str) -> tuple[str, ...]:
        """The module-path patterns for one component ("unet" or "text_encoder")."""
        return self.unet_targets if component == "unet" else self.text_encoder_targets

    def trainable_per_layer(self, in_features: int, out_features: int) -> int:
        """Trainable numbers this adapter adds to one nn.Linear of the given shape."""
        if self.kind == "lidb":
            return self.rank * (self.lidb_a + self.lidb_b)
        return self.rank * (in_features + out_features)

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> AdapterConfig:
        """Parse from a JSON string or dict, rejecting unknown fields."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown adapter config fields: {sorted(unknown)}")
        return cls(**data)
