"""The command line: every verb end to end on tiny-random, and one-line errors for bad input."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hyperbooth.cli import main


@pytest.fixture
def photo_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (48, 40), (200, 120, 90)).save(folder / "me.png")
    return folder


def _error(capsys, argv) -> str:
    """Run the CLI expecting a user error; return its single stderr line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hyperbooth: error: ") and "\n" not in err, err
    return err


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("info", "train", "generate", "export", "demo"):
        assert f"  {verb}" in out


@pytest.mark.parametrize(
    "method, extra, expected",
    [
        ("lidb", [], (200, 30_000, 120_000)),
        ("lora", ["--rank", "1"], (200, 365_184, 1_460_736)),
    ],
)
def test_info_counts_sd15(capsys, method, extra, expected):
    assert main(["info", "--base", "sd15-arch", "--method", method, "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["layers"], report["trainable_parameters"], report["bytes_float32"]) == expected


def test_train_generate_round_trip(tmp_path, photo_dir, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", "lidb", "--base", "tiny-random", "--images", str(photo_dir)]
    argv += ["--steps", "3", "--out", str(out), "--lidb-a", "16", "--lidb-b", "8", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    adapter = out / "adapter.safetensors"
    assert summary["output"] == str(adapter) and adapter.is_file()

    grids = []
    for name in ("a", "b"):
        grid = tmp_path / f"{name}.png"
        argv = ["generate", "--base", "tiny-random", "--adapter", f"{adapter}:0.5"]
        argv += ["--prompt", "a sks face", "--prompt", "a sks face in a hat", "--n", "2"]
        argv += ["--steps", "3", "--seed", "7", "--out", str(grid), "--adapter-below", "900"]
        assert main(argv) == 0
        grids.append(np.asarray(Image.open(grid)))
        record = json.loads(grid.with_suffix(".json").read_text())
        assert record["adapters"] == [{"path": str(adapter), "weight": 0.5}]
        assert record["adapter_below"] == 900
    assert np.array_equal(grids[0], grids[1])
    # One subject per side: the same file twice, each with its own region.
    grid = tmp_path / "regions.png"
    with_adapter = ["generate", "--base", "tiny-random", "--adapter", str(adapter)]
    argv = [*with_adapter, "--adapter", str(adapter)]
    argv += ["--region", "left", "--region", "0.5,0,1,1", "--prompt", "a sks face"]
    argv += ["--n", "1", "--steps", "2", "--out", str(grid)]
    assert main(argv) == 0
    regions = [a["region"] for a in json.loads(grid.with_suffix(".json").read_text())["adapters"]]
    assert regions == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]
    capsys.readouterr()
    argv[argv.index("0.5,0,1,1")] = "middle"
    assert "region 'middle'" in _error(capsys, argv)
    one_region = [*argv[:9], "--prompt", "a sks face", "--out", str(grid)]
    assert "--region was given 1 times for 2 --adapter" in _error(capsys, one_region)
    # Subject guidance: the base follows the prompt, the adapter adds the subject.
    guided = tmp_path / "guided.png"
    argv = [*with_adapter, "--prompt", "a sks face"]
    argv += ["--n", "1", "--steps", "2", "--subject-guidance", "2", "--out", str(guided)]
    assert main(argv) == 0
    assert json.loads(guided.with_suffix(".json").read_text())["subject_guidance"] == 2.0
    # A negative prompt replaces the empty one in the guided pair: other pixels, recorded.
    negative = tmp_path / "negative.png"
    argv_negative = [*argv[:-2], "--negative-prompt", "a face in a hat", "--out", str(negative)]
    assert main(argv_negative) == 0
    assert json.loads(negative.with_suffix(".json").read_text())["negative_prompt"] == (
        "a face in a hat"
    )
    assert not np.array_equal(np.asarray(Image.open(negative)), np.asarray(Image.open(guided)))
    capsys.readouterr()
    unguided = [*argv[:-2], "--guidance", "1", "--out", str(tmp_path / "unguided.png")]
    assert "needs classifier-free guidance above 1" in _error(capsys, unguided)
    assert not (tmp_path / "unguided.png").exists()

    for fmt, target in (
        ("diffusers", tmp_path / "exported"),
        ("kohya", tmp_path / "k.safetensors"),
    ):
        assert (
            main(["export", "--adapter", str(adapter), "--format", fmt, "--out", str(target)]) == 0
        )
    assert (tmp_path / "exported" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "k.safetensors").is_file()


def test_bad_inputs_are_one_line_errors(tmp_path, photo_dir, capsys):
    train = ["train", "--method", "lora", "--base", "tiny-random", "--steps", "1"]
    missing = tmp_path / "nope.png"
    assert "nope.png" in _error(
        capsys, [*train, "--images", str(missing), "--out", str(tmp_path / "o")]
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _error(capsys, [*train, "--images", str(empty), "--out", str(tmp_path / "o")])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "notes.txt" in _error(
        capsys, [*train, "--images", str(text), "--out", str(tmp_path / "o")]
    )
    ok = ["--images", str(photo_dir), "--out", str(tmp_path / "o")]
    assert "token" in _error(capsys, [*train, *ok, "--prompt", "a photo of a face"])
    assert "matches no" in _error(capsys, [*train, *ok, "--unet-targets", r".*nothing"])
    assert "tiny-random" in _error(
        capsys,
        [*train, "--images", str(photo_dir), "--out", "o"][:3]
        + [
            "--method",
            "lora",
            "--base",
            str(tmp_path / "no-such-base"),
            "--images",
            str(photo_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert ".png" in _error(
        capsys,
        ["generate", "--base", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "g.jpg")],
    )
    assert "not found" in _error(
        capsys,
        [
            "generate",
            "--base",
            "tiny-random",
            "--adapter",
            str(tmp_path / "x.safetensors"),
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "g.png"),
        ],
    )
    gen = ["generate", "--base", "tiny-random", "--prompt", "x", "--out", str(tmp_path / "g.png")]
    for flags, message in (
        (["--n", "0"], "--n must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--adapter-below", "5000"], "--adapter-below 5000 is past"),
        (["--adapter", f"{text}:strong"], "must be a number"),
    ):
        assert message in _error(capsys, [*gen, *flags])
    assert "--lr must be > 0" in _error(capsys, [*train, *ok, "--lr", "-1"])
    (tmp_path / "afile").write_text("")
    blocked = [*train, "--images", str(photo_dir), "--out", str(tmp_path / "afile")]
    assert "a file is in the way of a folder" in _error(capsys, blocked)
    assert not (tmp_path / "g.png").exists()
    assert not (tmp_path / "o" / "adapter.safetensors").exists()


def test_adapter_for_another_base_is_refused(tmp_path, photo_dir, capsys):
    out = tmp_path / "run"
    argv = ["train", "--method", "lora", "--base", "tiny-random", "--images", str(photo_dir)]
    assert main([*argv, "--steps", "1", "--out", str(out), "--no-text-encoder"]) == 0
    capsys.readouterr()
    grid = str(tmp_path / "g.png")
    message = _error(
        capsys,
        [
            "generate",
            "--base",
            "sd15-arch",
            "--adapter",
            str(out / "adapter.safetensors"),
            "--prompt",
            "x",
            "--out",
            grid,
        ],
    )
    assert "another base" in message


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import torch

    from hyperbooth.adapters import files
    from hyperbooth.errors import HyperboothError

    def no_space(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save_file", no_space)
    with pytest.raises(HyperboothError, match="no space left"):
        files.atomic_save_safetensors({"x": torch.zeros(3)}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_adapters_get_the_permissions_of_a_plain_file(tmp_path):
    import torch

    from hyperbooth.adapters import files

    # safetensors creates private (0600) files; an adapter is shared with other users' tools
    files.atomic_save_safetensors({"x": torch.zeros(3)}, tmp_path / "a.safetensors")
    (tmp_path / "plain").write_bytes(b"")
    mode = (tmp_path / "a.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777  # 0644 under umask 022


def test_help_needs_neither_torch_nor_diffusers():
    # `hyperbooth --help` and every verb's --help answer at once, without the 3 s of imports
    code = (
        "import sys, hyperbooth.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_entry_point_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyperbooth.cli",
            "train",
            "--method",
            "lidb",
            "--base",
            "tiny-random",
            "--images",
            str(tmp_path / "missing.jpg"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hyperbooth: error: image not found")


def test_dreambooth_saves_a_diffusers_folder_that_generates(tmp_path, photo_dir, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "db"
    argv = ["train", "--method", "dreambooth", "--base", "tiny-random", "--images", str(photo_dir)]
    assert main([*argv, "--steps", "2", "--out", str(out)]) == 0
    model = out / "model"
    assert (model / "model_index.json").is_file()
    assert json.loads((model / "hyperbooth.json").read_text())["base_name"] == "tiny-random"
    StableDiffusionPipeline.from_pretrained(str(model))
    grid = tmp_path / "g.png"
    argv = ["generate", "--base", str(model), "--prompt", "a sks face", "--n", "1", "--steps", "2"]
    assert main([*argv, "--out", str(grid)]) == 0
    assert grid.is_file()


def test_lora_trains_on_a_bfloat16_base(tmp_path, photo_dir, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    argv = ["train", "--method", "lora", "--base", "tiny-random", "--images", str(photo_dir)]
    argv += ["--base-dtype", "bfloat16", "--steps", "2", "--out", str(out), "--json"]
    assert main(argv) == 0
    loss = json.loads(capsys.readouterr().out)["final_loss"]
    assert np.isfinite(loss)
    tensors = load_file(str(out / "adapter.safetensors"))
    assert {t.dtype for t in tensors.values()} == {__import__("torch").float32}


def test_importing_the_pipelines_prints_no_torchvision_notice():
    # diffusers' pipeline imports make transformers say "install torchvision"; the core install
    # leaves it out on purpose, so hyperbooth drops that one notice (and nothing else).
    code = (
        "import hyperbooth.generate, hyperbooth.bases, diffusers; diffusers.StableDiffusionPipeline"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "torchvision" not in result.stderr, result.stderr
    bare = "import diffusers; diffusers.StableDiffusionPipeline"
    without = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True)
    assert "requires torchvision (not installed)" in without.stderr  # the notice it drops exists
