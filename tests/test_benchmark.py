"""`hyperbooth benchmark`: cells run once, the summary adds up, bad specs fail in one line."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from hyperbooth.adapters.files import read_adapter
from hyperbooth.benchmark import (
    PROMPT_SETS,
    BenchmarkConfig,
    mini_subjects,
    read_prompt_set,
    read_subjects,
)
from hyperbooth.cli import main as cli
from hyperbooth.errors import HyperboothError


def test_prompt_sets_have_their_sizes_and_mini_matches_the_evaluation_prompts():
    from hyperbooth.miniworld.evaluate import EVALUATION_CONTEXTS, subject_prompt

    sizes = {name: len(read_prompt_set(name)) for name in PROMPT_SETS}
    assert sizes == {"dreambench-object": 25, "dreambench-live": 25, "faces": 30, "mini": 8}
    mini = [p.format("sks face") for p in read_prompt_set("mini")]
    assert mini == [subject_prompt(names) for names in EVALUATION_CONTEXTS]


def test_mini_subjects_are_held_out_references_with_traits(tmp_path):
    from hyperbooth.miniworld.evaluate import held_out_identities

    subjects = read_subjects(mini_subjects(tmp_path, 2))
    expected = [f"{k:03d}_id{i.index:07d}" for k, i in enumerate(held_out_identities(2))]
    assert [s.name for s in subjects] == expected
    info = json.loads(subjects[0].info.read_text())
    assert info["traits"] == held_out_identities(1)[0].names()


def test_benchmark_runs_every_cell_once_and_summarises(tmp_path):
    subjects = tmp_path / "subjects"
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (subjects / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(subjects / name / "photo.png")
    (subjects / "blue" / "class.txt").write_text("dog\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in the snow\na red {}\n")
    out = tmp_path / "bench"
    args = ["benchmark", "--base", "tiny-random", "--device", "cpu", "--subjects", str(subjects)]
    args += ["--methods", "lidb,textual-inversion", "--prompts", str(prompts), "--seeds", "1"]
    args += ["--method-steps", "lidb=2", "--method-steps", "textual-inversion=2"]
    args += ["--sampling-steps", "2", "--out", str(out)]
    # Adapter settings reach the adapter methods: rank 2 on the ResNet convs, UNet only.
    args += ["--method-lr", "lidb=1e-2", "--rank", "2", "--no-text-encoder"]
    args += ["--unet-targets", r".*resnets\.\d+\.conv[12]"]
    assert cli(args) == 0
    cells = sorted(out.glob("cells/*/*/result.json"))
    assert len(cells) == 4
    (adapter,) = (out / "cells" / "lidb" / "red").rglob("adapter.safetensors")
    stored = read_adapter(adapter)
    assert stored.config.rank == 2 and stored.config.kind == "lidb"
    assert {key.split(".")[0] for key in stored.tensors} == {"unet"}
    assert all(".resnets." in key for key in stored.tensors)
    result = json.loads((out / "cells" / "textual-inversion" / "blue" / "result.json").read_text())
    assert result["stored_bytes"] > 0 and result["scores"]["images"] == 2
    assert sorted(p.name for p in (cells[0].parent / "images").iterdir()) == [
        "000_0.png",
        "001_0.png",
    ]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"lidb", "textual-inversion"}
    table = (out / "table.md").read_text()
    assert "| lidb | 2 |" in table and "| textual-inversion | 2 |" in table
    assert all((out / name).is_file() for name in ("cost.png", "samples.png"))
    stamps = [c.stat().st_mtime_ns for c in cells]
    assert cli(args) == 0  # a rerun skips every finished cell
    assert [c.stat().st_mtime_ns for c in cells] == stamps


def test_bad_benchmark_specs_are_one_line_errors(tmp_path):
    with pytest.raises(HyperboothError, match="unknown method"):
        BenchmarkConfig(methods=("lidb", "magic"))
    with pytest.raises(HyperboothError, match="--hypernet"):
        BenchmarkConfig(methods=("hyperdreambooth",))
    (tmp_path / "p.txt").write_text("a photo\n")
    with pytest.raises(HyperboothError, match="exactly one"):
        read_prompt_set(str(tmp_path / "p.txt"))
    with pytest.raises(HyperboothError, match="no subject folders"):
        read_subjects(tmp_path)
    assert cli(["benchmark", "--base", "tiny-random", "--subjects", "mini:x", "--out", "o"]) == 2
    bad_rate = ["--method-lr", "lora=fast", "--subjects", str(tmp_path), "--out", "o"]
    assert cli(["benchmark", "--base", "tiny-random", *bad_rate]) == 2
