"""Where a HyperDreamBooth fit's time goes on `mini`: one quiet 1-thread profile.

    OMP_NUM_THREADS=1 python benchmarks/personalize_profile.py [--steps 20 --batch-size 2]

Personalises the demo's reference with the shipped hypernetwork (a warm-up fit first), times
one fit by stage, then prints cProfile's top entries by cumulative time for a third fit. Each
fit runs on a fresh copy of the base, as the evaluation harness does.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hyperbooth.errors import run_module


def main(argv: list[str] | None = None) -> None:
    """Time one fit by stage and profile another."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1.5e-2)
    parser.add_argument("--mask-weight", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from hyperbooth.bases import load_base
    from hyperbooth.demo import REFERENCE_IMAGE, REFERENCE_MASK
    from hyperbooth.hypernet.model import load_hypernet
    from hyperbooth.hypernet.personalize import PersonalizeConfig, personalize

    base, hypernet = load_base("mini"), load_hypernet("mini")
    image = Image.open(REFERENCE_IMAGE).convert("RGB")
    mask = np.asarray(Image.open(REFERENCE_MASK).convert("L"), dtype=np.float32) / 255
    config = PersonalizeConfig(
        rank=4, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, mask_weight=args.mask_weight,
        unet_targets=(r".*resnets\.\d+\.conv[12]",), text_encoder_targets=(),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "subject.safetensors"
        personalize(copy.deepcopy(base), hypernet, image, out, config, mask=mask)  # warm-up
        fresh = copy.deepcopy(base)
        started = time.perf_counter()
        result = personalize(fresh, hypernet, image, out, config, mask=mask)
        print(f"total {time.perf_counter() - started:.3f} s, by stage {result.seconds}")
        fresh = copy.deepcopy(base)
        profile = cProfile.Profile()
        profile.enable()
        personalize(fresh, hypernet, image, out, config, mask=mask)
        profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    run_module(main, "benchmarks/personalize_profile.py")
