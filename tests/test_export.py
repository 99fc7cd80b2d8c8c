"""Exported LoRA files, read by the tools they are for, reproduce our adapter's outputs."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from conftest import outputs, randomize
from hyperbooth.adapters.config import DEFAULT_UNET_TARGETS, AdapterConfig
from hyperbooth.adapters.export import export_adapter, to_diffusers, to_kohya
from hyperbooth.adapters.files import save_adapter, save_adapter_parts
from hyperbooth.adapters.inject import adapted_layers, add_adapter
from hyperbooth.errors import HyperboothError

# Attention plus the ResNet convolutions (3x3 kernels: conv LoRA layout in both formats).
CONV_TARGETS = (*DEFAULT_UNET_TARGETS, r".*resnets\.\d+\.conv[12]")
CONFIGS = {
    "lora-r1": AdapterConfig(kind="lora", rank=1),
    "lora-r4-alpha": AdapterConfig(kind="lora", rank=4, alpha=3.0),
    "lidb": AdapterConfig(kind="lidb", rank=1, lidb_a=16, lidb_b=8, seed=3),
    "lora-r2-conv": AdapterConfig(kind="lora", rank=2, unet_targets=CONV_TARGETS),
    "lidb-conv": AdapterConfig(kind="lidb", lidb_a=16, lidb_b=8, seed=5, unet_targets=CONV_TARGETS),
}
matrix = pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
# The key pattern A1111's Lora extension and ComfyUI accept for kohya sd-scripts files.
A1111_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
# Text-encoder attention without out_proj: the layer set diffusers 0.42.1's kohya importer
# mishandles (docs/EXPORT.md).
NO_OUT_PROJ = AdapterConfig(
    kind="lora",
    rank=2,
    text_encoder_targets=(r".*self_attn\.(q_proj|k_proj|v_proj)", r".*mlp\.(fc1|fc2)"),
)
ATOL = 1e-5


def _pipeline(base) -> StableDiffusionPipeline:
    """A plain diffusers pipeline around a base's parts (no hyperbooth code involved)."""
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _adapted(tiny_base, config, tmp_path):
    """Save a random adapter: (fresh base, adapter, file, base outputs, adapted outputs)."""
    fresh = copy.deepcopy(tiny_base)  # a separate copy that never sees hyperbooth layers
    base_out = outputs(tiny_base)
    adapter = add_adapter(tiny_base, config)
    randomize(adapter, seed=1)
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapter, path, base_name="tiny-random")
    return fresh, adapter, path, base_out, outputs(tiny_base)


