"""HyperDreamBooth's fast path: multi-part adapter files, personalize and its ablations, export."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import outputs, randomize
from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.export import export_adapter
from hyperbooth.adapters.files import (
    combine_factors,
    load_adapters,
    read_adapter,
    read_adapter_parts,
    save_adapter_parts,
)
from hyperbooth.adapters.inject import add_adapter
from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError
from hyperbooth.hypernet.model import save_hypernet
from hyperbooth.hypernet.personalize import PersonalizeConfig, personalize
from test_hypernet import _hypernet

SMALL_LIDB = AdapterConfig(kind="lidb", lidb_a=16, lidb_b=8)
ATOL = 1e-5


def test_a_two_part_file_acts_as_both_adapters_and_exports_as_their_sum(tiny_base, tmp_path):
    fresh = copy.deepcopy(tiny_base)
    first = add_adapter(tiny_base, SMALL_LIDB, name="one")
    second = add_adapter(tiny_base, AdapterConfig(kind="lora", rank=2), name="two")
    randomize(first, seed=1)
    randomize(second, seed=2)
    expected = outputs(tiny_base)
    path = tmp_path / "both.safetensors"
    save_adapter_parts({"prediction": (first, {}), "relaxed": (second, {})}, path)
    assert list(read_adapter_parts(path)) == ["prediction", "relaxed"]
    with pytest.raises(HyperboothError, match="holds 2 adapters"):
        read_adapter(path)
    loaded = load_adapters(path, fresh, name="subject")
    assert [a.name for a in loaded] == ["subject_prediction", "subject_relaxed"]
    for got, want in zip(outputs(fresh), expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # One LoRA of rank 1 + 2 with the same delta on every layer.
    combined = combine_factors([first.materialize(), second.materialize()])
    for key, (down, up) in combined.items():
        assert down.shape[0] == 3
        d1, u1 = first.materialize()[key]
        d2, u2 = second.materialize()[key]
        torch.testing.assert_close(up @ down, u1 @ d1 + u2 @ d2, atol=1e-6, rtol=0)
    kohya = export_adapter(path, "kohya", tmp_path / "kohya.safetensors")
    downs = [v for k, v in load_file(str(kohya)).items() if k.endswith("lora_down.weight")]
    assert downs and all(d.shape[0] == 3 for d in downs)


def _image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 120, 60))


@pytest.mark.parametrize(
    ("use_hypernet", "fine_tune", "parts"),
    [
        (True, True, ["prediction", "relaxed"]),
        (False, True, ["relaxed"]),
        (True, False, ["prediction"]),
    ],
)
def test_personalize_and_its_ablations_write_the_right_parts(
    tiny_base, tmp_path, use_hypernet, fine_tune, parts
):
    hypernet = _hypernet(tiny_base)
    config = PersonalizeConfig(use_hypernet=use_hypernet, fine_tune=fine_tune, steps=2, rank=4)
    result = personalize(tiny_base, hypernet, _image(), tmp_path / "me.safetensors", config, False)
    assert result.parts == parts and result.bytes > 0
    stored = read_adapter_parts(result.output)
    if "relaxed" in stored:
        assert stored["relaxed"].config.kind == "lora" and stored["relaxed"].config.rank == 4
    if "prediction" in stored:
        pixels = torch.tensor([[[200 / 127.5 - 1]], [[120 / 127.5 - 1]], [[60 / 127.5 - 1]]])
        with torch.no_grad():
            predicted = hypernet(pixels.expand(3, 32, 32)[None])
        for key, value in stored["prediction"].tensors.items():
            torch.testing.assert_close(value, predicted[key][0], atol=1e-6, rtol=1e-5)


def test_personalize_refuses_to_do_nothing():
    with pytest.raises(HyperboothError, match="nothing to do"):
        PersonalizeConfig(use_hypernet=False, fine_tune=False)


def test_the_personalize_command_prints_each_stage_and_exports_rank_1_plus_r(
    tiny_base, tmp_path, capsys
):
    save_hypernet(_hypernet(tiny_base), tmp_path / "hyper")
    _image().save(tmp_path / "me.png")
    out = tmp_path / "me.safetensors"
    args = ["personalize", "--base", "tiny-random", "--device", "cpu", "--json"]
    args += ["--hypernet", str(tmp_path / "hyper"), "--image", str(tmp_path / "me.png")]
    args += ["--out", str(out), "--steps", "2", "--rank", "3"]
    assert cli(args + ["--prompt", "a face on a white background"]) == 2  # no token: refused
    assert "does not contain the token 'sks'" in capsys.readouterr().err
    assert not out.exists()
    assert cli(args + ["--prompt", "a sks face on a white background"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["seconds"]) == {"load", "predict", "fine_tune", "save"}
    stored = read_adapter_parts(out)
    assert {part.info["prompt"] for part in stored.values()} == {"a sks face on a white background"}
    weights = (tmp_path / "hyper" / "hypernet.safetensors").read_bytes()
    assert (
        stored["prediction"].info["hypernet"]
        == {  # which network predicted it
            "hypernet": str((tmp_path / "hyper").resolve()),
            "weights_sha256": hashlib.sha256(weights).hexdigest()[:16],
        }
    )
    assert cli(["export", "--adapter", str(out), "--format", "kohya", "--out",
                str(tmp_path / "k.safetensors")]) == 0  # fmt: skip
    downs = [
        v
        for k, v in load_file(str(tmp_path / "k.safetensors")).items()
        if k.endswith("lora_down.weight")
    ]
    assert {d.shape[0] for d in downs} == {4}  # rank 1 + 3
    record = tmp_path / "grid.png"
    assert cli(["generate", "--base", "tiny-random", "--adapter", str(out), "--prompt",
                "a sks face", "--n", "1", "--steps", "2", "--out", str(record)]) == 0  # fmt: skip
    assert json.loads(record.with_suffix(".json").read_text())["adapters"][0]["path"] == str(out)


def test_a_bad_image_is_a_one_line_error(tiny_base, tmp_path, capsys):
    save_hypernet(_hypernet(tiny_base), tmp_path / "hyper")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = cli(
        ["personalize", "--base", "tiny-random", "--device", "cpu", "--hypernet",
         str(tmp_path / "hyper"), "--image", str(tmp_path / "broken.png"), "--out",
         str(tmp_path / "me.safetensors")]
    )  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "broken.png" in error
    assert not (tmp_path / "me.safetensors").exists()
    for config, match in (
        ({"iterations": 0}, "--iterations must be >= 1"),
        ({"unet_targets": ("*conv",)}, "--unet-targets '[*]conv' is not a regex"),
    ):
        with pytest.raises(HyperboothError, match=match):
            PersonalizeConfig(**config)


_PREDICT_IN_NEW_PROCESS = """
import sys, torch
from PIL import Image
from safetensors.torch import save_file
from hyperbooth.bases import load_base
from hyperbooth.hypernet.model import load_hypernet
from hyperbooth.hypernet.personalize import predict
torch.set_num_threads(1)
base = load_base("tiny-random")
adapter = predict(base, load_hypernet(sys.argv[1]), Image.open(sys.argv[2]))
tensors = {k: v.contiguous() for k, v in adapter.state_dict().items()}
tensors.update({f"aux.{k}": w.lidb_a_aux.contiguous() for k, w in adapter.weights().items()})
save_file(tensors, sys.argv[3])
"""


def test_predictions_and_aux_bases_are_bit_identical_in_a_new_process(tiny_base, tmp_path):
    import subprocess
    import sys

    from hyperbooth.hypernet.personalize import predict

    hypernet = _hypernet(tiny_base)
    save_hypernet(hypernet, tmp_path / "hyper")
    _image().save(tmp_path / "me.png")
    adapter = predict(tiny_base, hypernet, Image.open(tmp_path / "me.png"))
    here = dict(adapter.state_dict())
    here.update({f"aux.{k}": w.lidb_a_aux for k, w in adapter.weights().items()})
    result = subprocess.run(
        [sys.executable, "-c", _PREDICT_IN_NEW_PROCESS, str(tmp_path / "hyper"),
         str(tmp_path / "me.png"), str(tmp_path / "there.safetensors")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    there = load_file(str(tmp_path / "there.safetensors"))
    assert there.keys() == here.keys()
    assert all(torch.equal(there[k], here[k]) for k in here)


def test_a_hypernetwork_for_another_base_is_a_one_line_error(tiny_base, tmp_path):
    hypernet = _hypernet(tiny_base)
    first = hypernet.keys[0]
    hypernet.layer_shapes[first] = [1, 1]  # as if trained on a base whose layer is 1 x 1
    image = Image.new("RGB", (32, 32))
    with pytest.raises(HyperboothError, match=f"another base .*{first}"):
        personalize(tiny_base, hypernet, image, tmp_path / "s.safetensors", PersonalizeConfig())
    assert not (tmp_path / "s.safetensors").exists()


def _relaxed(base, tmp_path, name, mask=None, weight=0.0, **more):
    """The relaxed LoRA's tensors after 3 fine-tune steps from zero, with an optional mask."""
    config = PersonalizeConfig(use_hypernet=False, steps=3, rank=2, mask_weight=weight, **more)
    out = tmp_path / f"{name}.safetensors"
    personalize(copy.deepcopy(base), None, _image(), out, config, False, mask=mask)
    return read_adapter_parts(out)["relaxed"].tensors


