"""An identity encoder pretrained on the miniature world: the analogue of a face-recognition net.

A small transformers ResNet (`ResNetModel`, 1.2M parameters) learns, with a contrastive loss
and no trait labels, to map two renders of one identity in different contexts (background,
style, headwear, framing, pose) close together and renders of different identities apart.
Half of every batch are "siblings": identities that differ from another in the batch in only
one or two traits, hidden ones included, so that near look-alikes must be told apart. A
hypernetwork reads faces through it, frozen, with `encoder="mini-encoder"` (METHOD 3.2: a
pretrained encoder); the judges are a separate network trained on trait labels, so the encoder
never sees what they score against. It is not shipped: on `mini` it did not beat a ViT trained
from scratch with the hypernetwork (docs/HYPERDREAMBOOTH.md).

    python -m hyperbooth.miniworld.train_encoder --work runs/encoder \\
        --out src/hyperbooth/miniworld/weights/mini-encoder

It resumes from --work, and writes a standard transformers folder (config.json +
model.safetensors, float16) that `AutoModel.from_pretrained` loads, plus encoder.json with the
run's settings, seconds and retrieval accuracy on held-out identities.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hyperbooth.atomic import write_text
from hyperbooth.errors import run_module
from hyperbooth.machine import cpu_precision, machine_info
from hyperbooth.miniworld import recipe_from_json
from hyperbooth.miniworld.captions import training_identity
from hyperbooth.miniworld.judges import as_batch
from hyperbooth.miniworld.render import (
    TRAITS,
    Identity,
    held_out,
    random_context,
    random_identity,
    render_array,
)
from hyperbooth.training import CHECKPOINT_DIR, load_checkpoint, save_checkpoint

ENCODER_FOLDER = Path(__file__).parent / "weights" / "mini-encoder"
INFO_FILE = "encoder.json"


@dataclass
class EncoderRecipe:
    """Every setting of the shipped encoder's run; --config JSON overrides fields."""

    hidden_sizes: tuple[int, ...] = (32, 64, 128, 192)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    embedding: int = 128  # the contrastive projection's width (discarded after training)
    identities_per_step: int = 64  # half of them siblings; two views of each
    steps: int = 1500
    lr: float = 2e-3
    temperature: float = 0.1
    noise: float = 0.05  # max std of pixel noise added to a view, in [-1, 1] units
    mixed_precision: str = "auto"  # bf16 where the CPU has it in hardware (machine.cpu_precision)
    checkpoint_every: int = 250
    eval_identities: int = 256
    seed: int = 0


def build_resnet(recipe: EncoderRecipe) -> nn.Module:
    """The encoder's architecture (random weights)."""
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        embedding_size=recipe.hidden_sizes[0],
        hidden_sizes=list(recipe.hidden_sizes),
        depths=list(recipe.depths),
        layer_type="basic",
        downsample_in_first_stage=False,
    )
    return ResNetModel(config)


def sibling(identity: Identity, rng: np.random.Generator) -> Identity:
    """The identity with one or two traits changed to another value."""
    values = {name: getattr(identity, name) for name in TRAITS}
    for name in rng.choice(list(TRAITS), size=int(rng.integers(1, 3)), replace=False):
        count = len(TRAITS[name])
        values[name] = (values[name] + int(rng.integers(1, count))) % count
    return Identity(**values)


def contrastive_batch(step: int, recipe: EncoderRecipe) -> tuple[torch.Tensor, int]:
    """Two views of each identity of step's batch, (2N, 3, 64, 64): views [0:N] and [N:2N]."""
    rng = np.random.default_rng([recipe.seed, step])
    half = recipe.identities_per_step // 2
    anchors = [training_identity(rng) for _ in range(half)]
    siblings = []
    for anchor in anchors:
        candidate = sibling(anchor, rng)
        while held_out(candidate):
            candidate = sibling(anchor, rng)
        siblings.append(candidate)
    identities = anchors + siblings
    views = [
        render_array(identity, random_context(rng), int(rng.integers(2**31)))
        for _ in range(2)
        for identity in identities
    ]
    batch = as_batch(np.stack(views))
    noise = torch.from_numpy(rng.random((len(views), 1, 1, 1)) * recipe.noise).float()
    batch = batch + noise * torch.from_numpy(rng.standard_normal(batch.shape)).float()
    return batch.clamp(-1, 1), len(identities)


