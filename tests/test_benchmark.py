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
    read_plan,
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

    subjects = mini_subjects(tmp_path, 2)
    expected = [f"{k:03d}_id{i.index:07d}" for k, i in enumerate(held_out_identities(2))]
    assert [s.name for s in subjects] == expected
    info = json.loads(subjects[0].info.read_text())
    assert info["traits"] == held_out_identities(1)[0].names()
    assert [s.name for s in mini_subjects(tmp_path, 1)] == expected[:1]  # not the folder's 2
    (tmp_path / expected[0] / "._reference.png").write_bytes(b"\0")  # a macOS stub
    assert len(read_subjects(tmp_path)[0].images) == 1


def test_benchmark_runs_every_cell_once_and_summarises(tmp_path, capsys):
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
    # a rerun with other run-level settings must not mix its cells with the old ones
    (tmp_path / "other.txt").write_text("a {} on the moon\n")
    for changed, key in (
        (["--seeds", "2"], "seeds"),
        (["--guidance", "3"], "guidance"),
        (["--method-steps", "lidb=3"], "steps"),
        (["--prompts", str(tmp_path / "other.txt")], "prompts"),
    ):
        capsys.readouterr()
        assert cli([*args, *changed]) == 2
        assert f"was made with another '{key}'" in capsys.readouterr().err
    assert [c.stat().st_mtime_ns for c in cells] == stamps


def test_bad_benchmark_specs_are_one_line_errors(tmp_path):
    with pytest.raises(HyperboothError, match="unknown method"):
        BenchmarkConfig(methods=("lidb", "magic"))
    with pytest.raises(HyperboothError, match="--hypernet"):
        BenchmarkConfig(methods=("hyperdreambooth",))
    with pytest.raises(HyperboothError, match="--seeds and --sampling-steps must be >= 1"):
        BenchmarkConfig(seeds=0)
    with pytest.raises(HyperboothError, match="--method-steps names an unknown method 'lorra'"):
        BenchmarkConfig(steps={"lorra": 100})
    (tmp_path / "p.txt").write_text("a photo\n")
    with pytest.raises(HyperboothError, match="exactly one"):
        read_prompt_set(str(tmp_path / "p.txt"))
    with pytest.raises(HyperboothError, match="no subject folders"):
        read_subjects(tmp_path)
    assert cli(["benchmark", "--base", "tiny-random", "--subjects", "mini:x", "--out", "o"]) == 2
    nothing = ["--subjects", "mini:1", "--prompts", "nosuch", "--out", str(tmp_path / "b")]
    assert cli(["benchmark", "--base", "tiny-random", *nothing]) == 2
    assert not (tmp_path / "b").exists()  # a bad --prompts fails before subjects are written
    bad_rate = ["--method-lr", "lora=fast", "--subjects", str(tmp_path), "--out", "o"]
    assert cli(["benchmark", "--base", "tiny-random", *bad_rate]) == 2


def _one_red_subject(tmp_path):
    """A subjects folder with one subject (a red square) and a one-prompt file."""
    subjects = tmp_path / "subjects"
    (subjects / "red").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(subjects / "red" / "photo.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {} in the snow\n")
    return subjects, prompts