def test_a_mask_weighs_the_fine_tunes_loss(tiny_base, tmp_path):
    import numpy as np

    plain = _relaxed(tiny_base, tmp_path, "plain")
    # The weighted loss is normalised by the weights: a mask over everything changes nothing.
    everywhere = _relaxed(tiny_base, tmp_path, "all", np.ones((32, 32), np.float32), 3.0)
    left = np.zeros((32, 32), np.float32)
    left[:, :16] = 1
    half = _relaxed(tiny_base, tmp_path, "half", left, 3.0)
    assert plain.keys() == everywhere.keys() == half.keys()
    for key in plain:
        torch.testing.assert_close(everywhere[key], plain[key], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(half[key], plain[key], atol=1e-4) for key in plain)
    with pytest.raises(HyperboothError, match="--mask and --mask-weight go together"):
        _relaxed(tiny_base, tmp_path, "no_weight", left, 0.0)


def test_the_fine_tune_follows_its_learning_rate_schedule(tiny_base, tmp_path):
    plain = _relaxed(tiny_base, tmp_path, "plain")
    # Linear warm-up over all 3 steps: rates 0, 1/3, 2/3 of --lr, so a smaller, different fit.
    warm = _relaxed(tiny_base, tmp_path, "warm", lr_warmup_steps=3)
    assert any(not torch.allclose(warm[key], plain[key], atol=1e-6) for key in plain)
    step_norm = sum(float(warm[k].norm()) for k in warm if "up" in k)
    assert 0 < step_norm < sum(float(plain[k].norm()) for k in plain if "up" in k)


