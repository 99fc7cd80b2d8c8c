"""How a hypernetwork's predicted weight change compares with a LiDB fitted to the same image.

For N held-out identities of the miniature world (the evaluation's references), this fits a LiDB
to each reference with the hypernetwork's own adapter settings (layers, rank, a, b), the
shipped recipe's pre-optimisation steps and rate, and the loss prompt, then compares the two
dense weight changes (every adapted layer's scale * up @ down, concatenated):

- norms: how large the prediction is against a fitted LiDB;
- similarity across identities: mean cosine between two identities' predictions (or fits); near
  1 means the weight change is the same whatever the face;
- identity-specific parts: each minus the mean over the N identities, their norms and the
  cosine between an identity's prediction and its own fit;
- a second fit of each image with other noise (seed + 1000): the cosine between the two fits is
  the most any prediction from the image alone can reach.

    python benchmarks/hypernet_prediction_geometry.py --hypernet mini --identities 8 \
        --out docs/mini_hypernet_prediction_geometry.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.functional import cosine_similarity

from hyperbooth.errors import HyperboothError, run_module

REFIT_SEED = 1000  # a second fit of each image draws other noise: how much of a fit is the image


def dense(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """An adapter's dense weight change over its layers (materialized factors), flattened."""
    return torch.cat(
        [(up.flatten(1) @ down.flatten(1)).flatten() for _, (down, up) in sorted(factors.items())]
    )


def mean_cross_cosine(rows: torch.Tensor) -> float:
    """Mean cosine between different rows."""
    pairs = cosine_similarity(rows[:, None], rows[None], dim=-1)
    return pairs[~torch.eye(len(rows), dtype=torch.bool)].mean().item()


def geometry(predicted: torch.Tensor, fitted: torch.Tensor, refitted: torch.Tensor) -> dict:
    """The comparison of N predictions with N fits and N refits (rows in identity order)."""
    centred_p = predicted - predicted.mean(0)
    centred_f = fitted - fitted.mean(0)
    centred_r = refitted - refitted.mean(0)
    return {
        "cosine_fit_vs_refit": cosine_similarity(fitted, refitted).tolist(),
        "cosine_identity_parts_fit_vs_refit": cosine_similarity(centred_f, centred_r).tolist(),
        "norm_predicted": predicted.norm(dim=1).mean().item(),
        "norm_fitted": fitted.norm(dim=1).mean().item(),
        "cosine_predicted_vs_own_fit": cosine_similarity(predicted, fitted).tolist(),
        "cosine_between_identities_predicted": mean_cross_cosine(predicted),
        "cosine_between_identities_fitted": mean_cross_cosine(fitted),
        "norm_identity_part_predicted": centred_p.norm(dim=1).mean().item(),
        "norm_identity_part_fitted": centred_f.norm(dim=1).mean().item(),
        "cosine_identity_parts": cosine_similarity(centred_p, centred_f).tolist(),
    }


def main() -> None:
    """Fit, predict, compare, write the JSON."""
    from hyperbooth.adapters.files import read_adapter
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import load_hypernet
    from hyperbooth.hypernet.personalize import predict
    from hyperbooth.hypernet.train import HyperLossConfig
    from hyperbooth.machine import machine_info
    from hyperbooth.methods import SubjectConfig, personalise
    from hyperbooth.miniworld.evaluate import REFERENCE_CONTEXT, held_out_identities
    from hyperbooth.miniworld.render import render
    from hyperbooth.miniworld.train_hypernet import HypernetRecipe
    from hyperbooth.training import TrainConfig

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hypernet", required=True, help="a hypernet folder, or mini")
    parser.add_argument("--base", default="mini")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--steps", type=int, default=HypernetRecipe.precompute_steps)
    parser.add_argument("--learning-rate", type=float, default=HypernetRecipe.precompute_lr)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.identities < 2:
        raise HyperboothError("--identities must be at least 2: the identity parts need a mean")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = load_base(args.base)
    hypernet = load_hypernet(args.hypernet).float().eval()
    predicted, fitted, refitted = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for index, identity in enumerate(held_out_identities(args.identities, 0)):
            image = render(identity, REFERENCE_CONTEXT, index)
            prediction = predict(base, hypernet, image)
            predicted.append(dense(prediction.materialize()))
            prediction.remove()
            for seed, into in ((index, fitted), (REFIT_SEED + index, refitted)):
                result = personalise(
                    copy.deepcopy(base),  # the fit stays on the copy, as in benchmark.run_cell
                    [image],
                    Path(work) / f"{index}_{seed}",
                    "lidb",
                    SubjectConfig(instance_prompt=HyperLossConfig.prompt),
                    hypernet.config.adapter,
                    TrainConfig(steps=args.steps, learning_rate=args.learning_rate, seed=seed),
                    progress=False,
                )
                into.append(dense(read_adapter(result.output).materialize()))
    report = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(),
        "settings": vars(args),
        "geometry": geometry(*(torch.stack(rows) for rows in (predicted, fitted, refitted))),
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["geometry"], indent=2))


if __name__ == "__main__":
    run_module(main, "hypernet_prediction_geometry.py")