def _assert_same_and_changed(got, adapted, base_out) -> None:
    """UNet and text-encoder outputs equal the adapted ones, and differ from the plain base."""
    for name, g, a, b in zip(("unet", "text_encoder"), got, adapted, base_out, strict=True):
        torch.testing.assert_close(g, a, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        # A silently dropped part would leave its output at the base's.
        assert (a - b).abs().max() > 100 * ATOL, f"{name}: the adapter does not change outputs"


def _peft_factors(pipe) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Every peft LoRA layer diffusers injected: '<component>.<path>' -> (A, B, scaling)."""
    found = {}
    for component in ("unet", "text_encoder"):
        for path, module in getattr(pipe, component).named_modules():
            if isinstance(module, LoraLayer):
                for name in module.lora_A:
                    found[f"{component}.{path}"] = (
                        module.lora_A[name].weight.detach(),
                        module.lora_B[name].weight.detach(),
                        module.scaling[name],
                    )
    return found


def _patch_like_comfyui(base, tensors: dict[str, torch.Tensor]) -> None:
    """Apply a kohya file the way ComfyUI and A1111 do: name -> module, W += up @ down * alpha / r.

    Independent of diffusers and of our exporter: names come from the model's own module list
    (ComfyUI builds its key map the same way) and every file entry must find its module.
    """
    modules = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for path, module in getattr(base, component).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                modules[prefix + path.replace(".", "_")] = module
    names = {key.split(".")[0] for key in tensors}
    assert len(tensors) == 3 * len(names), "every layer needs lora_down, lora_up and alpha"
    with torch.no_grad():
        for name in names:
            assert name in modules, f"{name} names no module of the base"
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            alpha = tensors[f"{name}.alpha"].item()
            weight = modules[name].weight
            weight += (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / len(down))


@matrix
def test_diffusers_export_loads_in_diffusers(tiny_base, config, tmp_path):
    fresh, adapter, path, base_out, adapted = _adapted(tiny_base, config, tmp_path)
    written = export_adapter(path, "diffusers", tmp_path / "exported", tiny_base)
    assert written == tmp_path / "exported" / "pytorch_lora_weights.safetensors"
    # The export's own load is removed again: the base still gives the adapter's outputs.
    assert all(set(layer.adapters) == {"default"} for layer in adapted_layers(tiny_base).values())

    pipe = _pipeline(fresh)
    pipe.load_lora_weights(str(tmp_path / "exported"))
    _assert_same_and_changed(outputs(pipe), adapted, base_out)
    # Nothing dropped or rescaled: one peft layer per adapted layer, same factors, scale 1.
    factors = adapter.materialize()
    loaded = _peft_factors(pipe)
    assert set(loaded) == set(factors)
    for key, (down, up) in factors.items():
        a, b, scaling = loaded[key]
        assert torch.equal(a, down) and torch.equal(b, up) and scaling == 1.0, key


@matrix
def test_kohya_export_matches_adapter(tiny_base, config, tmp_path):
    fresh, adapter, path, base_out, adapted = _adapted(tiny_base, config, tmp_path)
    written = export_adapter(path, "kohya", tmp_path / "subject.safetensors", tiny_base)
    tensors = load_file(written)

    # Key by key against the materialised factors.
    factors = adapter.materialize()
    assert len(tensors) == 3 * len(factors)
    for key, (down, up) in factors.items():
        component, _, module_path = key.partition(".")
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        name = prefix + module_path.replace(".", "_")
        assert torch.equal(tensors[f"{name}.lora_down.weight"], down)
        assert torch.equal(tensors[f"{name}.lora_up.weight"], up)
        assert tensors[f"{name}.alpha"].item() == config.rank

    # Read as ComfyUI / A1111 read it.
    patched = copy.deepcopy(fresh)
    _patch_like_comfyui(patched, tensors)
    _assert_same_and_changed(outputs(patched), adapted, base_out)

    # Read by diffusers' kohya importer: correct for the default layer set (see the test below).
    pipe = _pipeline(fresh)
    pipe.load_lora_weights(str(written))
    _assert_same_and_changed(outputs(pipe), adapted, base_out)
    assert set(_peft_factors(pipe)) == set(factors)


def test_kohya_keys_follow_a1111_naming(tiny_base, tmp_path):
    adapter = add_adapter(tiny_base, CONFIGS["lora-r4-alpha"])
    randomize(adapter)
    tensors = to_kohya(adapter.materialize())
    assert tensors and all(A1111_KEY.match(key) for key in tensors), [
        key for key in tensors if not A1111_KEY.match(key)
    ]
    te_keys = [key for key in tensors if key.startswith("lora_te_")]
    assert te_keys and all(key.startswith("lora_te_text_model_encoder_layers_") for key in te_keys)
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors
    )
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    alphas = [value for key, value in tensors.items() if key.endswith(".alpha")]
    assert all(value.dim() == 0 and value.item() == 4.0 for value in alphas)
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight" in to_diffusers(
        adapter.materialize()
    )


def test_diffusers_kohya_importer_drops_te_qkv_without_out_proj(tiny_base, tmp_path):
    """Documents a diffusers 0.42.1 bug; when this test fails, diffusers fixed it: update EXPORT.md.

    Its text-encoder converter only converts kohya q/k/v names when an out_proj key is present
    (it infers the 'old diffusers' layout from 'to_out_lora'); without one, and with MLP keys,
    the q/k/v tensors stay unconverted and transformers discards them as unexpected keys.
    """
    fresh, adapter, path, base_out, adapted = _adapted(tiny_base, NO_OUT_PROJ, tmp_path)
    written = export_adapter(path, "kohya", tmp_path / "subject.safetensors", tiny_base)

    # Our file is right: ComfyUI / A1111-style application reproduces the adapter exactly.
    patched = copy.deepcopy(fresh)
    _patch_like_comfyui(patched, load_file(written))
    _assert_same_and_changed(outputs(patched), adapted, base_out)

    pipe = _pipeline(fresh)
    pipe.load_lora_weights(str(written))
    loaded = set(_peft_factors(pipe))
    missing = set(adapter.materialize()) - loaded
    assert missing, "diffusers now imports kohya te q/k/v without out_proj: update docs/EXPORT.md"
    assert all(re.search(r"^text_encoder\..*self_attn\.[qkv]_proj$", key) for key in missing)
    torch.testing.assert_close(outputs(pipe)[0], adapted[0], atol=ATOL, rtol=0)
    assert not torch.allclose(outputs(pipe)[1], adapted[1], atol=ATOL, rtol=0)


def test_export_rejects_bad_requests(tiny_base, tmp_path):
    adapter = add_adapter(tiny_base, CONFIGS["lora-r1"])
    save_adapter(adapter, tmp_path / "a.safetensors")
    adapter.remove()
    with pytest.raises(HyperboothError, match="unknown export format"):
        export_adapter(tmp_path / "a.safetensors", "lycoris", tmp_path / "x.safetensors", tiny_base)
    with pytest.raises(HyperboothError, match="ending in .safetensors"):
        export_adapter(tmp_path / "a.safetensors", "kohya", tmp_path / "folder", tiny_base)
    written = export_adapter(
        tmp_path / "a.safetensors", "diffusers", tmp_path / "d.safetensors", tiny_base
    )
    assert written == tmp_path / "d.safetensors" and written.is_file()
    # Without a base the factors come from the file alone, and must be the same.
    standalone = export_adapter(tmp_path / "a.safetensors", "diffusers", tmp_path / "s.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(str(written)), load_file(str(standalone))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="per-sample"):
        to_kohya({"unet.x": (torch.zeros(2, 1, 3), torch.zeros(2, 4, 1))})


def test_lidb_bases_that_differ_from_the_trained_ones_are_refused_with_or_without_a_base(
    tiny_base, tmp_path
):
    """The trap users of other implementations report: exports built on the wrong random basis."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from hyperbooth.adapters.files import METADATA_KEY

    adapter = add_adapter(tiny_base, CONFIGS["lidb"])
    randomize(adapter)
    save_adapter(adapter, tmp_path / "a.safetensors")
    adapter.remove()
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["aux_checksum"] += 1.0  # as if the bases had been generated differently at training
    save_file(
        load_file(str(tmp_path / "a.safetensors")),
        str(tmp_path / "b.safetensors"),
        metadata={METADATA_KEY: json.dumps(meta)},
    )
    for base in (None, tiny_base):
        with pytest.raises(HyperboothError, match="b.safetensors: LiDB aux bases regenerated"):
            export_adapter(tmp_path / "b.safetensors", "kohya", tmp_path / "k.safetensors", base)
    assert not (tmp_path / "k.safetensors").exists()
    assert not any(layer.adapters for layer in adapted_layers(tiny_base).values())  # left clean
    # A name the base already carries is a one-line error before any layer changes.
    first = add_adapter(tiny_base, CONFIGS["lidb"], name="export")
    with pytest.raises(HyperboothError, match="already carries an adapter named 'export'"):
        export_adapter(tmp_path / "a.safetensors", "kohya", tmp_path / "k.safetensors", tiny_base)
    assert all(list(layer.adapters) == ["export"] for layer in first.layers.values())
    first.remove()


def test_adapter_below_matches_plain_diffusers_switching_the_exported_lora(tiny_base, tmp_path):
    """docs/EXPORT.md's few lines of diffusers code draw what `generate --adapter-below` draws."""
    import numpy as np
    from diffusers import DPMSolverMultistepScheduler

    from hyperbooth.generate import generate_images

    fresh = copy.deepcopy(tiny_base)
    adapter = add_adapter(tiny_base, CONFIGS["lora-r2-conv"])
    randomize(adapter, seed=1, scale=0.3)  # strong enough that the later steps show it too
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapter, path, base_name="tiny-random")
    export_adapter(path, "diffusers", tmp_path / "exported", tiny_base)
    draw = {"n": 1, "seed": 3, "steps": 4, "progress": False}  # timesteps 999, 749, 500, 250
    ours = {
        below: np.asarray(generate_images(tiny_base, ["a sks face"], adapter_below=below, **draw)[0][0], dtype=int)
        for below in (None, 800, 0)
    }  # fmt: skip

    pipe = _pipeline(fresh)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path / "exported"), adapter_name="subject")

    # The snippet in docs/EXPORT.md: the adapter acts only at timesteps below 800.
    def switch(pipe, step, timestep, kwargs):
        later = pipe.scheduler.timesteps[step + 1 :]
        pipe.unet.set_adapters("subject", 1.0 if len(later) and later[0] < 800 else 0.0)
        return kwargs

    pipe.unet.set_adapters("subject", 0.0)  # the first step runs at the noisiest timestep
    size = tiny_base.resolution
    image = pipe(
        "a sks face", height=size, width=size, num_inference_steps=4, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(3), callback_on_step_end=switch,
    ).images[0]  # fmt: skip
    theirs = np.asarray(image, dtype=int)
    assert np.abs(theirs - ours[800]).max() <= 2
    # The switch matters: always on and never on both draw something else.
    assert np.abs(ours[800] - ours[None]).max() > 20 and np.abs(ours[800] - ours[0]).max() > 20


