"""The miniature world's judges: read every identity trait and context attribute from an image.

One small CNN with a classification head per attribute. Its identity heads (every trait in
TRAITS, hidden ones included) are the identity judge; its context heads (CONTEXT_ATTRIBUTES) are
the context judge. Two scores for every benchmark come from them:

- identity score: the fraction of a reference identity's traits an image reproduces (the
  analogue of the paper's face-recognition score), and separately over the hidden traits only;
- prompt score: the fraction of the context attributes a prompt asks for that the image shows
  (the analogue of CLIP-T).

Trained on fresh renders, shipped as safetensors + JSON, reproduced by

    python -m hyperbooth.miniworld.judges --out src/hyperbooth/miniworld/weights/judge
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from hyperbooth.adapters.files import atomic_save_safetensors
from hyperbooth.atomic import write_text
from hyperbooth.errors import HyperboothError
from hyperbooth.machine import cpu_precision, machine_info
from hyperbooth.miniworld.captions import parse_prompt
from hyperbooth.miniworld.render import (
    CONTEXT_ATTRIBUTES,
    HIDDEN_TRAITS,
    SEED_RANGE,
    SIZE,
    TRAITS,
    Context,
    Identity,
    held_out,
    pair_box,
    random_context,
    random_identity,
    render_array,
    render_pair_array,
)

ATTRIBUTES: dict[str, tuple[str, ...]] = {**TRAITS, **CONTEXT_ATTRIBUTES}
DEFAULT_JUDGE = Path(__file__).parent / "weights" / "judge"
WEIGHTS_FILE = "judge.safetensors"
INFO_FILE = "judge.json"


@dataclass
class JudgeConfig:
    """The judge's size and its training run."""

    channels: tuple[int, ...] = (32, 64, 96, 128)
    repeats: tuple[int, ...] = (1, 1, 2, 1)  # convolutions per level (each level then halves)
    hidden: int = 384
    examples: int = 40_000
    epochs: int = 8
    # AMX-BF16 roughly halves a CPU convolution's time; "auto" uses bf16 only where it is native
    mixed_precision: str = "auto"
    batch: int = 128
    lr: float = 2e-3
    noise: float = 0.08  # max std of added pixel noise, in [-1, 1] units: robustness to samples
    blur_probability: float = 0.3  # share of training images softened by a 3x3 box blur
    pair_fraction: float = 0.15  # training images that are one face cut from a two-face image
    eval_examples: int = 4000
    seed: int = 0
    threads: int = 2
    # never train on the identities kept for demos and benchmarks (the shipped judge does:
    # it is the scorer; a trait encoder the hypernetwork reads through must not)
    exclude_held_out: bool = False


