"""Reproduce the hypernetwork that ships with `mini`: identities -> trait encoder -> precompute ->
train -> export.

    python -m hyperbooth.miniworld.train_hypernet --work runs/hdb \\
        --out src/hyperbooth/miniworld/weights/mini-hypernet
    # the same, sharded over 2 processes (what the shipped one used):
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \\
        -m hyperbooth.miniworld.train_hypernet --work runs/hdb --out ...

Every stage resumes from --work: rendered identities are kept, finished LiDBs are skipped and
training continues from its last checkpoint, so rerunning the same command after a kill
finishes the job. The exported folder holds the hypernetwork in float16 (load_hypernet casts it
back), a loss-curve PNG and the seconds of each stage. With the encoder `mini-traits` (the
default), the first stage trains the frozen trait encoder (hyperbooth.miniworld.trait_encoder)
on the main process and installs it in --encoder-out. By default that is `<out>/traits`, which
the exported hypernetwork names relative to its own folder; only an export to the package's
`mini-hypernet` installs it in the package's own folder, which the name `mini-traits` resolves
to. The hypernetwork records a hash of the encoder's weights, and loading it through any other
network is an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hyperbooth.adapters.config import RESNET_CONV_TARGETS, AdapterConfig
from hyperbooth.adapters.inject import weights_fingerprint
from hyperbooth.atomic import atomic_file, write_text
from hyperbooth.bases import load_base
from hyperbooth.errors import HyperboothError, run_module
from hyperbooth.hypernet.model import (
    BUILT_IN,
    HyperNetConfig,
    load_hypernet,
    save_hypernet,
)
from hyperbooth.hypernet.precompute import PrecomputeConfig, precompute
from hyperbooth.hypernet.train import HYPERNET_DIR, HyperLossConfig, train_hypernet
from hyperbooth.machine import machine_info
from hyperbooth.miniworld import recipe_from_json
from hyperbooth.miniworld.evaluate import identity_images, identity_views
from hyperbooth.miniworld.judges import INFO_FILE, WEIGHTS_FILE, Judge, JudgeConfig, train_judge
from hyperbooth.miniworld.trait_encoder import (
    TRAIT_ENCODER,
    TRAIT_ENCODER_FOLDER,
    is_trait_encoder,
    trait_encoder_config,
)
from hyperbooth.training import TrainConfig, make_accelerator

HYPERNET_FOLDER = BUILT_IN["mini"]


def mini_lidb() -> AdapterConfig:
    """The LiDB the hypernetwork predicts on `mini`: rank 4 on the ResNet convs, UNet only.

    On `mini` a face lives in the ResNet convolutions (docs/HYPERDREAMBOOTH.md, "Which layers").
    """
    return AdapterConfig(
        kind="lidb", rank=4, unet_targets=RESNET_CONV_TARGETS, text_encoder_targets=()
    )


@dataclass
class HypernetRecipe:
    """Every setting of the shipped hypernetwork's reproduction; --config JSON overrides fields."""

    identities: int = 1024
    seed: int = 0
    # pre-optimisation (METHOD 3.2)
    adapter: AdapterConfig = field(default_factory=mini_lidb)
    identities_per_step: int = 16
    precompute_steps: int = 100
    precompute_lr: float = 3e-2
    # timesteps below this for precompute and the diffusion term (None: all, as shipped)
    max_timestep: int | None = None
    # renders of each identity in random captioned contexts as extra diffusion targets
    # (train-hypernet --views; 0: the reference only, as in the paper and as shipped)
    views_per_identity: int = 0
    shared_noise: bool = False  # precompute --shared-noise (False: per-identity draws, as shipped)
    # the hypernetwork's encoder: TRAIT_ENCODER (frozen, trained by the first stage with the
    # settings below), "scratch-vit" (trained with the hypernetwork), "mini-encoder" or a path
    encoder: str = TRAIT_ENCODER
    trait_encoder: JudgeConfig = field(default_factory=trait_encoder_config)  # JSON: overrides
    encoder_width: int = 192  # scratch ViT only
    encoder_layers: int = 4
    width: int = 256
    decoder_layers: int = 2
    iterations: int = 4
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0  # output-space distillation from the pre-optimised LiDB (0: as shipped)
    steps: int = 2000
    batch_size: int = 8  # per process
    lr: float = 2e-4
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig.from_json(self.adapter)
        if isinstance(self.trait_encoder, dict):
            unknown = sorted(set(self.trait_encoder) - set(JudgeConfig.__dataclass_fields__))
            if unknown:
                raise HyperboothError(f"unknown trait_encoder field {unknown[0]!r} in the recipe")
            self.trait_encoder = replace(trait_encoder_config(), **self.trait_encoder)


