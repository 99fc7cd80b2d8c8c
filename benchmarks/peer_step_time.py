"""Seconds per training step and peak memory: hyperbooth against diffusers' own DreamBooth scripts.

The peer is diffusers' official `examples/dreambooth/train_dreambooth_lora.py` (LoRA-DreamBooth)
and `train_dreambooth.py` (full DreamBooth). They are not part of this project: get them from a
checkout of the diffusers repository at the tag of the pinned version (pyproject.toml) and pass
its `examples/` folder with --examples. They import torchvision, so they run from their own
virtual environment (benchmarks/peer/requirements.txt; `make peer-venv` builds `.peer-venv`),
never ours.

Both sides train on the same saved base (a diffusers folder written once from `mini` or
`sd15-arch`, float32), the same single image and prompt, at the base's resolution, batch 1, the
same step count, learning rate and precision:

  lora        rank 4 on the UNet attention (to_q/to_k/to_v/to_out.0), text encoder frozen
  dreambooth  every UNet weight, AdamW, text encoder frozen
  fp32        no mixed precision
  bf16        bf16 autocast; for LoRA the frozen weights are stored in bf16 (the peer does this
              under --mixed_precision bf16; ours with --base-dtype bfloat16), DreamBooth keeps
              its trainable UNet in float32 on both sides

Timing is identical for both: each run is a child process with a torch optimizer-step hook
(`torch.optim.optimizer.register_optimizer_step_post_hook`) that stamps the end of every
optimizer step; a step's time is the gap between consecutive stamps, so it covers everything
the loop does per step (the peer VAE-encodes its image every step; ours caches the latents).
The median gap is the run's time per step. Peak memory is the child's ru_maxrss (whole
process). Runs alternate between the two sides; with --repeats the median over repeats is kept.

    .venv/bin/python benchmarks/peer_step_time.py --examples /path/to/diffusers/examples \\
        --bases mini sd15-arch --precisions fp32 bf16 --out docs/peer_step_time.json --markdown
    .venv/bin/python benchmarks/peer_step_time.py --from-json docs/peer_step_time.json --markdown
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hyperbooth.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a sks face"
LEARNING_RATES = {"lora": 1e-4, "dreambooth": 5e-6}
DEFAULT_STEPS = {"mini": 25, "sd15-arch": 4, "tiny-random": 10}

# Run inside each child: stamp every optimizer step, write the stamps and peak memory at exit,
# then run the training entry point with the given argv.
HOOK = """
import atexit, json, os, resource, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
def _rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
after_torch = _rss()
stamps = []
register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
def _dump():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.environ["STEP_STAMPS"], "w") as f:
        json.dump({"stamps": stamps, "peak_rss_bytes": peak, "rss_after_import_torch": after_torch,
                   "torch": torch.__version__}, f)