def test_a_plan_runs_named_rows_with_their_own_settings_and_guards_changed_rows(tmp_path):
    subjects, prompts = _one_red_subject(tmp_path)
    rows = [
        {"name": "lidb-r1", "method": "lidb", "steps": 2},
        {"name": "lidb-r2-convs", "method": "lidb", "steps": 3, "learning_rate": 1e-2,
         "adapter": {"rank": 2, "unet_targets": [r".*resnets\.\d+\.conv[12]"],
                     "text_encoder_targets": []}, "max_timestep": 600, "adapter_below": 800},
    ]  # fmt: skip
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rows": rows}))
    out = tmp_path / "bench"
    args = ["benchmark", "--base", "tiny-random", "--device", "cpu", "--subjects", str(subjects)]
    args += ["--plan", str(plan), "--prompts", str(prompts), "--seeds", "1"]
    args += ["--sampling-steps", "2", "--out", str(out)]
    assert cli(args) == 0
    (first,) = (out / "cells" / "lidb-r1" / "red").rglob("adapter.safetensors")
    (second,) = (out / "cells" / "lidb-r2-convs" / "red").rglob("adapter.safetensors")
    assert read_adapter(first).config.rank == 1
    stored = read_adapter(second)
    assert stored.config.rank == 2 and all(".resnets." in k for k in stored.tensors)
    result = json.loads((out / "cells" / "lidb-r2-convs" / "red" / "result.json").read_text())
    assert result["kind"] == "lidb" and result["row"]["steps"] == 3
    assert result["row"]["max_timestep"] == 600 and result["row"]["adapter_below"] == 800
    first_row = json.loads((out / "cells" / "lidb-r1" / "red" / "result.json").read_text())["row"]
    assert (
        "max_timestep" not in first_row
    )  # unset options leave earlier cells' settings as they were
    assert "| lidb-r2-convs | 1 |" in (out / "table.md").read_text()
    rows[1]["steps"] = 4  # the same name with other settings must not reuse the old cell
    plan.write_text(json.dumps({"rows": rows}))
    assert cli(args) == 2
    assert cli([*args, "--methods", "lidb"]) == 2  # a plan or methods, not both
    for bad in ({"name": "x", "method": "magic"}, {"name": "a b", "method": "lidb"},
                {"name": "x", "method": "lidb", "adapter": {"rnak": 2}},
                {"name": "x", "method": "lora", "hypernet": {"iterations": 1}}):  # fmt: skip
        with pytest.raises(HyperboothError):
            BenchmarkConfig(rows=(bad,))
    plan.write_text("[1, 2]")
    with pytest.raises(HyperboothError, match="cannot read the plan"):
        read_plan(plan)


def test_hyperdreambooth_ablations_are_rows_of_the_same_table(tmp_path):
    import torch

    from hyperbooth.adapters.config import AdapterConfig
    from hyperbooth.adapters.inject import target_layers
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import HyperNetConfig, HyperNetwork, save_hypernet

    adapter = AdapterConfig(kind="lidb", lidb_a=16, lidb_b=8)
    base = load_base("tiny-random")
    layers = {k: tuple(m.weight.shape) for k, m in target_layers(base, adapter).items()}
    torch.manual_seed(0)
    sizes = {"image_size": 32, "encoder_width": 16, "encoder_layers": 1, "width": 16, "heads": 2}
    save_hypernet(HyperNetwork(HyperNetConfig(adapter=adapter, **sizes), layers), tmp_path / "h")
    subjects, prompts = _one_red_subject(tmp_path)
    rows = [
        {"name": "hdb", "method": "hyperdreambooth", "steps": 2, "adapter": {"rank": 2}},
        {"name": "hdb-only", "method": "hyperdreambooth", "hypernet": {"fine_tune": False}},
        {"name": "hdb-k1", "method": "hyperdreambooth", "steps": 2,
         "hypernet": {"iterations": 1}},
        {"name": "hdb-zero", "method": "hyperdreambooth", "steps": 2,
         "hypernet": {"use_hypernet": False}},
    ]  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps({"rows": rows}))
    out = tmp_path / "bench"
    args = ["benchmark", "--base", "tiny-random", "--device", "cpu", "--subjects", str(subjects)]
    args += ["--plan", str(tmp_path / "plan.json"), "--hypernet", str(tmp_path / "h")]
    args += ["--prompts", str(prompts), "--seeds", "1", "--sampling-steps", "2", "--out", str(out)]
    assert cli(args) == 0
    size = {
        r["name"]: json.loads((out / "cells" / r["name"] / "red" / "result.json").read_text())[
            "stored_bytes"
        ]
        for r in rows
    }
    # rank 2 relaxed LoRA < rank 4; the prediction alone is smallest; no prediction drops it.
    assert size["hdb-only"] < size["hdb"] < size["hdb-k1"]
    assert abs(size["hdb-zero"] - (size["hdb-k1"] - size["hdb-only"])) < 1000  # but metadata