class JudgeNet(nn.Module):
    """(B, 3, 64, 64) images in [-1, 1] -> (B, sum of value counts) logits, one block per attribute."""

    def __init__(self, channels: Sequence[int], repeats: Sequence[int], hidden: int) -> None:
        super().__init__()
        if len(channels) != len(repeats):
            raise ValueError(f"channels {channels} and repeats {repeats} differ in length")
        layers: list[nn.Module] = []
        previous = 3
        for width, count in zip(channels, repeats, strict=True):
            for _ in range(count):
                layers += [
                    nn.Conv2d(previous, width, 3, padding=1),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                previous = width
            layers.append(nn.MaxPool2d(2))
        side = SIZE // 2 ** len(channels)
        self.body = nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(previous * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
        )
        self.head = nn.Linear(hidden, sum(len(values) for values in ATTRIBUTES.values()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for every value of every attribute, concatenated in ATTRIBUTES order."""
        return self.head(self.body(images))


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attribute name -> (B, value count) logits."""
    sizes = [len(values) for values in ATTRIBUTES.values()]
    return dict(zip(ATTRIBUTES, logits.split(sizes, dim=1), strict=True))


def pair_halves(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The left and right faces of a two-face (64, 64, 3) uint8 image, each enlarged to 64x64."""
    from PIL import Image

    picture = Image.fromarray(image)
    return tuple(
        np.asarray(picture.crop(pair_box(side)).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        for side in (0, 1)
    )


def as_batch(images: np.ndarray | torch.Tensor | Sequence) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) arrays, PIL images or float (B, 3, 64, 64) in [-1, 1] -> the latter."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        batch = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(image.convert("RGB")) for image in images])
        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        batch = batch / 127.5 - 1
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, SIZE, SIZE):
        raise HyperboothError(
            f"the judges read {SIZE}x{SIZE} RGB images; got a batch of shape {tuple(batch.shape)}"
        )
    return batch


@dataclass(frozen=True)
class Reading:
    """What the judges read from one image."""

    identity: Identity
    context: Context


class Judge:
    """The trained judges: `read` images into identities and contexts."""

    def __init__(self, net: JudgeNet, info: dict) -> None:
        self.net = net.eval()
        self.info = info

    @staticmethod
    def is_saved(folder: str | Path) -> bool:
        """Whether folder holds a network saved by Judge.save (weights and JSON info)."""
        return (Path(folder) / WEIGHTS_FILE).is_file() and (Path(folder) / INFO_FILE).is_file()

    @staticmethod
    def saved_info(folder: str | Path) -> dict:
        """The JSON info of the network in folder, without loading its weights."""
        return json.loads((Path(folder) / INFO_FILE).read_text())

    @classmethod
    def load(cls, folder: str | Path = DEFAULT_JUDGE) -> Judge:
        """The judge saved in folder (default: the one shipped with the package)."""
        folder = Path(folder)
        if not cls.is_saved(folder):
            raise HyperboothError(
                f"no judge in {folder} (need {WEIGHTS_FILE} and {INFO_FILE}); train one with "
                "`python -m hyperbooth.miniworld.judges --out DIR`"
            )
        try:
            info = cls.saved_info(folder)
            config = JudgeConfig(**info["config"])
            net = JudgeNet(config.channels, config.repeats, config.hidden)
            net.load_state_dict(
                {k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
            )
        except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise HyperboothError(
                f"{folder} is not a judge-format network ({type(error).__name__}: {reason}); "
                "pass a folder written by `python -m hyperbooth.miniworld.judges --out DIR`"
            ) from error
        return cls(net, info)

    def save(self, folder: str | Path) -> None:
        """Write the weights (float16 safetensors) and the JSON info into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.half().contiguous() for k, v in self.net.state_dict().items()}
        # BatchNorm's step counter is an integer; keep it as it is.
        tensors.update(
            {k: v for k, v in self.net.state_dict().items() if not v.is_floating_point()}
        )
        atomic_save_safetensors(tensors, folder / WEIGHTS_FILE)
        write_text(folder / INFO_FILE, json.dumps(self.info, indent=2))

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor | Sequence) -> dict[str, torch.Tensor]:
        """Attribute name -> (B,) value indices read from the images."""
        batch = as_batch(images)
        chunks = [split_logits(self.net(part)) for part in batch.split(256)]
        return {name: torch.cat([c[name].argmax(1) for c in chunks]) for name in ATTRIBUTES}

    def read_pairs(self, images: np.ndarray | Sequence) -> list[tuple[Reading, Reading]]:
        """The (left, right) readings of two-face images (uint8 (B, 64, 64, 3) or PIL)."""
        arrays = [
            np.asarray(image.convert("RGB")) if hasattr(image, "convert") else image
            for image in images
        ]
        halves = [half for array in arrays for half in pair_halves(array)]
        readings = self.read(np.stack(halves))
        return list(zip(readings[0::2], readings[1::2], strict=True))

    def read(self, images: np.ndarray | torch.Tensor | Sequence) -> list[Reading]:
        """The identity and context read from each image."""
        values = self.predict(images)
        count = len(next(iter(values.values())))
        return [
            Reading(
                Identity(**{name: int(values[name][i]) for name in TRAITS}),
                Context(**{name: int(values[name][i]) for name in CONTEXT_ATTRIBUTES}),
            )
            for i in range(count)
        ]


def identity_score(reference: Identity, read: Identity) -> tuple[float, float]:
    """(fraction of all traits, fraction of hidden traits) that `read` shares with `reference`."""
    same = {name: getattr(reference, name) == getattr(read, name) for name in TRAITS}
    hidden = [same[name] for name in HIDDEN_TRAITS]
    return sum(same.values()) / len(same), sum(hidden) / len(hidden)


def prompt_score(prompt: str | Mapping[str, int], read: Context) -> float | None:
    """The fraction of the context attributes the prompt asks for that `read` shows (None: none)."""
    asked = parse_prompt(prompt) if isinstance(prompt, str) else dict(prompt)
    asked = {name: value for name, value in asked.items() if name in CONTEXT_ATTRIBUTES}
    if not asked:
        return None
    return sum(getattr(read, name) == value for name, value in asked.items()) / len(asked)


def chance_levels() -> dict[str, float]:
    """Scores of an image of a uniformly random identity and context, in expectation."""

    def mean_inverse(table: Mapping[str, tuple[str, ...]]) -> float:
        return float(np.mean([1 / len(values) for values in table.values()]))

    return {
        "identity": mean_inverse(TRAITS),
        "hidden": mean_inverse(HIDDEN_TRAITS),
        "prompt_one_attribute": mean_inverse(CONTEXT_ATTRIBUTES),
    }


# --- Training -------------------------------------------------------------------------------------


IGNORE = -100  # a label the loss skips: a face cut from a pair has no framing of its own
FRAMING_COLUMN = list(ATTRIBUTES).index("framing")


def render_examples(
    count: int,
    seed: int,
    pair_fraction: float = 0.0,
    desc: str = "render",
    progress: bool = True,
    exclude_held_out: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """count random renders (uint8 NHWC) and labels (count, len(ATTRIBUTES)).

    A share `pair_fraction` are one face cut from a two-face render (`pair_halves`), labelled
    with that face's traits and the context, framing IGNORE. `exclude_held_out` redraws every
    identity that `render.held_out` reserves for demos and benchmarks.
    """
    rng = np.random.default_rng([seed, 0x6A75])  # "ju"

    def draw() -> Identity:
        identity = random_identity(rng)
        while exclude_held_out and held_out(identity):
            identity = random_identity(rng)
        return identity

    images = np.empty((count, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((count, len(ATTRIBUTES)), np.int64)
    for i in tqdm(range(count), desc=desc, disable=not progress):
        identity, context = draw(), random_context(rng)
        render_seed = int(rng.integers(SEED_RANGE))
        if rng.random() < pair_fraction:
            other, side = draw(), int(rng.integers(2))
            faces = (identity, other) if side == 0 else (other, identity)
            images[i] = pair_halves(render_pair_array(*faces, context, render_seed))[side]
            labels[i] = [*identity.as_dict().values(), *context.as_dict().values()]
            labels[i, FRAMING_COLUMN] = IGNORE
        else:
            images[i] = render_array(identity, context, render_seed)
            labels[i] = [*identity.as_dict().values(), *context.as_dict().values()]
    return images, labels


def _augment(batch: torch.Tensor, config: JudgeConfig, generator: torch.Generator) -> torch.Tensor:
    """Soften and add noise to some images, as a generator's samples are softened and noisy."""
    count = batch.shape[0]
    blur = torch.rand(count, generator=generator) < config.blur_probability
    if blur.any():
        kernel = torch.full((3, 1, 3, 3), 1 / 9)
        padded = nn.functional.pad(batch[blur], (1, 1, 1, 1), mode="replicate")
        batch = batch.clone()
        batch[blur] = nn.functional.conv2d(padded, kernel, groups=3)
    sigma = torch.rand(count, 1, 1, 1, generator=generator) * config.noise
    return batch + sigma * torch.randn(batch.shape, generator=generator)


def accuracy(judge: Judge, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-attribute accuracy of the judge on labelled images (IGNORE labels left out)."""
    values = judge.predict(images)
    scores = {}
    for k, name in enumerate(ATTRIBUTES):
        known = labels[:, k] != IGNORE
        if known.any():
            scores[name] = float((values[name].numpy()[known] == labels[known, k]).mean())
    return scores


def train_judge(config: JudgeConfig, progress: bool = True) -> Judge:
    """Train a judge on fresh renders and measure it on other fresh renders."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    images, labels = render_examples(
        config.examples, config.seed, config.pair_fraction, exclude_held_out=config.exclude_held_out
    )
    net = JudgeNet(config.channels, config.repeats, config.hidden)
    optimizer = torch.optim.AdamW(net.parameters(), config.lr, weight_decay=1e-4)
    per_epoch = config.examples // config.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=config.epochs * per_epoch
    )
    targets = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    precision = cpu_precision(config.mixed_precision)
    bar = tqdm(total=config.epochs * per_epoch, desc="judge", disable=not progress)
    for epoch in range(config.epochs):
        net.train()
        order = torch.randperm(config.examples, generator=generator)
        for step in range(per_epoch):
            index = order[step * config.batch : (step + 1) * config.batch]
            batch = _augment(as_batch(images[index.numpy()]), config, generator)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                logits = split_logits(net(batch).float())
            loss = sum(
                nn.functional.cross_entropy(logits[name], targets[index, k], ignore_index=IGNORE)
                for k, name in enumerate(ATTRIBUTES)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
        bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-per_epoch:]):.3f}")
    bar.close()
    judge = Judge(net, {})
    test_images, test_labels = render_examples(config.eval_examples, config.seed + 1, 0.0, "eval")
    pair_images, pair_labels = render_examples(
        config.eval_examples // 4, config.seed + 2, 1.0, "eval pairs"
    )
    judge.info = {
        "config": asdict(config),
        "accuracy": accuracy(judge, test_images, test_labels),
        "pair_accuracy": accuracy(judge, pair_images, pair_labels),
        "chance": chance_levels(),
        "seconds": time.perf_counter() - started,
        "machine": machine_info(),
        "mixed_precision": precision,
        "final_loss": float(np.mean(losses[-per_epoch:])),
    }
    return judge


def main(argv: Sequence[str] | None = None) -> None:
    """Train the judges and write them to --out."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder to write the judge into")
    parser.add_argument("--config", default=None, help="JSON file overriding JudgeConfig fields")
    args = parser.parse_args(argv)
    overrides = json.loads(Path(args.config).read_text()) if args.config else {}
    config = JudgeConfig(**overrides)
    torch.set_num_threads(config.threads)
    judge = train_judge(config)
    judge.save(args.out)
    shown = ("accuracy", "pair_accuracy", "chance", "seconds")
    print(json.dumps({k: judge.info[k] for k in shown}, indent=2))


if __name__ == "__main__":
    main()
