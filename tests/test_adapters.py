"""Property matrix for weight-space adapters on tiny-random, plus reference equivalences."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch

from conftest import outputs, randomize, unet_inputs
from hyperbooth.adapters.config import DEFAULT_UNET_TARGETS, AdapterConfig
from hyperbooth.adapters.files import load_adapter, read_adapter, save_adapter
from hyperbooth.adapters.inject import add_adapter, disable_adapters
from hyperbooth.adapters.layers import orthogonal_rows
from hyperbooth.errors import HyperboothError

CONV_TARGETS = (
    *DEFAULT_UNET_TARGETS,
    r".*resnets\.\d+\.conv[12]",
    r".*downsamplers\.0\.conv",
    r".*attentions\.\d+\.proj_(in|out)",
)
CONFIGS = {
    "lora-r1": AdapterConfig(kind="lora", rank=1),
    "lora-r4-alpha": AdapterConfig(kind="lora", rank=4, alpha=2.0),
    "lidb": AdapterConfig(kind="lidb", rank=1, lidb_a=16, lidb_b=8, seed=3),
    "lidb-r2": AdapterConfig(kind="lidb", rank=2, lidb_a=100, lidb_b=50, seed=7),
    # Convolutions too: the ResNet convs, the 3x3 downsampler and the 1x1 proj_in/out of
    # tiny-random's transformers (which use_linear_projection=False makes Conv2d).
    "lora-r2-conv": AdapterConfig(kind="lora", rank=2, unet_targets=CONV_TARGETS),
    "lidb-conv": AdapterConfig(kind="lidb", lidb_a=16, lidb_b=8, seed=5, unet_targets=CONV_TARGETS),
}
matrix = pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())


@matrix
def test_save_load_round_trip_is_bit_exact(tiny_base, config, tmp_path):
    import copy

    fresh = copy.deepcopy(tiny_base)
    adapter = add_adapter(tiny_base, config)
    randomize(adapter)
    save_adapter(adapter, tmp_path / "a.safetensors", base_name="tiny-random")
    loaded = load_adapter(tmp_path / "a.safetensors", fresh)
    for (k1, v1), (k2, v2) in zip(
        adapter.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    for a, b in zip(outputs(tiny_base), outputs(fresh), strict=True):
        assert torch.equal(a, b)
    assert read_adapter(tmp_path / "a.safetensors").config == config


@matrix
def test_merged_equals_unmerged(tiny_base, config):
    adapter = add_adapter(tiny_base, config)
    randomize(adapter)
    before = outputs(tiny_base)
    adapter.merge()
    merged = outputs(tiny_base)
    adapter.unmerge()
    after = outputs(tiny_base)
    for a, b, c in zip(before, merged, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


@matrix
def test_disabled_adapter_gives_base_output(tiny_base, config):
    base_out = outputs(tiny_base)
    adapter = add_adapter(tiny_base, config)
    randomize(adapter)
    adapted = outputs(tiny_base)
    assert not torch.allclose(adapted[0], base_out[0])
    assert not torch.allclose(adapted[1], base_out[1])
    with disable_adapters(tiny_base):
        disabled = outputs(tiny_base)
    for a, b in zip(base_out, disabled, strict=True):
        assert torch.equal(a, b)


@matrix
def test_only_adapter_parameters_require_grad(tiny_base, config):
    adapter = add_adapter(tiny_base, config)
    own = {id(p) for p in adapter.parameters()}
    for model in (tiny_base.unet, tiny_base.text_encoder, tiny_base.vae):
        for name, p in model.named_parameters():
            assert p.requires_grad == (id(p) in own), name
    assert len(own) == 2 * len(adapter.layers)


@matrix
def test_per_sample_batch_equals_each_adapter_alone(tiny_base, config):
    import copy

    single = copy.deepcopy(tiny_base)
    batched = add_adapter(tiny_base, config, n_samples=2)
    randomize(batched, seed=1)
    latents, timesteps, hidden = unet_inputs(tiny_base, batch=2)
    with torch.no_grad():
        together = tiny_base.unet(latents, timesteps, hidden).sample
    alone = add_adapter(single, config)
    for i in range(2):
        alone.load_state_dict({k: v[i] for k, v in batched.state_dict().items()})
        with torch.no_grad():
            out = single.unet(latents[i : i + 1], timesteps[i : i + 1], hidden[i : i + 1]).sample
        torch.testing.assert_close(together[i : i + 1], out, atol=1e-5, rtol=1e-4)


def test_lidb_equals_the_lora_it_materialises_to(tiny_base):
    import copy

    other = copy.deepcopy(tiny_base)
    lidb = add_adapter(tiny_base, CONFIGS["lidb"])
    randomize(lidb)
    lora = add_adapter(other, AdapterConfig(kind="lora", rank=1))
    factors = lidb.materialize()
    lora.load_state_dict(
        {f"{k}.lora_{n}": t for k, (d, u) in factors.items() for n, t in (("down", d), ("up", u))}
    )
    for a, b in zip(outputs(tiny_base), outputs(other), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lora_delta_equals_peft(tiny_base):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    config = AdapterConfig(kind="lora", rank=4, alpha=8.0)
    adapter = add_adapter(tiny_base, config)
    randomize(adapter, scale=0.3)
    key, layer = next(iter(adapter.layers.items()))
    down, up = layer.adapters["default"].factors()
    peft_layer = PeftLinear(
        torch.nn.Linear(layer.in_features, layer.out_features),
        "x",
        config=LoraConfig(r=4, lora_alpha=8),
        r=4,
        lora_alpha=8,
    )
    with torch.no_grad():
        peft_layer.lora_A["x"].weight.copy_(down)
        peft_layer.lora_B["x"].weight.copy_(up)
    ours = layer.scales["default"] * layer.adapters["default"].delta_weight()
    torch.testing.assert_close(ours, peft_layer.get_delta_weight("x"), atol=1e-7, rtol=1e-6)


def test_aux_bases_are_orthogonal_and_reproducible_in_another_process():
    rows = orthogonal_rows(100, 320, seed=123)
    torch.testing.assert_close(rows @ rows.T, torch.eye(100), atol=1e-5, rtol=0)
    code = (
        "import torch,sys;from hyperbooth.adapters.layers import orthogonal_rows;"
        "sys.stdout.write(orthogonal_rows(100, 320, seed=123).numpy().tobytes().hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout == rows.numpy().tobytes().hex()


def test_aux_bases_come_from_a_cache_as_copies_a_caller_cannot_spoil():
    first = orthogonal_rows(50, 96, seed=7)
    expected = first.clone()
    first.zero_()  # a caller writing into its copy must not reach the next caller's
    again = orthogonal_rows(50, 96, seed=7)
    assert torch.equal(again, expected) and again.data_ptr() != first.data_ptr()


def test_sd15_arch_counts_match_the_paper():
    from hyperbooth.bases import load_base

    base = load_base("sd15-arch", meta=True)
    lidb = add_adapter(base, AdapterConfig(kind="lidb"), name="lidb")
    assert (len(lidb.layers), lidb.num_parameters()) == (200, 30_000)


def test_adapter_for_another_base_is_a_one_line_error(tiny_base, tmp_path):
    from hyperbooth.bases import load_base

    adapter = add_adapter(load_base("sd15-arch", meta=True), AdapterConfig(kind="lora"))
    adapter_path = tmp_path / "sd15.safetensors"
    with torch.device("cpu"):
        tensors = {k: torch.zeros(v.shape) for k, v in adapter.state_dict().items()}
    from hyperbooth.adapters.files import METADATA_KEY, atomic_save_safetensors

    meta = {
        "format": "hyperbooth.adapter/1",
        "config": __import__("json").loads(adapter.config.to_json()),
        "base_fingerprint": adapter.fingerprint,
        "base_name": "sd15-arch",
    }
    atomic_save_safetensors(tensors, adapter_path, {METADATA_KEY: __import__("json").dumps(meta)})
    with pytest.raises(HyperboothError) as err:
        load_adapter(adapter_path, tiny_base)
    assert "\n" not in str(err.value) and "sd15-arch" in str(err.value)


def test_damaged_or_newer_adapter_metadata_is_a_one_line_error(tmp_path):
    import json

    from hyperbooth.adapters.files import METADATA_KEY, atomic_save_safetensors, read_adapter

    good = {"format": "hyperbooth.adapter/1", "config": {"kind": "lora"}, "base_fingerprint": "x"}
    for name, meta, match in (
        ("json", "{not json", "metadata is damaged"),
        ("newer", json.dumps({**good, "config": {"kind": "lora", "new_knob": 1}}), "newer"),
        ("short", json.dumps({k: v for k, v in good.items() if k != "base_fingerprint"}),
         "missing 'base_fingerprint'"),
    ):  # fmt: skip
        path = tmp_path / f"{name}.safetensors"
        atomic_save_safetensors({"x": torch.zeros(1)}, path, {METADATA_KEY: meta})
        with pytest.raises(HyperboothError, match=match):
            read_adapter(path)
    cd = tmp_path / "cd.safetensors"
    atomic_save_safetensors(
        {"x": torch.zeros(1)},
        cd,
        {METADATA_KEY: json.dumps({"format": "hyperbooth.custom-diffusion/1"})},
    )
    with pytest.raises(HyperboothError, match="through --custom-diffusion"):
        read_adapter(cd)
    with pytest.raises(HyperboothError, match="is a folder, not an adapter file"):
        read_adapter(tmp_path)


def test_pattern_matching_nothing_is_a_one_line_error(tiny_base):
    with pytest.raises(HyperboothError, match="matches no nn.Linear"):
        add_adapter(tiny_base, AdapterConfig(unet_targets=(r".*nonexistent",)))


@matrix
def test_file_materialises_without_the_base(tiny_base, config, tmp_path):
    adapter = add_adapter(tiny_base, config)
    randomize(adapter)
    save_adapter(adapter, tmp_path / "a.safetensors")
    standalone = read_adapter(tmp_path / "a.safetensors").materialize()
    for key, (down, up) in adapter.materialize().items():
        assert torch.equal(standalone[key][0], down) and torch.equal(standalone[key][1], up)


def _unet_at(base, timestep: int) -> torch.Tensor:
    """The UNet's output on fixed inputs, every element at one timestep."""
    latents, _, hidden = unet_inputs(base)
    with torch.no_grad():
        return base.unet(latents, torch.tensor([timestep, timestep]), hidden).sample


