"""Pre-optimisation throughput: identities per hour with K identities per step, and what the
per-sample adapters cost over the frozen model's own forward + backward at the same batch.

For each K this fits the same N identity images (renders of held-out miniature-world faces) for
the same number of steps with `hypernet.precompute.fit_chunk` (the library's own code), K at a
time, and reports identities per hour and the speed-up over K = 1. Beside it, the floor: one
step of the frozen UNet + text encoder at batch K with nothing trainable but the noisy latents
(what any method must at least run); "adapter overhead" is the precompute step over that floor.

  .venv/bin/python benchmarks/precompute_throughput.py --base mini --ks 1 2 4 8 16 \
      --identities 16 --steps 10 --out docs/precompute_throughput.json --markdown
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.bases import load_base
from hyperbooth.diffusion import noised_loss
from hyperbooth.hypernet.precompute import PrecomputeConfig, fit_chunk
from hyperbooth.methods.common import token_ids
from hyperbooth.miniworld.evaluate import REFERENCE_CONTEXT, held_out_identities
from hyperbooth.miniworld.render import render


def floor_step(base, k: int, repeats: int) -> float:
    """Median seconds of a frozen forward + backward at batch k (gradient to the latents only)."""
    size = base.unet.config.sample_size
    latents = torch.randn(k, base.unet.config.in_channels, size, size)
    ids = token_ids(base, "a sks face").expand(k, -1)
    # Precompute backpropagates through the text encoder too (it holds adapters), so the floor
    # does as well: the token embeddings' output is made a leaf that wants a gradient.
    embedding = base.text_encoder.get_input_embeddings()
    hook = embedding.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        noisy = latents.clone().requires_grad_(True)
        hidden = base.text_encoder(ids)[0]
        loss = noised_loss(
            base.unet,
            base.scheduler,
            noisy,
            hidden,
            torch.randn_like(latents),
            torch.randint(0, 1000, (k,)),
            reduce=False,
        ).sum()
        loss.backward()
        times.append(time.perf_counter() - started)
    hook.remove()
    return statistics.median(times[1:])


def main() -> None:
    """Measure every K and write JSON (and a markdown table)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="mini")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/precompute_throughput.json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(args.base)
    config = PrecomputeConfig(adapter=AdapterConfig(kind="lidb"), steps=args.steps)
    with tempfile.TemporaryDirectory() as folder:
        paths, names = [], []
        for i, identity in enumerate(held_out_identities(args.identities)):
            path = Path(folder) / f"identity_{i:03d}.png"
            render(identity, REFERENCE_CONTEXT, i).save(path)
            paths.append(path)
            names.append(path.stem)
        fit_chunk(base, names[:1], paths[:1], PrecomputeConfig(steps=1), torch.device("cpu"))
        rows = []
        for k in args.ks:
            started = time.perf_counter()
            for start in range(0, len(paths), k):
                chunk = slice(start, start + k)
                fit_chunk(base, names[chunk], paths[chunk], config, torch.device("cpu"))
            seconds = time.perf_counter() - started
            step = seconds / (len(range(0, len(paths), k)) * args.steps)
            floor = floor_step(base, k, repeats=3)
            rows.append(
                {
                    "k": k,
                    "seconds": seconds,
                    "identities_per_hour": len(paths) * 3600 / seconds,
                    "step_seconds": step,
                    "floor_step_seconds": floor,
                    "adapter_overhead": step / floor - 1,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    single = next((r for r in rows if r["k"] == 1), None)
    for row in rows:
        row["speedup_over_k1"] = (
            row["identities_per_hour"] / single["identities_per_hour"] if single else None
        )
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "base": args.base,
        "identities": args.identities,
        "steps": args.steps,
        "threads": args.threads,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    if args.markdown:
        print("| K | identities / hour | speed-up over K=1 | step (s) | floor (s) | overhead |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['k']} | {r['identities_per_hour']:.0f} | {r['speedup_over_k1']:.2f}x | "
                f"{r['step_seconds']:.3f} | {r['floor_step_seconds']:.3f} | "
                f"{100 * r['adapter_overhead']:+.0f}% |"
            )


if __name__ == "__main__":
    main()
