"""Diagnostic: would the hypernetwork learn a likeness if it could read every trait perfectly?

The encoder here is the miniature world's own identity judge, frozen (its last hidden layer and
its trait probabilities, as one token). It is the scorer, so a hypernetwork that sees through
it is never a result to ship or report as the method's; it bounds what a better encoder
could give. If the prediction stays near the base even with perfect sight, what holds it back
is what it is taught, not what it sees.

The same goes for any network of the judge's format, e.g. one trained on other renders with
another seed (`python -m hyperbooth.miniworld.judges --out DIR --config CONFIG`): encoder name
`judge:DIR`. That one is not the scorer, only trained like it: the miniature world's analogue
of a face-recognition backbone, and the library's trait encoder (`mini-traits`, or any such
folder by path: hyperbooth.miniworld.trait_encoder) is one; this script predates it.

Two verbs run the library's own commands in this process with the encoder names `mini-judge`
and `judge:DIR` registered (they exist only while this script runs):

    # train: the mini hypernetwork recipe, with {"encoder": "mini-judge"} in the --config JSON
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        benchmarks/hypernet_judge_encoder.py train --work runs/hdj --out runs/hdj/export \\
        --config runs/hdj/recipe_overrides.json
    # evaluate: hyperbooth.miniworld.evaluate's arguments, --hypernet runs/hdj/export
    python benchmarks/hypernet_judge_encoder.py evaluate personalisation --base mini \\
        --method hyperdreambooth --hypernet runs/hdj/export --hypernet-only ... --out FILE
"""

from __future__ import annotations

import sys
from dataclasses import replace

from torch import nn

from hyperbooth.errors import run_module

NAME = "mini-judge"  # the shipped judge; "judge:DIR" is the judge-format network in DIR


def register() -> None:
    """Make HyperNetwork read through the judge-format network that `mini-judge` / `judge:DIR` name.

    The library takes such a folder by path already (hyperbooth.miniworld.trait_encoder); the
    names only keep the scorer out of the library's vocabulary and old commands working.
    """
    import hyperbooth.hypernet.model as model
    from hyperbooth.miniworld.judges import DEFAULT_JUDGE

    original = model.build_encoder

    def build_encoder(config: model.HyperNetConfig) -> tuple[nn.Module, int]:
        if config.encoder == NAME:
            return original(replace(config, encoder=str(DEFAULT_JUDGE)))
        if config.encoder.startswith("judge:"):
            return original(replace(config, encoder=config.encoder.removeprefix("judge:")))
        return original(config)

    model.build_encoder = build_encoder


def main(argv: list[str] | None = None) -> None:
    """`train ARGS` (the mini recipe) or `evaluate ARGS` (the evaluation) with the judge encoder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate"):
        print(__doc__)
        raise SystemExit("error: the first argument must be `train` or `evaluate`")
    register()
    if argv[0] == "train":
        from hyperbooth.miniworld.train_hypernet import main as run
    else:
        from hyperbooth.miniworld.evaluate import main as run
    run(argv[1:])


if __name__ == "__main__":
    run_module(main, "benchmarks/hypernet_judge_encoder.py")