def test_switched_adapters_act_only_below_the_switch_timestep(tiny_base):
    from hyperbooth.adapters.inject import switch_adapters

    bare = {t: _unet_at(tiny_base, t) for t in (100, 700, 900)}
    adapter = add_adapter(tiny_base, CONFIGS["lora-r2-conv"])
    randomize(adapter)
    adapted = {t: _unet_at(tiny_base, t) for t in bare}
    text_on = outputs(tiny_base)[1]
    with switch_adapters(tiny_base, below=800):
        switched = {t: _unet_at(tiny_base, t) for t in (900, 100, 700, 900)}
        text_switched = outputs(tiny_base)[1]
    assert torch.equal(switched[900], bare[900])  # at or above the switch: the bare base
    for t in (100, 700):
        assert torch.equal(switched[t], adapted[t])
        assert not torch.allclose(adapted[t], bare[t])
    assert torch.equal(text_switched, text_on)  # text-encoder adapters stay on
    # The hook is gone and the adapters are back on afterwards.
    assert torch.equal(_unet_at(tiny_base, 900), adapted[900])
    assert not tiny_base.unet._forward_pre_hooks


def test_switch_refuses_merged_adapters(tiny_base):
    from hyperbooth.adapters.inject import switch_adapters

    adapter = add_adapter(tiny_base, CONFIGS["lora-r1"])
    adapter.merge()
    with pytest.raises(HyperboothError, match="merged"):
        switch_adapters(tiny_base, below=800)
    switch_adapters(tiny_base, below=None)  # no switch asked for: nothing to refuse
    with pytest.raises(HyperboothError, match="adapter-below must be a timestep >= 0"):
        switch_adapters(tiny_base, below=-1)


