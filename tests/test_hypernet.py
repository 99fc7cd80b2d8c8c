"""The hypernetwork: shapes and keys, near-zero start, save/load, encoders, training and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTModel

from hyperbooth.adapters.inject import add_adapter, target_layers
from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.hypernet.model import HyperNetConfig, HyperNetwork, load_hypernet, save_hypernet
from hyperbooth.hypernet.train import HyperLossConfig
from test_precompute import SMALL, _faces

TINY_HYPER = {"image_size": 32, "encoder_width": 32, "encoder_layers": 1, "width": 32, "heads": 2}


def _hypernet(base, **overrides) -> HyperNetwork:
    torch.manual_seed(0)
    config = HyperNetConfig(adapter=SMALL, **{**TINY_HYPER, **overrides})
    layers = {k: tuple(m.weight.shape) for k, m in target_layers(base, SMALL).items()}
    return HyperNetwork(config, layers)


def test_predictions_are_keyed_and_shaped_like_the_adapter_and_start_near_zero(tiny_base):
    hypernet = _hypernet(tiny_base)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    predicted = hypernet(images)
    adapter = add_adapter(tiny_base, SMALL, n_samples=3)
    own = dict(adapter.named_parameters())
    assert predicted.keys() == own.keys()
    assert all(predicted[k].shape == own[k].shape for k in own)
    assert max(v.abs().max().item() for v in predicted.values()) < 0.05
    # The tensors load straight into a per-sample adapter.
    adapter.load_state_dict({k: v.detach() for k, v in predicted.items()})


def test_each_refinement_step_changes_the_tokens(tiny_base):
    hypernet = _hypernet(tiny_base, iterations=3)
    features = hypernet.encode(torch.zeros(1, 3, 32, 32))
    steps = hypernet.tokens(features)
    assert len(steps) == 3 and not torch.equal(steps[0], steps[1])
    assert len(hypernet.tokens(features, iterations=1)) == 1


def test_save_and_load_give_the_same_predictions(tiny_base, tmp_path):
    hypernet = _hypernet(tiny_base)
    save_hypernet(hypernet, tmp_path)
    again = load_hypernet(tmp_path)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = hypernet(images), again(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(HyperboothError, match="no hypernetwork"):
        load_hypernet(tmp_path / "absent")


def test_a_pretrained_encoder_loads_by_path_stays_frozen_and_is_not_copied(tiny_base, tmp_path):
    small = ViTConfig(
        image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1, num_attention_heads=2
    )
    vit = ViTModel(small, add_pooling_layer=False)
    vit.save_pretrained(tmp_path / "vit")
    hypernet = _hypernet(tiny_base, encoder=str(tmp_path / "vit"))
    assert not hypernet.trains_encoder()
    assert all(not p.requires_grad for p in hypernet.encoder.parameters())
    save_hypernet(hypernet, tmp_path / "h")
    stored = load_file(str(tmp_path / "h" / "hypernet.safetensors"))
    assert not any(k.startswith("encoder.") for k in stored)
    again = load_hypernet(tmp_path / "h")
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out_a, out_b = hypernet(images), again(images)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    with pytest.raises(HyperboothError, match="image encoder"):
        _hypernet(tiny_base, encoder=str(tmp_path / "nothing-here"))


def test_loss_weights_are_checked():
    HyperLossConfig(alpha=1.0, beta=0.0)
    with pytest.raises(HyperboothError):
        HyperLossConfig(alpha=0.0, beta=0.0)


def _train(tmp_path, out: str, steps: int, *extra: str) -> int:
    return cli(
        [
            "train-hypernet", "--base", "tiny-random", "--device", "cpu",
            "--images", str(tmp_path / "faces"), "--precomputed", str(tmp_path / "pre"),
            "--out", str(tmp_path / out), "--steps", str(steps), "--batch-size", "2",
            "--width", "32", "--iterations", "2", "--lr", "1e-3", *extra,
        ]
    )  # fmt: skip


def test_train_hypernet_runs_and_resumes_exactly(tmp_path):
    _faces(tmp_path / "faces", 3)
    assert cli(
        ["precompute", "--base", "tiny-random", "--device", "cpu", "--images",
         str(tmp_path / "faces"), "--out", str(tmp_path / "pre"), "--steps", "2",
         "--lidb-a", "16", "--lidb-b", "8"]
    ) == 0  # fmt: skip
    assert _train(tmp_path, "full", 4) == 0
    assert _train(tmp_path, "split", 2, "--checkpoint-every", "2") == 0
    assert _train(tmp_path, "split", 4, "--checkpoint-every", "2", "--resume") == 0
    full = load_file(str(tmp_path / "full" / "hypernet" / "hypernet.safetensors"))
    split = load_file(str(tmp_path / "split" / "hypernet" / "hypernet.safetensors"))
    assert full.keys() == split.keys()
    assert all(torch.equal(full[k], split[k]) for k in full)
