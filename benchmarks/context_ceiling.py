"""Per evaluation context of issue 3's personalisation protocol: what could an identity score be?

Two ceilings, on the same held-out identities and contexts as `evaluate personalisation`:
- the judge's identity score on fresh renders of each identity in the context (what a perfect
  picture would score);
- the share of named traits the bare base draws when the prompt names every nameable trait of
  the identity in that context (how well the base can draw a given look there from words alone).

    python benchmarks/context_ceiling.py --guidance 4 --out docs/mini_v5i_context_ceiling_g4.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from hyperbooth.atomic import write_text
from hyperbooth.bases import load_base
from hyperbooth.generate import generate_images
from hyperbooth.machine import machine_info
from hyperbooth.miniworld.captions import prompt_for
from hyperbooth.miniworld.evaluate import (
    EVALUATION_CONTEXTS,
    REFERENCE_CONTEXT,
    context_indices,
    held_out_identities,
)
from hyperbooth.miniworld.judges import Judge, identity_score
from hyperbooth.miniworld.render import NAMEABLE_TRAITS, Context, Identity, render

BALD = "bald"


def named_traits(identity: Identity) -> dict[str, int]:
    """Every nameable trait of the identity (hair colour left out for a bald face)."""
    traits = {name: getattr(identity, name) for name in NAMEABLE_TRAITS}
    if identity.names()["hair_style"] == BALD:
        traits.pop("hair_colour")
    return traits


def main(argv: list[str] | None = None) -> None:
    """Write the two ceilings per context as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="mini")
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    judge, base = Judge.load(), load_base(args.base)
    identities = held_out_identities(args.identities)
    contexts = {"reference": REFERENCE_CONTEXT.as_dict()}
    contexts |= {", ".join(c.values()): context_indices(c) for c in EVALUATION_CONTEXTS}
    rows = {}
    for name, context in contexts.items():
        full = Context(**{**REFERENCE_CONTEXT.as_dict(), **context})
        renders = [render(identity, full, 500 + k) for k, identity in enumerate(identities)]
        readings = judge.read(renders)
        on_renders = [
            identity_score(i, r.identity)[0] for i, r in zip(identities, readings, strict=True)
        ]
        prompts = [prompt_for(context, named_traits(identity)) for identity in identities]
        images = generate_images(
            base, prompts, n=2, seed=1000, steps=20, guidance=args.guidance, batch_size=8,
            progress=False,
        )  # fmt: skip
        hits = [
            getattr(reading.identity, trait) == value
            for identity, row in zip(identities, images, strict=True)
            for reading in judge.read(row)
            for trait, value in named_traits(identity).items()
        ]
        rows[name] = {
            "judge_identity_on_renders": float(np.mean(on_renders)),
            "base_named_traits_shown": float(np.mean(hits)),
            "example_prompt": prompts[0],
        }
        print(name, rows[name], flush=True)
    report = {
        "contexts": rows,
        "command": " ".join(["python benchmarks/context_ceiling.py", *sys.argv[1:]]),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(args.threads),
    }
    write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