@pytest.mark.parametrize("return_dict", [True, False])
def test_subject_guidance_blends_the_adapted_prompt_half_into_the_bare_base(tiny_base, return_dict):
    from hyperbooth.adapters.inject import subject_guidance

    latents, _, hidden = unet_inputs(tiny_base)  # [unconditional; prompt] halves
    t = torch.tensor(500)
    adapter = add_adapter(tiny_base, CONFIGS["lora-r2-conv"])
    randomize(adapter)
    with torch.no_grad():
        with disable_adapters(tiny_base):
            bare = tiny_base.unet(latents, t, hidden).sample
        subject = tiny_base.unet(latents[1:], t, hidden[1:]).sample
        with subject_guidance(tiny_base, scale=3.0, guidance=7.5):
            out = tiny_base.unet(latents, t, hidden, return_dict=return_dict)
            out = out.sample if return_dict else out[0]
    assert not torch.allclose(subject, bare[1:])
    assert torch.equal(out[:1], bare[:1])  # the unconditional half: the bare base
    expected = bare[1:] + (3.0 / 7.5) * (subject - bare[1:])
    torch.testing.assert_close(out[1:], expected, rtol=1e-5, atol=1e-6)
    # Switched on only below a timestep: at or above it, the bare base alone.
    with torch.no_grad(), subject_guidance(tiny_base, scale=3.0, guidance=7.5, below=500):
        assert torch.equal(tiny_base.unet(latents, t, hidden).sample, bare)
    # The hooks are gone and the adapters are back on afterwards.
    assert not tiny_base.unet._forward_pre_hooks and not tiny_base.unet._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(tiny_base.unet(latents[1:], t, hidden[1:]).sample, subject)


