"""Time one training step of the mini denoiser under several settings (where the second goes).

python benchmarks/mini_denoiser_step.py --out docs/mini_denoiser_step.json
python benchmarks/mini_denoiser_step.py --compile --out docs/mini_denoiser_step_compile.json
python benchmarks/mini_denoiser_step.py --compile --batch 1 --repeats 30 \
    --out docs/mini_denoiser_step_compile_batch1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch

from hyperbooth.machine import machine_info
from hyperbooth.miniworld.train_base import MiniConfig, build_models


def _time(fn, repeats: int) -> float:
    """Median seconds of fn() after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _step(unet, text, optimizer, latents, ids, precision: str):
    """One forward+backward+AdamW step of the UNet on random inputs, as a closure."""
    timesteps = torch.randint(0, 1000, (len(latents),))

    def step() -> None:
        context = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else nullcontext()
        with context:
            with torch.no_grad():
                hidden = text(ids)[0]
            loss = unet(latents, timesteps, hidden).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _compiled(unet, text, optimizer, config: MiniConfig, repeats: int, batch: int = 32) -> dict:
    """Step times of the eager UNet and of torch.compile's, and the first compiled step's time."""
    latents = torch.randn(batch, config.latent_channels, 16, 16)
    ids = torch.randint(0, 49000, (batch, 77))
    eager = _time(_step(unet, text, optimizer, latents, ids, "fp32"), repeats)
    compiled = _step(torch.compile(unet), text, optimizer, latents, ids, "fp32")
    start = time.perf_counter()
    compiled()
    first = time.perf_counter() - start
    seconds = _time(compiled, repeats)
    results = {
        f"batch{batch}_tokens77_fp32_eager": {
            "seconds": eager,
            "samples_per_second": batch / eager,
        },
        f"batch{batch}_tokens77_fp32_compiled": {
            "seconds": seconds,
            "samples_per_second": batch / seconds,
        },
        "first_compiled_step_seconds": first,
        "torch": torch.__version__,
    }
    print(f"eager {eager:.3f} s, compiled {seconds:.3f} s, first compiled step {first:.0f} s")
    return results


def _settings(unet, text, optimizer, config: MiniConfig, repeats: int) -> dict:
    """Step times per batch size, text length, precision and memory layout."""
    results = {}
    for batch in (32, 64):
        for tokens in (77, 24):
            for precision in ("fp32", "bf16"):
                for layout in ("contiguous", "channels_last"):
                    last = layout == "channels_last"
                    unet.to(memory_format=torch.channels_last if last else torch.contiguous_format)
                    latents = torch.randn(batch, config.latent_channels, 16, 16)
                    if last:
                        latents = latents.to(memory_format=torch.channels_last)
                    ids = torch.randint(0, 49000, (batch, tokens))

                    step = _step(unet, text, optimizer, latents, ids, precision)
                    seconds = _time(step, repeats)
                    key = f"batch{batch}_tokens{tokens}_{precision}_{layout}"
                    results[key] = {"seconds": seconds, "samples_per_second": batch / seconds}
                    print(
                        f"{key:45s} {seconds:.3f} s  {batch / seconds:6.1f} samples/s", flush=True
                    )
    return results


def main() -> None:
    """Print and write step times of the mini UNet (forward+backward+AdamW) per setting."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="instead: fp32 at --batch, eager against torch.compile (inductor), compile time "
        "included",
    )
    parser.add_argument("--batch", type=int, default=32, help="--compile: the batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = MiniConfig()
    base = build_models(config)
    unet, text = base.unet.train(), base.text_encoder.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    if args.compile:
        results = _compiled(unet, text, optimizer, config, args.repeats, args.batch)
    else:
        results = _settings(unet, text, optimizer, config, args.repeats)
    results["machine"] = machine_info(threads=args.threads)
    if args.out:
        results["command"] = "python benchmarks/mini_denoiser_step.py " + " ".join(sys.argv[1:])
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