atexit.register(_dump)
kind, target, *argv = sys.argv[1:]
sys.argv = [target, *argv]
if kind == "script":
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def prepare(base: str, work: Path) -> tuple[Path, Path, int]:
    """The base as a float32 diffusers folder, a one-image folder, and the resolution."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import torch
    from PIL import Image

    from hyperbooth.bases import load_base, save_base

    folder, images = work / "bases" / base, work / "images" / base
    if not (folder / "model_index.json").is_file():
        save_base(load_base(base, dtype=torch.float32), folder)
    resolution = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
    resolution *= 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())[
        "block_out_channels"]) - 1)  # fmt: skip
    if not (images / "subject.png").is_file():
        images.mkdir(parents=True, exist_ok=True)
        picture = Image.open(ROOT / "src" / "hyperbooth" / "data" / "demo_reference.png")
        picture.convert("RGB").resize((resolution, resolution), Image.BICUBIC).save(
            images / "subject.png"
        )
    return folder, images, resolution


def commands(
    side: str, method: str, precision: str, base: Path, images: Path, resolution: int,
    steps: int, out: Path, examples: Path,
) -> tuple[str, list[str]]:  # fmt: skip
    """(kind, argv) for the child: kind is 'script' (a file) or 'module'."""
    lr = str(LEARNING_RATES[method])
    if side == "peer":
        script = "train_dreambooth_lora.py" if method == "lora" else "train_dreambooth.py"
        argv = [
            str(examples / "dreambooth" / script),
            "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(images),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(resolution),
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate", lr,
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
            "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0",
            "--mixed_precision", "bf16" if precision == "bf16" else "no",
        ]  # fmt: skip
        if method == "lora":
            argv += ["--rank", "4"]
        return "script", argv
    argv = [
        "hyperbooth.cli", "train", "--method", method, "--base", str(base),
        "--images", str(images), "--out", str(out), "--prompt", PROMPT, "--steps", str(steps),
        "--lr", lr, "--seed", "0", "--batch-size", "1",
        "--mixed-precision", "bf16" if precision == "bf16" else "no",
    ]  # fmt: skip
    if method == "lora":
        argv += ["--rank", "4", "--no-text-encoder"]
        if precision == "bf16":
            argv += ["--base-dtype", "bfloat16"]
    return "module", argv


def run_child(python: str, kind: str, argv: list[str], threads: int, log: Path) -> dict:
    """Run one training in a child process; its step gaps, peak memory and wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        stamps = Path(scratch) / "stamps.json"
        env = {
            **os.environ,
            "STEP_STAMPS": str(stamps),
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": str(ROOT / "src"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_DISABLED": "true",
        }
        started = time.perf_counter()
        with log.open("w") as stream:
            done = subprocess.run(
                [python, "-c", HOOK, kind, *argv], env=env, stdout=stream, stderr=subprocess.STDOUT
            )
        wall = time.perf_counter() - started
        if done.returncode != 0 or not stamps.is_file():
            killed = done.returncode == -9 or done.returncode == 137
            reason = "killed (out of memory?)" if killed else f"exit status {done.returncode}"
            print(f"child failed: {reason}; log {log}:\n{log.read_text()[-800:]}", flush=True)
            return {"failed": reason, "wall_seconds": wall, "argv": [kind, *argv]}
        data = json.loads(stamps.read_text())
    gaps = [b - a for a, b in zip(data["stamps"], data["stamps"][1:], strict=False)]
    return {
        "step_gaps": gaps,
        "seconds_per_step": statistics.median(gaps) if gaps else None,
        "peak_rss_bytes": data["peak_rss_bytes"],
        "rss_after_import_torch": data["rss_after_import_torch"],
        "torch": data["torch"],
        "wall_seconds": wall,
        "argv": [kind, *argv],
    }


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (base, method, precision): medians over repeats and ours/peer ratios."""
    rows = []
    keys = sorted({(r["base"], r["method"], r["precision"]) for r in runs})
    for base, method, precision in keys:
        row = {"base": base, "method": method, "precision": precision}
        for side in ("ours", "peer"):
            mine = [
                r for r in runs
                if (r["base"], r["method"], r["precision"], r["side"])
                == (base, method, precision, side) and "failed" not in r
            ]  # fmt: skip
            if not mine:
                break
            row[f"{side}_s_per_step"] = statistics.median(r["seconds_per_step"] for r in mine)
            row[f"{side}_peak_gb"] = max(r["peak_rss_bytes"] for r in mine) / 1e9
            # torch's own libraries differ between the two environments (2.13.0 CPU build
            # against 2.14.1 CUDA build): the peak above what `import torch` took is the work's.
            row[f"{side}_work_gb"] = (
                max(r["peak_rss_bytes"] - r["rss_after_import_torch"] for r in mine) / 1e9
            )
            row[f"{side}_repeats"] = len(mine)
        if any(f"{side}_s_per_step" not in row for side in ("ours", "peer")):
            row["failed"] = True  # one side has no successful run: no ratio
            rows.append(row)
            continue
        row["time_ratio"] = row["ours_s_per_step"] / row["peer_s_per_step"]
        row["memory_ratio"] = row["ours_peak_gb"] / row["peer_peak_gb"]
        row["work_memory_ratio"] = row["ours_work_gb"] / row["peer_work_gb"]
        row["meets_target"] = row["time_ratio"] <= 0.6 and row["memory_ratio"] <= 1.0
        row["meets_target_work_memory"] = (
            row["time_ratio"] <= 0.6 and row["work_memory_ratio"] <= 1.0
        )
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| base | method | precision | ours s/step | peer s/step | ours/peer time | "
        "ours peak GB | peer peak GB | ours/peer memory | above `import torch`: ours / peer GB | "
        "target (<= 0.6x time, <= 1x memory) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['base']} | {r['method']} | {r['precision']} | failed |" + " |" * 7)
            continue
        lines.append(
            f"| {r['base']} | {r['method']} | {r['precision']} | {r['ours_s_per_step']:.3f} | "
            f"{r['peer_s_per_step']:.3f} | {r['time_ratio']:.2f} | {r['ours_peak_gb']:.2f} | "
            f"{r['peer_peak_gb']:.2f} | {r['memory_ratio']:.2f} | "
            f"{r['ours_work_gb']:.2f} / {r['peer_work_gb']:.2f} | "
            f"{'met' if r['meets_target'] else 'not met'} |"
        )
    return "\n".join(lines)


def save(args: argparse.Namespace, examples: Path, runs: list[dict], summary: list) -> None:
    """Write every run and the summary to --out (if given), atomically."""
    if not args.out:
        return
    from hyperbooth.atomic import write_text

    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.threads),
        "peer_scripts_sha256": {
            name: hashlib.sha256((examples / "dreambooth" / name).read_bytes()).hexdigest()
            for name in ("train_dreambooth_lora.py", "train_dreambooth.py")
        },
        "examples_revision": args.examples_revision,
        "runs": runs,
        "summary": summary,
    }
    write_text(args.out, json.dumps(report, indent=2))


def main() -> None:
    """Run (or re-print) the side-by-side benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", help="diffusers' examples/ folder (holds dreambooth/)")
    parser.add_argument("--examples-revision", help="which diffusers commit or tag (recorded)")
    parser.add_argument("--peer-python", default=str(ROOT / ".peer-venv" / "bin" / "python"))
    parser.add_argument("--bases", nargs="+", default=["mini", "sd15-arch"])
    parser.add_argument("--methods", nargs="+", default=["lora", "dreambooth"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, help="steps per run (default per base)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "runs" / "peer"))
    parser.add_argument("--out", help="JSON file for every run and the summary")
    parser.add_argument("--from-json", help="re-print a saved result")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())["summary"]))
        return
    if not args.examples or not (Path(args.examples) / "dreambooth").is_dir():
        raise SystemExit("--examples must be diffusers' examples/ folder (with dreambooth/ in it)")
    if not Path(args.peer_python).is_file():
        raise SystemExit(f"no peer Python at {args.peer_python}; run `make peer-venv` first")
    work, examples = Path(args.work), Path(args.examples).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        for base in args.bases:
            folder, images, resolution = prepare(base, work)
            steps = args.steps or DEFAULT_STEPS.get(base, 10)
            for precision in args.precisions:
                for method in args.methods:
                    sides = ["ours", "peer"] if repeat % 2 == 0 else ["peer", "ours"]
                    for side in sides:
                        name = f"{base}-{method}-{precision}-{side}-{repeat}"
                        kind, argv = commands(
                            side, method, precision, folder, images, resolution, steps,
                            work / "out" / name, examples,
                        )  # fmt: skip
                        python = args.peer_python if side == "peer" else sys.executable
                        result = run_child(python, kind, argv, args.threads, work / "logs" / name)
                        result |= {
                            "base": base, "method": method, "precision": precision,
                            "side": side, "repeat": repeat, "steps": steps,
                            "resolution": resolution, "python": python,
                        }  # fmt: skip
                        runs.append(result)
                        save(args, examples, runs, summarise(runs))  # a killed run keeps these
                        shutil.rmtree(work / "out" / name, ignore_errors=True)  # GBs each
                        if "failed" not in result:
                            print(
                                f"{name}: {result['seconds_per_step']:.3f} s/step, "
                                f"peak {result['peak_rss_bytes'] / 1e9:.2f} GB",
                                flush=True,
                            )
    summary = summarise(runs)
    save(args, examples, runs, summary)
    if args.markdown:
        print(markdown(summary))


if __name__ == "__main__":
    main()