def plot_loss_terms(terms: list[dict[str, float]], path: Path, window: int = 50) -> None:
    """Each logged loss term against step (running means), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot

    names = [name for name in ("diffusion", "weights", "distill") if terms and name in terms[0]]
    figure, axes = pyplot.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        values = np.array([t[name] for t in terms])
        kernel = np.ones(min(window, len(values))) / min(window, len(values))
        axis.plot(np.convolve(values, kernel, mode="valid"))
        axis.set_title(f"{name} loss (running mean of {len(kernel)})")
        axis.set_xlabel("step")
        axis.set_yscale("log")
    figure.tight_layout()
    with atomic_file(path) as temporary:
        figure.savefig(temporary, dpi=90, format="png")
    pyplot.close(figure)


def trait_encoder_stage(config: JudgeConfig, work: Path, out: Path) -> None:
    """Train the trait encoder into work (unless done with these settings) and install it in out."""
    if is_trait_encoder(work):
        done, wanted = Judge.saved_info(work)["config"], json.loads(json.dumps(asdict(config)))
        if done != wanted:
            changed = sorted(k for k in done.keys() | wanted.keys() if done.get(k) != wanted.get(k))
            raise HyperboothError(
                f"{work} holds a trait encoder trained with other settings ({', '.join(changed)});"
                f" remove it and {work.parent / 'train'} (a hypernetwork trained on it), or use"
                " another --work"
            )
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)  # the other processes wait at a barrier
        try:
            train_judge(config).save(work)  # the JSON, written last, marks it complete
        finally:
            torch.set_num_threads(threads)
    for name in (WEIGHTS_FILE, INFO_FILE):  # JSON last again: a half-installed folder is absent
        source, target = work / name, out / name
        if not target.is_file() or source.read_bytes() != target.read_bytes():
            with atomic_file(target) as temporary:
                shutil.copyfile(source, temporary)


# The settings that decide which faces --work holds (the later stages check their own).
IDENTITY_SET = ("identities", "seed", "views_per_identity")


def check_identity_set(work: Path, recipe: HypernetRecipe) -> None:
    """Refuse a --work whose identities were drawn with other settings (it would mix the sets)."""
    if not (work / "recipe.json").is_file():
        return
    done = json.loads((work / "recipe.json").read_text())
    defaults = HypernetRecipe.__dataclass_fields__  # a field older files lack had its default
    changed = [k for k in IDENTITY_SET if done.get(k, defaults[k].default) != getattr(recipe, k)]
    if changed:
        raise HyperboothError(
            f"{work} holds identities drawn with other settings ({', '.join(changed)}); "
            "use another --work"
        )


def encoder_folder(encoder_out: str | None, out: Path) -> Path:
    """The folder the trait encoder is installed in (the shipped one only for the shipped export).

    --encoder-out if given; else the package's own folder when `out` is the package's
    hypernetwork, and `<out>/traits` for any other.
    """
    if encoder_out is not None:
        return Path(encoder_out)
    return TRAIT_ENCODER_FOLDER if out.resolve() == HYPERNET_FOLDER.resolve() else out / "traits"


def encoder_name(folder: Path, out: Path) -> str:
    """The name the exported hypernetwork records for its encoder folder.

    `mini-traits` for the package's folder, a path relative to `out` for a folder inside it
    (load_hypernet resolves it against its own folder), else the absolute path.
    """
    if folder.resolve() == TRAIT_ENCODER_FOLDER.resolve():
        return TRAIT_ENCODER
    if folder.resolve().is_relative_to(out.resolve()):
        return str(folder.resolve().relative_to(out.resolve()))
    return str(folder.resolve())


def export(trained: Path, out: Path, info: dict, encoder: str | None = None) -> None:
    """The trained hypernetwork as float16 safetensors + JSON in `out`, its encoder renamed."""
    hypernet = load_hypernet(trained).half()
    if encoder is not None:
        hypernet.config = replace(hypernet.config, encoder=encoder)
    save_hypernet(hypernet, out, info)


def main(argv: list[str] | None = None) -> None:
    """Run every stage (each resumes from --work) and export the hypernetwork to --out."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", required=True, help="folder for images, LiDBs, checkpoints")
    parser.add_argument("--out", default=str(HYPERNET_FOLDER), help="folder to export to")
    parser.add_argument(
        "--encoder-out",
        default=None,
        help=f"folder to install the trait encoder in (default: <out>/traits; the one "
        f"`{TRAIT_ENCODER}` names when --out is the package's mini-hypernet)",
    )
    parser.add_argument("--base", default="mini")
    parser.add_argument("--config", default=None, help="JSON file overriding HypernetRecipe")
    args = parser.parse_args(argv)
    recipe = recipe_from_json(HypernetRecipe, args.config)
    work, out = Path(args.work), Path(args.out)
    train_config = TrainConfig(
        steps=recipe.steps,
        learning_rate=recipe.lr,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        checkpoint_every=recipe.checkpoint_every,
        device="auto",
    )
    accelerator = make_accelerator(train_config)
    times: dict[str, float] = {}

    started = time.perf_counter()
    if accelerator.is_main_process:
        check_identity_set(work, recipe)
        work.mkdir(parents=True, exist_ok=True)
        identity_images(work / "images", recipe.identities, recipe.seed)
        if recipe.views_per_identity:
            identity_views(work / "images", work / "views", recipe.views_per_identity, recipe.seed)
        recipe_json = asdict(recipe) | {"adapter": json.loads(recipe.adapter.to_json())}
        write_text(work / "recipe.json", json.dumps(recipe_json, indent=2))
    accelerator.wait_for_everyone()
    times["identities"] = time.perf_counter() - started

    encoder, exported_encoder = recipe.encoder, None
    if encoder == TRAIT_ENCODER:
        started = time.perf_counter()
        installed = encoder_folder(args.encoder_out, out)
        if accelerator.is_main_process:
            trait_encoder_stage(recipe.trait_encoder, work / "traits", installed)
        accelerator.wait_for_everyone()
        exported_encoder = encoder_name(installed, out)
        # Training reads the work folder's copy (byte-identical to the installed one), so a
        # resumed run matches its checkpoint whatever --out is; the export names it as above.
        encoder = str((work / "traits").resolve())
        times["encoder"] = time.perf_counter() - started

    base = load_base(args.base)
    base_unet = weights_fingerprint(base.unet)  # before adapters wrap its layers
    started = time.perf_counter()
    precompute(
        base,
        work / "images",
        work / "pre",
        PrecomputeConfig(
            adapter=recipe.adapter,
            identities_per_step=recipe.identities_per_step,
            steps=recipe.precompute_steps,
            learning_rate=recipe.precompute_lr,
            seed=recipe.seed,
            max_timestep=recipe.max_timestep,
            shared_noise=recipe.shared_noise,
        ),
        accelerator,
    )
    times["precompute"] = time.perf_counter() - started

    started = time.perf_counter()
    config = HyperNetConfig(
        adapter=recipe.adapter,
        image_size=base.resolution,
        encoder=encoder,
        encoder_width=recipe.encoder_width,
        encoder_layers=recipe.encoder_layers,
        width=recipe.width,
        decoder_layers=recipe.decoder_layers,
        iterations=recipe.iterations,
    )
    loss = HyperLossConfig(
        alpha=recipe.alpha, beta=recipe.beta, gamma=recipe.gamma, max_timestep=recipe.max_timestep
    )
    resume = (work / "train" / "checkpoint").is_dir()
    views = work / "views" if recipe.views_per_identity else None
    result, identities = train_hypernet(
        base, work / "images", work / "pre", work / "train", config, loss, train_config,
        accelerator, resume, views=views,
    )  # fmt: skip
    times["train"] = time.perf_counter() - started

    if accelerator.is_main_process:
        terms = json.loads((work / "train" / "loss_terms.json").read_text())
        plot_loss_terms(terms, out / "loss.png")
        info = {
            "base": args.base,
            "base_unet": base_unet,  # which weights it was trained on
            "identities": identities,
            "processes": accelerator.num_processes,
            "seconds": times,
            "machine": machine_info(),
            "recipe": json.loads((work / "recipe.json").read_text()),
            "final_loss_terms": terms[-1] if terms else None,
        }
        if recipe.encoder == TRAIT_ENCODER:  # its stage ran above
            trained_encoder = Judge.saved_info(work / "traits")
            info["trait_encoder"] = {k: trained_encoder[k] for k in ("accuracy", "seconds")}
        export(work / "train" / HYPERNET_DIR, out, info, exported_encoder)
        print(json.dumps({"out": str(out), "identities": identities, "seconds": times}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_module(main, "hyperbooth.miniworld.train_hypernet")
