"""Seconds per AdamW step over a UNet's weights: torch's CPU default (a loop), foreach, fused.

The numbers behind training.make_adamw. Needs the float32 base folders that
benchmarks/peer_step_time.py writes (runs/peer/bases/<name>):

    .venv/bin/python benchmarks/adamw_step.py --unets runs/peer/bases/mini runs/peer/bases/sd15-arch
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    """Time three optimizer steps per implementation on each UNet's weights (gradients constant)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--unets", nargs="+", required=True, help="diffusers base folders")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for folder in args.unets:
        weights = load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))
        params = [torch.nn.Parameter(value.float()) for value in weights.values()]
        for param in params:
            param.grad = torch.full_like(param, 1e-3)
        count = sum(p.numel() for p in params)
        for mode, options in (
            ("loop", {"foreach": False}),
            ("foreach", {"foreach": True}),
            ("fused", {"fused": True}),
        ):
            optimizer = torch.optim.AdamW(params, lr=1e-4, **options)
            seconds = []
            for _ in range(args.steps):
                started = time.perf_counter()
                optimizer.step()
                seconds.append(time.perf_counter() - started)
            print(f"{folder}: {count / 1e6:.1f}M numbers, {mode}: {[round(s, 3) for s in seconds]}")
            del optimizer


if __name__ == "__main__":
    main()