def pooled(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean of the encoder's last feature map, (B, C)."""
    return encoder(pixel_values=images).last_hidden_state.mean(dim=(2, 3))


def info_nce(embeddings: torch.Tensor, count: int, temperature: float) -> torch.Tensor:
    """NT-Xent over 2*count embeddings whose positives are i <-> i + count."""
    z = nn.functional.normalize(embeddings.float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.arange(2 * count).roll(count)
    return nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def retrieval_accuracy(encoder: nn.Module, recipe: EncoderRecipe) -> dict[str, float]:
    """Top-1 retrieval of held-out identities across contexts, and of siblings among siblings."""
    rng = np.random.default_rng([recipe.seed, 10**9])
    people: list[Identity] = []
    while len(people) < recipe.eval_identities:
        candidate = random_identity(rng)
        if held_out(candidate):
            people.append(candidate)

    def top1(identities: list[Identity]) -> float:
        views = [
            render_array(identity, random_context(rng), int(rng.integers(2**31)))
            for _ in range(2)
            for identity in identities
        ]
        features = torch.cat(
            [pooled(encoder, part) for part in as_batch(np.stack(views)).split(256)]
        )
        z = nn.functional.normalize(features, dim=1)
        queries, gallery = z.split(len(identities))
        hits = (queries @ gallery.T).argmax(1) == torch.arange(len(identities))
        return float(hits.float().mean())

    siblings = [sibling(person, rng) for person in people[: recipe.eval_identities // 2]]
    return {
        "held_out_top1": top1(people),
        "siblings_top1": top1(people[: recipe.eval_identities // 2] + siblings),
        "chance": 1 / recipe.eval_identities,
    }


def save_encoder(encoder: nn.Module, folder: Path, info: dict) -> None:
    """A float16 transformers folder + encoder.json, replacing folder in one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)
    encoder.to(torch.float16).save_pretrained(staging, safe_serialization=True)
    encoder.float()
    write_text(staging / INFO_FILE, json.dumps(info, indent=2))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def train_encoder(
    recipe: EncoderRecipe, work: Path, out: Path, progress: bool = True, stop_at: int | None = None
) -> dict | None:
    """Train (resuming from work/checkpoint), evaluate and export the encoder; returns its info.

    With `stop_at`, stop after that step with a checkpoint and return None (rerun to go on).
    """
    torch.manual_seed(recipe.seed)
    encoder = build_resnet(recipe)
    head = nn.Sequential(
        nn.Linear(recipe.hidden_sizes[-1], 256), nn.ReLU(), nn.Linear(256, recipe.embedding)
    )
    modules = nn.ModuleDict({"encoder": encoder, "head": head})
    optimizer = torch.optim.AdamW(modules.parameters(), lr=recipe.lr, weight_decay=1e-4)
    tensors = modules.state_dict(keep_vars=True)  # weights and BatchNorm statistics
    run_info = json.loads(json.dumps(asdict(recipe)))
    progress_file = work / "progress.json"  # losses and seconds, written before each checkpoint
    work.mkdir(parents=True, exist_ok=True)
    start, seconds, losses = 0, 0.0, []
    if (work / CHECKPOINT_DIR / "state.json").is_file():
        start = load_checkpoint(work, tensors, optimizer, run_info)
        saved = json.loads(progress_file.read_text())
        seconds, losses = saved["seconds"], saved["losses"][:start]
    bar = tqdm(total=recipe.steps, initial=start, desc="encoder", disable=not progress)
    began = time.perf_counter() - seconds
    precision = cpu_precision(recipe.mixed_precision)
    for step in range(start, min(recipe.steps, stop_at or recipe.steps)):
        modules.train()
        for group in optimizer.param_groups:  # cosine decay over the run
            group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        images, count = contrastive_batch(step, recipe)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = info_nce(head(pooled(encoder, images)), count, recipe.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 in (recipe.steps, stop_at):
            elapsed = time.perf_counter() - began
            write_text(progress_file, json.dumps({"seconds": elapsed, "losses": losses}))
            save_checkpoint(work, step + 1, tensors, optimizer, run_info)
    bar.close()
    if stop_at is not None and stop_at < recipe.steps:
        return None
    seconds = time.perf_counter() - began
    encoder.eval()
    info = {
        "recipe": asdict(recipe),
        "train_seconds": seconds,
        "machine": machine_info(),
        "mixed_precision": precision,
        "final_loss_mean_50": float(np.mean(losses[-50:])),
        "retrieval": retrieval_accuracy(encoder, recipe),
        "note": "contrastive identity encoder for mini's hypernetwork; "
        "python -m hyperbooth.miniworld.train_encoder reproduces it",
    }
    save_encoder(encoder, out, info)
    return info


def main() -> None:
    """Command line: train the encoder into --out, resuming from --work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="checkpoints go here; rerun to resume")
    parser.add_argument("--out", default=str(ENCODER_FOLDER), help="exported transformers folder")
    parser.add_argument("--config", help="JSON overriding EncoderRecipe fields")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_json(EncoderRecipe, args.config)
    info = train_encoder(recipe, Path(args.work), Path(args.out))
    print(json.dumps({k: info[k] for k in ("train_seconds", "final_loss_mean_50", "retrieval")}))


if __name__ == "__main__":
    run_module(main, "hyperbooth.miniworld.train_encoder")
