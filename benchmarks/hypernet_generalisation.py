"""Does a hypernetwork's prediction fit the identity it was shown, on identities it never saw?

The hypernetwork's diffusion term (METHOD 3.2: the frozen base with the predicted LiDB,
denoising the reference image under the loss prompt), measured without training, on the first
N of its training identities and on N held-out identities rendered in the same reference
context, with three predictions each:

- matched: the LiDB predicted from the image being denoised (what training optimises);
- shuffled: the LiDB predicted from another identity's image (each batch rolled by one), so
  matched against shuffled is what the prediction knows about *this* face;
- zero: no LiDB (the base), so zero against shuffled is what it learnt about every reference
  photo (its plain background, style and framing) rather than about anyone.

Every variant sees the same identities, noise and timesteps (batch b uses seed b).
A train/held-out gap in `matched` would mean more identities are the lever.

    python benchmarks/hypernet_generalisation.py --hypernet mini --images runs/hdb/images \
        --out docs/mini_hypernet_generalisation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn


class _Variant(nn.Module):
    """The hypernetwork's keys and config, with its predictions shuffled or zeroed."""

    def __init__(self, hypernet: nn.Module, kind: str):
        super().__init__()
        self.hypernet, self.kind = hypernet, kind
        self.keys, self.config = hypernet.keys, hypernet.config

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wrapped prediction, from rolled images (shuffled) or zeroed (zero)."""
        if self.kind == "shuffled":
            return self.hypernet(pixels.roll(1, 0))
        predicted = self.hypernet(pixels)
        return predicted if self.kind == "matched" else {k: 0 * v for k, v in predicted.items()}


def diffusion_terms(base, hypernet, images, batches: int, batch: int, max_timestep) -> dict:
    """Mean diffusion term of each variant over `batches` seeded batches of these images."""
    from hyperbooth.hypernet.train import HyperLossConfig, HyperNetTraining, IdentitySet
    from hyperbooth.images import to_tensor
    from hyperbooth.methods.common import encode_images
    from hyperbooth.training import StepBatch

    pixels = torch.stack([to_tensor(p) for p in images])
    mean, std = encode_images(base, images, torch.device("cpu"))
    with torch.no_grad():
        shapes = {k: v.shape[1:] for k, v in hypernet(pixels[:1]).items()}
    targets = {k: torch.zeros(len(images), *s) for k, s in shapes.items()}  # weight term unused
    data = IdentitySet([str(i) for i in range(len(images))], pixels, mean, std, targets)
    out = {}
    for kind in ("matched", "shuffled", "zero"):
        method = HyperNetTraining(
            base,
            _Variant(hypernet, kind),
            data,
            HyperLossConfig(alpha=1.0, beta=0.0, max_timestep=max_timestep),
            batch,
        )
        with torch.no_grad():
            terms = []
            for b in range(batches):
                method.loss(StepBatch(torch.Generator().manual_seed(b), batch))
                terms.append(method.log[-1]["diffusion"])
        method.adapter.remove()
        out[kind] = sum(terms) / len(terms)
    return out


def main() -> None:
    """Measure both identity sets and write the JSON."""
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import load_hypernet
    from hyperbooth.images import load_image
    from hyperbooth.miniworld.evaluate import REFERENCE_CONTEXT, held_out_identities
    from hyperbooth.miniworld.render import render

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hypernet", required=True, help="a hypernet folder, or mini")
    parser.add_argument("--images", required=True, help="its training images (id*.png)")
    parser.add_argument("--base", default="mini")
    parser.add_argument("--identities", type=int, default=256, help="per set")
    parser.add_argument("--batches", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-timestep", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base(args.base)
    hypernet = load_hypernet(args.hypernet).float().eval()
    files = sorted(Path(args.images).glob("id*.png"))[: args.identities]
    if len(files) < args.identities:
        raise SystemExit(f"{args.images} has {len(files)} id*.png images; need {args.identities}")
    size = base.resolution
    sets = {
        "training": [load_image(path, size) for path in files],
        # Seed 7, not the evaluation's 0: these are not the 20 identities of the tables.
        "held_out": [
            render(identity, REFERENCE_CONTEXT, k)
            for k, identity in enumerate(held_out_identities(args.identities, seed=7))
        ],
    }
    report = {
        "command": "python benchmarks/hypernet_generalisation.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "diffusion_term": {
            name: diffusion_terms(
                base, hypernet, images, args.batches, args.batch_size, args.max_timestep
            )
            for name, images in sets.items()
        },
    }
    report["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["diffusion_term"], indent=2))


if __name__ == "__main__":
    main()