def test_two_parts_on_different_layers_export_with_per_layer_ranks(tiny_base, tmp_path):
    # HyperDreamBooth with the relaxed LoRA on fewer layers than the prediction: some layers
    # carry rank 1 + 2, the others rank 1, and every tool must read both.
    fresh, fresh_kohya = copy.deepcopy(tiny_base), copy.deepcopy(tiny_base)
    base_out = outputs(tiny_base)
    prediction = add_adapter(tiny_base, CONFIGS["lidb-conv"], name="prediction")
    subset = AdapterConfig(
        kind="lora",
        rank=2,
        unet_targets=(r"up_blocks\.\d+\.resnets\.\d+\.conv[12]",),
        text_encoder_targets=(),
    )
    relaxed = add_adapter(tiny_base, subset, name="relaxed")
    randomize(prediction, seed=1)
    randomize(relaxed, seed=2)
    adapted = outputs(tiny_base)
    path = tmp_path / "subject.safetensors"
    save_adapter_parts({"prediction": (prediction, {}), "relaxed": (relaxed, {})}, path)
    ranks = {
        down.shape[0]
        for down, _ in _kohya_factors(export_adapter(path, "kohya", tmp_path / "k.safetensors"))
    }
    assert ranks == {1, 3}
    _patch_like_comfyui(fresh_kohya, load_file(str(tmp_path / "k.safetensors")))
    _assert_same_and_changed(outputs(fresh_kohya), adapted, base_out)
    export_adapter(path, "diffusers", tmp_path / "exported", tiny_base)
    pipe = _pipeline(fresh)
    pipe.load_lora_weights(str(tmp_path / "exported"))
    _assert_same_and_changed(outputs(pipe), adapted, base_out)


def _kohya_factors(path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) of every layer in a kohya file."""
    tensors = load_file(str(path))
    names = {key.split(".")[0] for key in tensors}
    return [(tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]) for n in names]
