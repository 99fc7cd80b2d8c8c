"""Shared fixtures: a fresh tiny-random base per test (deep-copied from one load)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("HYPERBOOTH_TEST_THREADS", "1")))

_CACHE: dict = {}


@pytest.fixture
def tiny_base():
    """A tiny randomly initialised SD, fresh for every test."""
    from hyperbooth.bases import load_base

    if "tiny" not in _CACHE:
        _CACHE["tiny"] = load_base("tiny-random")
    return copy.deepcopy(_CACHE["tiny"])


def randomize(adapter, seed: int = 0, scale: float = 0.05) -> None:
    """Give every adapter tensor random values (fresh adapters are a no-op by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def unet_inputs(base, batch: int = 2, seed: int = 0):
    """Deterministic UNet inputs (latents, timesteps, encoder states) for the base."""
    g = torch.Generator().manual_seed(seed)
    size = base.unet.config.sample_size
    latents = torch.randn(batch, base.unet.config.in_channels, size, size, generator=g)
    hidden = torch.randn(batch, 77, base.unet.config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    return latents, timesteps, hidden


def outputs(base, batch: int = 2, seed: int = 0):
    """(UNet output, text-encoder output) on fixed inputs."""
    latents, timesteps, hidden = unet_inputs(base, batch, seed)
    ids = base.tokenizer(
        ["a sks face"] * batch, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return base.unet(latents, timesteps, hidden).sample, base.text_encoder(ids)[0]
