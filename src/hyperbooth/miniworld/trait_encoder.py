"""mini's trait encoder: a network trained like the identity judge, read by the hypernetwork.

The miniature world's analogue of a face-recognition backbone: the judge's small CNN and trait
labels, but its own run (another seed, other renders, no held-out identity ever seen, half the
examples and epochs). The hypernetwork reads a face through it, frozen, as one token: the last
hidden layer and the probabilities of every attribute. It is *not* the scorer: the identity
score is read by the shipped judge (`weights/judge`), a different network; that the two were
trained on the same kind of labels is what makes this encoder see traits well, and it is why
docs/HYPERDREAMBOOTH.md reports its hypernetwork beside the scratch ViT's.

Any folder of the judge's format (judge.safetensors + judge.json, `python -m
hyperbooth.miniworld.judges --out DIR`) works as an encoder by path; `mini-traits` is the one
the mini hypernetwork recipe trains (`python -m hyperbooth.miniworld.train_hypernet`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from hyperbooth.miniworld.judges import Judge, JudgeConfig, split_logits
from hyperbooth.miniworld.render import SIZE

TRAIT_ENCODER = "mini-traits"
TRAIT_ENCODER_FOLDER = Path(__file__).parent / "weights" / TRAIT_ENCODER


def trait_encoder_config() -> JudgeConfig:
    """The shipped trait encoder's training run (seed 1; the judge's is seed 0)."""
    return JudgeConfig(seed=1, examples=20_000, epochs=4, exclude_held_out=True)


def is_trait_encoder(folder: str | Path) -> bool:
    """Whether folder holds a network of the judge's format."""
    return Judge.is_saved(folder)


class TraitEncoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> one token: the hidden layer + trait probabilities.

    The network reads 64 x 64 pixels (the renderer's size); other sizes are resized to it.
    """

    def __init__(self, folder: str | Path) -> None:
        """folder: a judge-format network."""
        super().__init__()
        net = Judge.load(folder).net
        self.body, self.head = net.body, net.head
        self.width = net.head.in_features + net.head.out_features

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        """A transformers output whose last_hidden_state is (B, 1, width)."""
        if pixel_values.shape[-2:] != (SIZE, SIZE):
            pixel_values = nn.functional.interpolate(
                pixel_values, size=(SIZE, SIZE), mode="bilinear", antialias=True
            )
        hidden = self.body(pixel_values)
        probabilities = [p.softmax(1) for p in split_logits(self.head(hidden)).values()]
        token = torch.cat([hidden, *probabilities], dim=1)
        return BaseModelOutput(last_hidden_state=token[:, None])
