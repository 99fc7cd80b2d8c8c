"""Does switching a personal adapter on only for the later, low-noise sampling steps keep the
prompt's context without losing the subject? A diagnostic on the miniature world.

Fits one LoRA per held-out identity (the evaluate personalisation protocol: one reference render,
the same prompts, seeds and judges), then generates the evaluation prompts with the adapter at
full strength only while the timestep is below each switch point (1000 = always on), for each
guidance scale. Prints and writes identity / hidden / prompt scores and, per context attribute,
how often the judge reads what the prompt asked for.

python benchmarks/adapter_schedule.py --identities 2 --switch 1000 800 600 400 \\
    --guidance 7.5 --out runs/schedule/lora16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.atomic import write_text
from hyperbooth.bases import load_base
from hyperbooth.generate import generate_images
from hyperbooth.methods import SubjectConfig, personalise
from hyperbooth.miniworld.evaluate import (
    EVALUATION_CONTEXTS,
    REFERENCE_CONTEXT,
    TOKEN,
    context_indices,
    held_out_identities,
    subject_prompt,
)
from hyperbooth.miniworld.judges import Judge, identity_score, prompt_score
from hyperbooth.miniworld.render import TRAITS, render
from hyperbooth.training import TrainConfig


def score(judge: Judge, identity: object, rows: list[list]) -> dict:
    """Identity, hidden and prompt scores plus per-attribute prompt hits."""
    ident, hidden, prompt, hits, traits = [], [], [], defaultdict(list), defaultdict(list)
    per_prompt = defaultdict(list)
    for names, images in zip(EVALUATION_CONTEXTS, rows, strict=True):
        asked = context_indices(names)
        for reading in judge.read(images):
            total, hidden_share = identity_score(identity, reading.identity)
            per_prompt[", ".join(names.values())].append(total)
            ident.append(total)
            hidden.append(hidden_share)
            prompt.append(prompt_score(asked, reading.context))
            for name in TRAITS:
                traits[name].append(getattr(reading.identity, name) == getattr(identity, name))
            for name, value in asked.items():
                hits[name].append(getattr(reading.context, name) == value)
    every = [h for values in hits.values() for h in values]
    return {
        "identity": float(np.mean(ident)),
        "hidden": float(np.mean(hidden)),
        "prompt": float(np.mean(prompt)),
        "prompt_attributes": float(np.mean(every)),
        "per_attribute": {name: float(np.mean(v)) for name, v in hits.items()},
        "per_trait": {name: float(np.mean(v)) for name, v in traits.items()},
        "identity_per_prompt": {name: float(np.mean(v)) for name, v in per_prompt.items()},
    }


def main() -> None:
    """Fit, generate under each schedule, score, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="mini")
    parser.add_argument("--identities", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--unet-targets", nargs="+", default=[r".*resnets\.\d+\.conv[12]"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--max-timestep", type=int, default=None, help="fit only below this timestep"
    )
    parser.add_argument("--switch", type=int, nargs="+", default=[1000, 800, 600, 400])
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.5])
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, judge = load_base(args.base), Judge.load()
    prompts = [subject_prompt(names, TOKEN) for names in EVALUATION_CONTEXTS]
    adapter = AdapterConfig(kind="lora", rank=args.rank, unet_targets=tuple(args.unet_targets))
    results: dict[str, list] = defaultdict(list)
    started = time.perf_counter()
    for index, identity in enumerate(held_out_identities(args.identities, 0)):
        reference = render(identity, REFERENCE_CONTEXT, index)
        subject = copy.deepcopy(base)
        with tempfile.TemporaryDirectory() as out:
            personalise(
                subject, [reference], out, "lora", SubjectConfig(token=TOKEN, class_name="face", max_timestep=args.max_timestep),
                adapter, TrainConfig(steps=args.steps, learning_rate=args.learning_rate,
                                     seed=0, device="cpu"),
                progress=False, train_text_encoder=False,
            )  # fmt: skip
        for guidance in args.guidance:
            for switch in args.switch:
                rows = generate_images(
                    subject, prompts, n=args.images_per_prompt, seed=1000, steps=20,
                    guidance=guidance, batch_size=8, progress=False,
                    adapter_below=switch if switch < 1000 else None,
                )  # fmt: skip
                results[f"guidance {guidance}, switch {switch}"].append(
                    score(judge, identity, rows)
                )
        print(f"identity {index + 1}/{args.identities} done, {time.perf_counter() - started:.0f} s")
    summary = {}
    for key, rows in results.items():
        summary[key] = {
            name: float(np.mean([r[name] for r in rows]))
            for name in ("identity", "hidden", "prompt", "prompt_attributes")
        }
        for part in ("per_attribute", "per_trait", "identity_per_prompt"):
            summary[key][part] = {
                name: float(np.mean([r[part][name] for r in rows])) for name in rows[0][part]
            }
        print(key, json.dumps(summary[key]))
    report = {"args": vars(args), "summary": summary, "seconds": time.perf_counter() - started}
    write_text(Path(args.out), json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