def test_personalize_mask_flags_are_checked(tiny_base, tmp_path, capsys):
    _image().save(tmp_path / "me.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    out = tmp_path / "me.safetensors"
    args = ["personalize", "--base", "tiny-random", "--device", "cpu", "--no-hypernet"]
    args += ["--image", str(tmp_path / "me.png"), "--out", str(out), "--steps", "1"]
    for extra, message in [
        (["--mask-weight", "2"], "pass --mask FILE too"),
        (["--mask", str(tmp_path / "none.png")], "is not a file"),
        (["--mask", str(tmp_path / "small.png")], "a mask must match its image"),
        (["--mask", str(tmp_path / "mask.png"), "--mask-weight", "-1"], "must be >= 0"),
    ]:
        assert cli(args + extra) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not out.exists()
    hyper_only = ["--hypernet", "mini", "--hypernet-only", "--mask", str(tmp_path / "mask.png")]
    assert cli([a for a in args if a != "--no-hypernet"] + hyper_only) == 2
    assert "--hypernet-only has none" in capsys.readouterr().err
    assert cli(args + ["--mask", str(tmp_path / "mask.png"), "--json"]) == 0
    assert read_adapter_parts(out)["relaxed"].info["settings"]["mask_weight"] == 3.0


def test_the_fine_tune_draws_batch_size_noises_of_the_photo_per_step(tiny_base, tmp_path):
    plain = _relaxed(tiny_base, tmp_path, "plain")
    batched = _relaxed(tiny_base, tmp_path, "batched", batch_size=2)
    assert plain.keys() == batched.keys()
    assert any(not torch.allclose(batched[key], plain[key], atol=1e-6) for key in plain)
    with pytest.raises(HyperboothError, match="--batch-size must be >= 1"):
        PersonalizeConfig(batch_size=0)
