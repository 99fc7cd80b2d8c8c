"""DreamBooth that trains only the UNet parameters whose path matches a pattern: which layers
hold an identity? Runs the personalisation measurement of the miniature world with it.

TRAIN_ONLY='.*resnets.*conv[12]\\.(weight|bias)' python benchmarks/partial_dreambooth.py \\
    personalisation --base mini --method dreambooth --steps 400 --learning-rate 2e-4 \\
    --identities 2 --out runs/pers/db_convs.json
"""

from __future__ import annotations

import os
import re
import sys

import hyperbooth.methods.dreambooth as dreambooth
from hyperbooth.miniworld.evaluate import main


def _trainable_matching(pattern: re.Pattern):
    """A DreamBooth.trainable that freezes every UNet parameter the pattern does not match."""

    def trainable(self) -> dict:
        out = {}
        for name, param in self.base.unet.named_parameters():
            keep = bool(pattern.fullmatch(name))
            param.requires_grad_(keep)
            if keep:
                out[f"unet.{name}"] = param
        return out

    return trainable


if __name__ == "__main__":
    if "TRAIN_ONLY" not in os.environ:
        raise SystemExit(
            "error: set TRAIN_ONLY to a regex of the UNet parameter paths to train, e.g. "
            "TRAIN_ONLY='.*resnets.*conv[12]\\.(weight|bias)' (see the script's docstring)"
        )
    dreambooth.DreamBooth.trainable = _trainable_matching(re.compile(os.environ["TRAIN_ONLY"]))
    main(sys.argv[1:])