def test_subject_guidance_at_zero_draws_the_bare_base_and_bad_settings_are_errors(tiny_base):
    from hyperbooth.adapters.inject import subject_guidance
    from hyperbooth.generate import generate_images

    # UNet only: text-encoder adapters stay on under subject guidance, and disable_adapters
    # would switch them off too
    unet_only = dataclasses.replace(CONFIGS["lora-r2-conv"], text_encoder_targets=())
    adapter = add_adapter(tiny_base, unet_only)
    randomize(adapter, scale=0.5)
    sample = {"n": 1, "steps": 2, "progress": False}
    with disable_adapters(tiny_base):
        bare = generate_images(tiny_base, ["a face"], **sample)[0][0]
    adapted = generate_images(tiny_base, ["a face"], **sample)[0][0]
    zero = generate_images(tiny_base, ["a face"], subject_scale=0.0, **sample)[0][0]
    assert zero.tobytes() == bare.tobytes() != adapted.tobytes()
    with pytest.raises(HyperboothError, match="guidance above 1"):
        subject_guidance(tiny_base, scale=1.0, guidance=1.0)
    with pytest.raises(HyperboothError, match="adapter-below must be a timestep >= 0"):
        generate_images(tiny_base, ["a face"], adapter_below=-1, subject_scale=1.0, **sample)
    adapter.merge()
    with pytest.raises(HyperboothError, match="unmerged"):
        subject_guidance(tiny_base, scale=1.0, guidance=7.5)


def test_box_mask_is_the_share_of_each_cell_the_box_covers():
    from hyperbooth.adapters.layers import box_mask

    left = box_mask((0.0, 0.0, 0.5, 1.0), 2, 4)
    assert torch.equal(left, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]]))
    assert torch.allclose(box_mask((0.25, 0.0, 0.75, 1.0), 1, 2), torch.tensor([[0.5, 0.5]]))
    inner = box_mask((0.1, 0.2, 0.7, 0.9), 5, 7)
    assert inner.shape == (5, 7) and float(inner.sum()) == pytest.approx(0.6 * 0.7 * 35)


def _first_layer(adapter, kind: type):
    """The adapter's first layer of a class, with its key."""
    return next((k, layer) for k, layer in adapter.layers.items() if isinstance(layer, kind))


