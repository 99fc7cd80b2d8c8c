"""Seconds per training step and peak memory of each method, next to the UNet's own floor.

For every (base, resolution, precision) this times, at batch size 1 on the CPU:

  methods     dreambooth   full UNet, AdamW (text encoder frozen, its embedding cached)
              lora-r1      LoRA r=1 on the default layers (UNet attention + text encoder)
              lora-r4      LoRA r=4, same layers
              lidb         LiDB a=100, b=50, r=1, same layers
              lora-r1-unet LoRA r=1 on the UNet attention only, text encoder frozen and its
                           embedding cached as DreamBooth's (a diagnostic, not in the default set:
                           what the text encoder's part of a LoRA step costs)
  references  forward      UNet forward alone, no grad
              floor        UNet forward + backward to the noisy latents, every weight frozen:
                           each method needs at least this backward, so none can beat it
              floor-text   floor plus a text-encoder forward (no grad), as LoRA/LiDB steps
                           also run the text encoder (they backpropagate through it, too)

A method step is the library's own: one noise image -> prepare_subject (VAE-encoded once,
cached, not timed) -> make_method -> train(), whose TrainResult.step_seconds is the wall time
of each optimizer step (zero_grad, loss, backward, clipping, AdamW). The first --warmup steps
are dropped and the median of the rest is the configuration's time; with --repeats the runs
are interleaved and the median of the per-run medians is reported.

Each run is its own child process (one at a time: DreamBooth at 512 px needs ~20 GB), so
its ru_maxrss is its peak memory ("peak RSS", whole process: base load, VAE encoding and the
steps). "steps peak" is the peak resident memory during the steps alone (Linux resets the
high-water mark through /proc/self/clear_refs just before the first step).

  .venv/bin/python benchmarks/step_time.py --bases tiny-random sd15-arch --resolutions 256 512 \
      --methods dreambooth lora-r1 lora-r4 lidb --steps 5 --precision fp32 \
      --out docs/step_time.json --markdown
  .venv/bin/python benchmarks/step_time.py --from-json docs/step_time.json --markdown

tiny-random always runs at its own 32 px; --resolutions applies to the other bases.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hyperbooth.machine import GB, KIB, machine_info, meminfo_gb

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL import Image

    from hyperbooth.adapters.config import AdapterConfig
    from hyperbooth.bases import Base
    from hyperbooth.methods import SubjectData
    from hyperbooth.training import TrainConfig

METHODS = {
    "dreambooth": "DreamBooth (full UNet, AdamW)",
    "lora-r1": "LoRA r=1",
    "lora-r4": "LoRA r=4",
    "lidb": "LiDB a=100 b=50 r=1",
    "lora-r1-unet": "LoRA r=1, UNet attention only",
}
DEFAULT_METHODS = ["dreambooth", "lora-r1", "lora-r4", "lidb"]
REFERENCES = {
    "forward": "reference: UNet forward, no grad",
    "floor": "reference: floor (UNet fwd+bwd to latents)",
    "floor-text": "reference: floor + text-encoder forward",
}
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # --precision -> TrainConfig.mixed_precision
TINY_RANDOM = "tiny-random"  # hyperbooth.bases.TINY_RANDOM (not imported: the parent stays light)
NATIVE = "native"  # --resolutions does not apply: the base's own size (tiny-random's 32 px)

# Targets: (what, reference, factor): median step of `what` <= factor x median step of reference.
TARGETS = (
    ("lidb", "floor", 1.15),
    ("lora-r1", "dreambooth", 0.9),
    ("lora-r4", "dreambooth", 0.9),
    ("lidb", "dreambooth", 0.9),
)

RESULT_MARKER = "STEP_TIME_RESULT "  # a child's one result line on stdout


# -- the child: one configuration, one process ----------------------------------------------
# torch and hyperbooth's modelling code are imported inside the child's functions only (the
# parent imports just the stdlib-only hyperbooth.machine): the parent stays a small process
# that neither competes with a child for memory nor adds to what it inherits.
def noise_image(resolution: int, seed: int) -> Image.Image:
    """A random-noise RGB image resolution x resolution (the VAE encodes it at that size)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (resolution, resolution, 3), np.uint8)
    return Image.fromarray(pixels, "RGB")


