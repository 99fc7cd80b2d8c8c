"""`hyperbooth demo`: personalise a built-in base end to end and write a picture.

Until the miniature world ships a trained base, the demo runs on `tiny-random`, whose weights
are random: every stage runs for real, but the pictures are noise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.bases import load_base
from hyperbooth.generate import generate_images, image_grid
from hyperbooth.images import save_png
from hyperbooth.methods import SubjectConfig, personalise
from hyperbooth.training import TrainConfig

DEMO_BASE = "tiny-random"
DEMO_PROMPTS = (
    "a sks face",
    "a sks face wearing a hat",
    "a sks face as a pencil sketch",
    "a sks face on a red background",
)


def reference_face(size: int = 64) -> Image.Image:
    """A simple drawn face, the demo's subject (deterministic)."""
    image = Image.new("RGB", (size, size), (120, 170, 220))
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.ellipse((16 * s, 8 * s, 48 * s, 56 * s), fill=(238, 196, 160))
    draw.ellipse((16 * s, 4 * s, 48 * s, 24 * s), fill=(120, 60, 20))
    for x in (24, 36):
        draw.ellipse((x * s, 26 * s, (x + 5) * s, 31 * s), fill=(40, 90, 160))
    draw.arc(
        (24 * s, 34 * s, 40 * s, 48 * s), 20, 160, fill=(150, 40, 40), width=max(1, int(2 * s))
    )
    return image


def run_demo(out_dir: Path, steps: int = 60) -> dict:
    """Load, personalise with LiDB, generate, and report time per stage and adapter size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    started = time.perf_counter()
    base = load_base(DEMO_BASE)
    times["load"] = time.perf_counter() - started

    reference = reference_face().resize((base.resolution,) * 2, Image.Resampling.LANCZOS)
    save_png(reference, out_dir / "reference.png")
    adapter = AdapterConfig(kind="lidb")
    result = personalise(
        base,
        [reference],
        out_dir,
        "lidb",
        SubjectConfig(token="sks", class_name="face"),
        adapter,
        TrainConfig(steps=steps, device="cpu"),
    )
    times["personalise"] = result.seconds

    started = time.perf_counter()
    rows = generate_images(base, list(DEMO_PROMPTS), n=3, seed=0, steps=20)
    times["generate"] = time.perf_counter() - started
    grid = out_dir / "grid.png"
    save_png(image_grid(rows, labels=list(DEMO_PROMPTS), cell=96, reference=reference), grid)

    report = {
        "base": DEMO_BASE,
        "method": "lidb",
        "adapter_file": str(result.output),
        "adapter_bytes": result.output.stat().st_size,
        "trainable_parameters": sum(t.numel() for t in result_tensors(result.output)),
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "grid": str(grid),
        "note": "tiny-random has random weights: the pipeline is real, the pictures are noise",
    }
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    print()
    print(f"demo on {DEMO_BASE} (random weights: the pictures are noise, the pipeline is real)")
    for stage, seconds in report["seconds"].items():
        print(f"  {stage:<12} {seconds:8.2f} s")
    print(
        f"  adapter      {report['adapter_bytes']:,} bytes, {report['trainable_parameters']:,} numbers"
    )
    print(f"  grid         {grid} (reference, then the subject in {len(DEMO_PROMPTS)} prompts)")
    return report


def result_tensors(path: Path) -> list:
    """The tensors stored in an adapter file."""
    from safetensors.torch import load_file

    return list(load_file(str(path)).values())