def test_a_regional_adapter_acts_only_inside_its_box(tiny_base):
    from hyperbooth.adapters.layers import AdaptedConv2d, AdaptedLinear

    adapter = add_adapter(tiny_base, CONFIGS["lora-r2-conv"])
    randomize(adapter, scale=0.5)
    _, conv = _first_layer(adapter, AdaptedConv2d)
    x = torch.randn(1, conv.base_layer.in_channels, 8, 8)
    with torch.no_grad():
        bare, adapted = conv.base_layer(x), conv(x)
        conv.regions[adapter.name] = (0.0, 0.0, 0.5, 1.0)  # the left half
        regional = conv(x)
    assert torch.equal(regional[..., :4], adapted[..., :4])
    assert torch.equal(regional[..., 4:], bare[..., 4:])
    assert not torch.allclose(adapted[..., 4:], bare[..., 4:])

    # Tokens of a transformer block: (B, H*W, C) on the grid of a 16x8 (H x W) input, 4x downsampled.
    key, linear = _first_layer(adapter, AdaptedLinear)
    assert "to_k" not in key and "to_v" not in key
    tokens = torch.randn(1, 8, linear.in_features)  # a 4 x 2 grid
    linear.sample_size = (16, 8)
    linear.regions[adapter.name] = (0.5, 0.0, 1.0, 1.0)  # the right column
    with torch.no_grad():
        bare, regional = linear.base_layer(tokens), linear(tokens)
        linear.regions.clear()
        adapted = linear(tokens)
    right = torch.tensor([False, True] * 4)
    assert torch.equal(regional[:, right], adapted[:, right])
    assert torch.equal(regional[:, ~right], bare[:, ~right])
    linear.regions[adapter.name] = (0.5, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="not a grid"):
        linear(torch.randn(1, 7, linear.in_features))


def test_set_region_covers_the_unets_spatial_layers_and_full_changes_nothing(tiny_base):
    from hyperbooth.adapters.inject import parse_region, set_region

    adapter = add_adapter(tiny_base, CONFIGS["lora-r2-conv"])
    randomize(adapter, scale=0.5)
    adapted = outputs(tiny_base)
    set_region(tiny_base, [adapter], parse_region("full"))
    assert torch.equal(outputs(tiny_base)[0], adapted[0])  # a mask of ones is exact
    regional = {key for key, layer in adapter.layers.items() if adapter.name in layer.regions}
    assert regional and all(key.startswith("unet.") for key in regional)
    assert not any("attn2.to_k" in key or "attn2.to_v" in key for key in regional)
    assert {key for key in adapter.layers if key.startswith("unet.")} - regional  # cross K/V
    set_region(tiny_base, [adapter], parse_region("left"))
    left = outputs(tiny_base)
    assert not torch.allclose(left[0], adapted[0])
    assert torch.equal(left[1], adapted[1])  # the text encoder is not regional
    with pytest.raises(ValueError, match="region"):
        adapter.merge()
    set_region(tiny_base, [adapter], None)
    assert torch.equal(outputs(tiny_base)[0], adapted[0])
    assert parse_region("0,0.25,1,0.75") == (0.0, 0.25, 1.0, 0.75)
    for bad in ("middle", "0,0,2,1", "0.5,0,0.5,1"):
        with pytest.raises(HyperboothError, match="region"):
            parse_region(bad)


def test_weights_fingerprint_follows_the_weights_not_their_dtype():
    from hyperbooth.adapters.inject import weights_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Conv2d(3, 2, 1)).half().float()
    before = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model).half()) == before
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] += 0.5
    assert weights_fingerprint(model) != before


def test_weights_fingerprint_ignores_adapters_and_their_wrappers(tiny_base):
    from hyperbooth.adapters.inject import weights_fingerprint

    before = weights_fingerprint(tiny_base.unet)
    adapter = add_adapter(tiny_base, AdapterConfig(kind="lora", rank=2), n_samples=2)
    assert weights_fingerprint(tiny_base.unet) == before  # wrapped, adapter tensors present
    adapter.remove()  # the wrappers stay, empty
    assert weights_fingerprint(tiny_base.unet) == before