def adapter_config(what: str) -> AdapterConfig:
    """The AdapterConfig of an adapter method (default layer set, METHOD 3.1 sizes for LiDB)."""
    from hyperbooth.adapters.config import AdapterConfig

    if what == "lidb":
        return AdapterConfig(kind="lidb", rank=1, lidb_a=100, lidb_b=50)
    rank = int(what.removeprefix("lora-r").removesuffix("-unet"))
    if what.endswith("-unet"):
        return AdapterConfig(kind="lora", rank=rank, text_encoder_targets=())
    return AdapterConfig(kind="lora", rank=rank)


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (VmHWM); False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def proc_status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB, or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reference_step_seconds(
    what: str, base: Base, data: SubjectData, config: TrainConfig, accelerator: Accelerator
) -> list[float]:
    """Wall time of each step of a reference, drawing the same latents/noise/t as a method step."""
    import torch

    from hyperbooth.diffusion import diffusion_loss, sample_latents
    from hyperbooth.training import autocast, step_generator

    device = accelerator.device
    with torch.no_grad(), autocast(device, config.mixed_precision):
        cached_hidden = base.text_encoder(data.instance_ids)[0]  # (1, 77, dim), as methods cache
    seconds = []
    for step in range(config.steps):
        started = time.perf_counter()
        generator = step_generator(config.seed, step, 0, 0)
        # The draws SubjectMethod.loss makes: image index, latent sample, then noise and t.
        index = torch.randint(0, data.instance_mean.shape[0], (1,), generator=generator)
        latents = sample_latents(data.instance_mean[index], data.instance_std[index], generator)
        if what == "forward":
            with torch.no_grad(), autocast(device, config.mixed_precision):
                loss = diffusion_loss(base.unet, base.scheduler, latents, cached_hidden, generator)
        else:
            # Only the latents require grad, so backward computes input gradients through every
            # UNet layer and no weight gradient: what any method's backward contains.
            latents.requires_grad_(True)
            with autocast(device, config.mixed_precision):
                hidden = cached_hidden
                if what == "floor-text":
                    with torch.no_grad():
                        hidden = base.text_encoder(data.instance_ids)[0]
                loss = diffusion_loss(base.unet, base.scheduler, latents, hidden, generator)
            loss.backward()
        loss.item()
        seconds.append(time.perf_counter() - started)
    return seconds


def run_configuration(spec: dict) -> dict:
    """Set up one configuration, time its steps, and return the measurements."""
    import torch

    torch.set_num_threads(spec["threads"])
    from hyperbooth.bases import load_base
    from hyperbooth.methods import SubjectConfig, make_method, prepare_subject
    from hyperbooth.training import TrainConfig, make_accelerator, train

    started = time.perf_counter()
    config = TrainConfig(
        steps=spec["steps"], device="cpu", mixed_precision=PRECISIONS[spec["precision"]]
    )
    accelerator = make_accelerator(config)
    base = load_base(spec["base"]).to(accelerator.device)
    resolution = spec["resolution"] or base.resolution
    what = spec["what"]
    out = {
        **spec,
        "image_side": resolution,
        "latent_side": resolution // base.vae_scale_factor,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "model_parameters": sum(
            p.numel() for m in (base.unet, base.text_encoder, base.vae) for p in m.parameters()
        ),
    }
    with tempfile.TemporaryDirectory(prefix="step_time_") as tmp:
        image = noise_image(resolution, seed=0)
        data = prepare_subject(base, SubjectConfig(), [image], accelerator.device, Path(tmp), False)
        if what in METHODS:
            if what == "dreambooth":
                method = make_method("dreambooth", base, SubjectConfig(), data)
            else:
                adapter = adapter_config(what)
                method = make_method(adapter.kind, base, SubjectConfig(), data, adapter)
            trainable = sum(p.numel() for p in method.trainable().values())
            out["trainable_parameters"] = trainable
            # AdamW keeps exp_avg and exp_avg_sq, float32 like the trainable tensors.
            out["adamw_state_gb"] = 2 * 4 * trainable / GB
        out["setup_seconds"] = time.perf_counter() - started
        out["rss_before_steps_gb"] = (proc_status_kib("VmRSS") or 0) * KIB / GB
        steps_peak_known = reset_peak_rss()
        if what in METHODS:
            result = train(method, config, Path(tmp), accelerator, progress=False, save=False)
            step_seconds, out["losses"] = result.step_seconds, result.losses
        else:
            step_seconds = reference_step_seconds(what, base, data, config, accelerator)
    hwm = proc_status_kib("VmHWM")
    out["steps_peak_rss_gb"] = hwm * KIB / GB if steps_peak_known and hwm else None
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB / GB
    out["step_seconds"] = step_seconds
    out["median_s"] = statistics.median(step_seconds[spec["warmup"] :])
    out["total_seconds"] = time.perf_counter() - started
    return out


def child_main(spec_json: str) -> None:
    """Entry point of a child: one JSON result line on stdout."""
    print(RESULT_MARKER + json.dumps(run_configuration(json.loads(spec_json))), flush=True)


# -- the parent: plan, run children one at a time, aggregate, report -------------------------
def plan(args: argparse.Namespace) -> list[dict]:
    """One spec per configuration, in report order (a repeat runs them all once)."""
    specs = []
    for base in args.bases:
        resolutions = [None] if base == TINY_RANDOM else args.resolutions
        for resolution in resolutions:
            for precision in args.precision:
                for what in [*args.methods, *args.references]:
                    specs.append(
                        {
                            "base": base,
                            "resolution": resolution,
                            "precision": precision,
                            "what": what,
                            "steps": args.steps,
                            "warmup": args.warmup,
                            "threads": args.threads,
                        }
                    )
    return specs


def run_child(spec: dict) -> dict:
    """Run one configuration in a fresh process and return its result (or its error)."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["HF_HUB_OFFLINE"] = "1"  # built-in bases only; never wait for a network
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    # Other work shrinking the free memory explains a killed child or a slow (swapping) one.
    available = {"mem_available_gb_before": meminfo_gb("MemAvailable")}
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in process.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return {**json.loads(line.removeprefix(RESULT_MARKER)), **available}
    stderr = [line for line in process.stderr.splitlines() if line.strip()]
    if process.returncode < 0:
        name = signal.Signals(-process.returncode).name
        hint = " (out of memory? check dmesg)" if name == "SIGKILL" else ""
        error = f"child killed by {name}{hint}"
    else:
        last = stderr[-1].strip() if stderr else "no output"
        error = f"child exited with {process.returncode}: {last[:300]}"
    return {**spec, "error": error, "stderr_tail": stderr[-20:], **available}


def group_key(run: dict) -> tuple:
    """(base, resolution, precision): the runs whose times are compared with each other."""
    return (run["base"], run["resolution"] or NATIVE, run["precision"])


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per configuration: median of step medians, max peaks, ratios to references."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        row = rows.setdefault(
            (*group_key(run), run["what"]),
            {
                "base": run["base"],
                "resolution": run["resolution"] or NATIVE,
                "image_side": run["resolution"],
                "precision": run["precision"],
                "what": run["what"],
                "label": {**METHODS, **REFERENCES}[run["what"]],
                "step_medians": [],
                "errors": [],
            },
        )
        if "error" in run:
            row["errors"].append(run["error"])
            continue
        row["step_medians"].append(run["median_s"])
        for field in ("peak_rss_gb", "steps_peak_rss_gb"):
            if run.get(field) is not None:
                row[field] = max(row.get(field, 0.0), run[field])
        for field in ("trainable_parameters", "image_side", "latent_side"):
            if field in run:
                row[field] = run[field]
    for row in rows.values():
        medians = row["step_medians"]
        row["median_s"] = statistics.median(medians) if medians else None
    for row in rows.values():
        for reference in ("floor", "floor-text", "dreambooth"):
            other = rows.get((row["base"], row["resolution"], row["precision"], reference))
            ratio = None
            if other and row["median_s"] and other["median_s"]:
                ratio = row["median_s"] / other["median_s"]
            row[f"x_{reference.replace('-', '_')}"] = ratio
    return list(rows.values())


def resolution_label(row: dict) -> str:
    """The image side as "512 px"; "native" for a base at its own size that failed to report it."""
    side = row.get("image_side") or row.get("resolution")
    return f"{side} px" if isinstance(side, int) else NATIVE


def target_lines(rows: list[dict]) -> list[str]:
    """PASS/FAIL (or n/a) for each target in each (base, resolution, precision)."""
    by_key = {(r["base"], r["resolution"], r["precision"], r["what"]): r for r in rows}
    groups = {(r["base"], r["resolution"], r["precision"]): r for r in rows}
    lines = []
    for group, row in groups.items():
        where = f"{row['base']} {resolution_label(row)} {row['precision']}"
        for what, reference, factor in TARGETS:
            mine, theirs = by_key.get((*group, what)), by_key.get((*group, reference))
            if not mine or not theirs or not mine["median_s"] or not theirs["median_s"]:
                missing = what if not mine or not mine["median_s"] else reference
                lines.append(
                    f"n/a   {where}: {what} <= {factor} x {reference} ({missing} not measured)"
                )
                continue
            ratio = mine["median_s"] / theirs["median_s"]
            verdict = "PASS" if ratio <= factor else "FAIL"
            lines.append(
                f"{verdict}  {where}: {what} {mine['median_s']:.3f} s <= {factor} x {reference} "
                f"{theirs['median_s']:.3f} s  (ratio {ratio:.2f})"
            )
            if what == "lidb" and reference == "floor":
                text = by_key.get((*group, "floor-text"))
                if text and text["median_s"]:
                    lines[-1] += f"; vs floor-text {mine['median_s'] / text['median_s']:.2f}"
    return lines


def markdown(report: dict) -> str:
    """The table for docs/BENCHMARKS.md, with the machine and the exact command above it."""
    machine = report["machine"]
    amx = ", ".join(machine["amx_flags"]) or "no AMX"
    lines = [
        f"Machine: {machine['cpu']}, {machine['usable_cores']} cores ({machine['threads']} torch "
        f"threads), {machine['memory_gb']:.0f} GB, {amx}; torch {machine['versions']['torch']}; "
        f"batch 1, median of {report['settings']['steps'] - report['settings']['warmup']} steps "
        f"after {report['settings']['warmup']} warm-up, {report['settings']['repeats']} repeat(s).",
        "",
        f"`{report['command']}`",
        "",
        "| base | resolution | precision | what | median s/step | x floor | x dreambooth "
        "| peak RSS GB | steps peak GB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in report["results"]:
        resolution = resolution_label(row)
        if row["median_s"] is None:
            lines.append(
                f"| {row['base']} | {resolution} | {row['precision']} | {row['label']} "
                f"| failed: {row['errors'][0]} | | | | |"
            )
            continue
        lines.append(
            f"| {row['base']} | {resolution} | {row['precision']} | {row['label']} "
            f"| {number(row['median_s'], 3)} | {number(row['x_floor'], 2)} "
            f"| {number(row['x_dreambooth'], 2)} | {number(row.get('peak_rss_gb'), 2)} "
            f"| {number(row.get('steps_peak_rss_gb'), 2)} |"
        )
    return "\n".join(lines)


def write_json(report: dict, path: Path) -> None:
    """Write the report atomically (it is rewritten after every child, so a crash keeps it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def describe(run: dict) -> str:
    """One progress line for a finished child."""
    where = f"{run['base']} {resolution_label(run)} {run['precision']} {run['what']}"
    if "error" in run:
        return f"{where}: FAILED {run['error']}"
    steps_peak = run.get("steps_peak_rss_gb")
    return (
        f"{where}: {run['median_s']:.3f} s/step, peak RSS {run['peak_rss_gb']:.2f} GB"
        f"{'' if steps_peak is None else f' (steps {steps_peak:.2f})'}, "
        f"setup {run['setup_seconds']:.0f} s, total {run['total_seconds']:.0f} s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description="Median seconds per training step and peak memory of DreamBooth, LoRA and "
        "LiDB against the UNet floor, one child process per configuration.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--bases",
        nargs="+",
        default=["tiny-random", "sd15-arch"],
        help="built-in bases or diffusers folders",
    )
    parser.add_argument(
        "--resolutions",
        nargs="+",
        type=int,
        default=[256, 512],
        help="image sides in px for bases other than tiny-random (which runs at its 32 px)",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=list(METHODS),
        default=DEFAULT_METHODS,
        help="methods to time; give the flag alone for none",
    )
    parser.add_argument(
        "--references",
        nargs="*",
        choices=list(REFERENCES),
        default=list(REFERENCES),
        help="reference measurements; give the flag alone for none",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=list(PRECISIONS),
        default=["fp32"],
        help="fp32, or bf16 autocast (trainable tensors stay float32)",
    )
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration, interleaved"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch (and OMP/MKL) threads in each child; the default is every usable core",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--markdown", action="store_true", help="print the markdown table")
    parser.add_argument(
        "--from-json", type=Path, help="report on an earlier --out file instead of running"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup or args.warmup < 0:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) >= 0")
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    if not args.methods and not args.references:
        parser.error("nothing to measure: give --methods or --references")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every configuration (or load --from-json), then print targets and the table."""
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    if args.from_json:
        report = json.loads(args.from_json.read_text())
    else:
        specs = plan(args)
        report = {
            "command": shlex.join(["python", *sys.argv]),
            "machine": machine_info(args.threads),
            "settings": {
                "steps": args.steps,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "threads": args.threads,
                "batch_size": 1,
            },
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "runs": [],
            "results": [],
        }
        started = time.perf_counter()
        total = len(specs) * args.repeats
        print(f"{total} runs, one child process at a time", file=sys.stderr)
        for repeat in range(args.repeats):
            for spec in specs:
                run = run_child({**spec, "repeat": repeat})
                report["runs"].append(run)
                report["results"] = aggregate(report["runs"])
                report["wall_seconds"] = time.perf_counter() - started
                if args.out:
                    write_json(report, args.out)
                done, elapsed = len(report["runs"]), report["wall_seconds"]
                print(f"[{done}/{total} {elapsed:.0f} s] {describe(run)}", file=sys.stderr)
        report["machine"]["load_average_at_end"] = os.getloadavg()
        report["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        if args.out:
            write_json(report, args.out)
    print("\n".join(target_lines(report["results"])))
    if args.markdown:
        print()
        print(markdown(report))


if __name__ == "__main__":
    main()
