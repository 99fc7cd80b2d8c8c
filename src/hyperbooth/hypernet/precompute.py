"""Pre-optimisation (METHOD 3.2): fit one LiDB per identity image, K identities per step.

The hypernetwork learns to predict these fitted weights. Each batch element carries its own
LiDB (the per-sample adapter path), so the frozen model's forward and backward are shared by K
identities. Every identity draws its own noise and timesteps from a seed of its name, and the
loss is a sum of per-identity losses with no cross-identity clipping, so identity i's weights
are the same whether it was fitted alone or beside others (up to float rounding).

Robust to being killed: each identity's file is written atomically, a rerun skips finished ones
(and fits again any whose image changed: each file records its image's hash),
and processes under `accelerate launch` split the remaining identities between them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from tqdm.auto import tqdm

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.files import METADATA_KEY, adapter_metadata, atomic_save_safetensors
from hyperbooth.adapters.inject import add_adapter, weights_fingerprint
from hyperbooth.atomic import file_sha256, write_text
from hyperbooth.diffusion import check_max_timestep, draw_noise, noised_loss, sample_latents
from hyperbooth.errors import HyperboothError
from hyperbooth.images import collect_images, load_image
from hyperbooth.methods.common import encode_images, token_ids
from hyperbooth.training import autocast, resolve_precision

MANIFEST = "manifest.json"
SETTINGS = "settings.json"
_PRECOMPUTE = "precompute"  # the adapter's name inside the base while it trains


def _lidb() -> AdapterConfig:
    return AdapterConfig(kind="lidb")


@dataclass
class PrecomputeConfig:
    """How each identity's LiDB is fitted; identical settings give identical files."""

    adapter: AdapterConfig = field(default_factory=_lidb)
    identities_per_step: int = 8  # K: batch elements, each with its own LiDB
    steps: int = 200
    learning_rate: float = 1e-3
    prompt: str = "a sks face"
    seed: int = 0
    mixed_precision: str = "no"
    max_timestep: int | None = None  # fit only at timesteps below this (None: all)
    # Every identity draws the same noise and timesteps at a step, so its LiDB is a function of
    # its image alone (False: each identity's own draws, seeded by its name).
    shared_noise: bool = False

    def __post_init__(self) -> None:
        if self.identities_per_step < 1 or self.steps < 1:
            raise HyperboothError("--identities-per-step and --steps must be >= 1")
        if not self.learning_rate > 0:
            raise HyperboothError(f"--lr must be > 0, got {self.learning_rate}")
        check_max_timestep(self.max_timestep)

    def settings(self) -> dict:
        """What must match for two runs' files to belong to one set (K does not matter)."""
        data = asdict(self)
        data.pop("identities_per_step")
        # Left out at their defaults, so sets fitted before the settings existed still match.
        if data["max_timestep"] is None:
            data.pop("max_timestep")
        if not data["shared_noise"]:
            data.pop("shared_noise")
        return json.loads(json.dumps(data))  # as stored: tuples become lists


def identity_names(paths: list[Path]) -> list[str]:
    """Each image's identity name (its file stem); two images with one stem are an error."""
    names = [path.stem for path in paths]
    seen: dict[str, Path] = {}
    for name, path in zip(names, paths, strict=True):
        if name in seen:
            raise HyperboothError(
                f"two images share the identity name {name!r} ({seen[name]}, {path}); "
                "rename one: each file's stem names its identity"
            )
        seen[name] = path
    return names


def _identity_seed(seed: int, name: str, step: int) -> int:
    """A seed for one identity's noise at one step (independent of K and of its chunk)."""
    digest = hashlib.sha256(f"{seed}/{name}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_settings(out_dir: Path, settings: dict, accelerator: Accelerator) -> None:
    """Write settings.json on a first run; refuse to mix files fitted with other settings."""
    path = out_dir / SETTINGS
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            raise HyperboothError(f"{path} is damaged; pass a new --out") from None
        # sets fitted before settings.json named the base are taken to share it
        stored = {"base_unet": settings.get("base_unet"), **stored}
        if stored != settings:
            changed = sorted(k for k in settings if stored.get(k) != settings[k])
            raise HyperboothError(
                f"{out_dir} holds identities fitted with other settings (differs in "
                f"{', '.join(changed) or 'keys'}); pass a new --out or the same settings"
            )
    elif accelerator.is_main_process:
        write_text(path, json.dumps(settings, indent=2))
    accelerator.wait_for_everyone()


def fit_chunk(
    base: object,
    names: list[str],
    paths: list[Path],
    config: PrecomputeConfig,
    device: torch.device,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[float], dict]:
    """Fit one LiDB per image in a single batch; (tensors by identity, final losses, metadata)."""
    images = [load_image(path, base.resolution) for path in paths]
    mean, std = encode_images(base, images, device)  # (K, C, h, w) each
    ids = token_ids(base, config.prompt).to(device).expand(len(names), -1)
    adapter = add_adapter(base, config.adapter, name=_PRECOMPUTE, n_samples=len(names))
    try:
        params = adapter.parameters()
        # A fresh optimiser per chunk; AdamW is elementwise, so identities never interact.
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        # fp16 (GPUs without bf16) needs loss scaling; an overflowing step is then skipped for
        # the whole chunk, the one way identities fitted together can differ from one at a time
        fp16 = resolve_precision(device, config.mixed_precision) == "fp16"
        scaler = torch.amp.GradScaler(device.type) if fp16 else None
        losses = torch.zeros(len(names))
        for step in range(config.steps):
            latents, noise, timesteps = [], [], []
            for i, name in enumerate(names):
                key = "" if config.shared_noise else name
                generator = torch.Generator().manual_seed(_identity_seed(config.seed, key, step))
                latents.append(sample_latents(mean[i : i + 1], std[i : i + 1], generator))
                drawn, t = draw_noise(base.scheduler, latents[-1], generator, config.max_timestep)
                noise.append(drawn)
                timesteps.append(t)
            with autocast(device, config.mixed_precision):
                hidden = base.text_encoder(ids)[0]
                per_identity = noised_loss(
                    base.unet,
                    base.scheduler,
                    torch.cat(latents),
                    hidden,
                    torch.cat(noise).to(device),
                    torch.cat(timesteps).to(device),
                    reduce=False,
                )
            # A sum: identity i's gradient is exactly the gradient of its own loss.
            total = per_identity.sum()
            if scaler is None:
                total.backward()
                optimizer.step()
            else:
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses = per_identity.detach().float().cpu()
        fitted = adapter.state_dict()  # (K, ...) per key
        tensors = {
            name: {key: value[i].clone() for key, value in fitted.items()}
            for i, name in enumerate(names)
        }
        metadata = adapter_metadata(adapter, base_name=getattr(base, "name", ""))
    finally:
        adapter.remove()
    return tensors, losses.tolist(), metadata


def _with_info(metadata: dict, info: dict) -> dict:
    """The adapter metadata with this identity's info filled in."""
    meta = json.loads(metadata[METADATA_KEY])
    meta["info"] = info
    return {METADATA_KEY: json.dumps(meta)}


def precompute(
    base: object,
    images: str | Path,
    out_dir: str | Path,
    config: PrecomputeConfig,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict:
    """Fit every identity in `images` not yet in out_dir; returns (and writes) the manifest."""
    check_max_timestep(config.max_timestep, base.scheduler.config.num_train_timesteps)
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = collect_images(images)
    names = identity_names(paths)
    # the base's UNet weights belong to the settings: a LiDB fits the base it was fitted on
    settings = {**config.settings(), "base_unet": weights_fingerprint(base.unet)}
    _check_settings(out_dir, settings, accelerator)
    todo = [(n, p) for n, p in zip(names, paths, strict=True) if not _done(out_dir, n, p)]
    accelerator.wait_for_everyone()  # every process has listed the work before any file appears
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    base.to(accelerator.device)
    k = config.identities_per_step
    chunks = [mine[start : start + k] for start in range(0, len(mine), k)]
    bar = tqdm(
        total=len(mine),
        desc=f"precompute [{accelerator.process_index}]",
        disable=not progress,
        position=accelerator.process_index,
    )
    started = time.perf_counter()
    for chunk in chunks:
        chunk_names, chunk_paths = [n for n, _ in chunk], [p for _, p in chunk]
        fitted, losses, metadata = fit_chunk(
            base, chunk_names, chunk_paths, config, accelerator.device
        )
        for name, path, loss in zip(chunk_names, chunk_paths, losses, strict=True):
            info = {
                "identity": name,
                "image": path.name,
                "image_sha256": file_sha256(path),
                "final_loss": loss,
                "settings": config.settings(),
            }
            atomic_save_safetensors(fitted[name], _file(out_dir, name), _with_info(metadata, info))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    manifest = _manifest(out_dir, names, config, seconds, len(mine))
    if accelerator.is_main_process:
        write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2))
    accelerator.wait_for_everyone()
    return manifest


def _file(out_dir: Path, name: str) -> Path:
    """Where identity `name`'s adapter goes."""
    return out_dir / f"{name}.safetensors"


def _done(out_dir: Path, name: str, image: Path) -> bool:
    """Whether identity `name` is fitted, to this very image (a changed image is fitted again)."""
    path = _file(out_dir, name)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()[METADATA_KEY])["info"]
    return info.get("image_sha256") == file_sha256(image)


def _manifest(
    out_dir: Path, names: list[str], config: PrecomputeConfig, seconds: float, fitted: int
) -> dict:
    """What out_dir holds: every finished identity with its image hash and final loss."""
    identities = {}
    for name in names:
        path = _file(out_dir, name)
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()[METADATA_KEY])["info"]
            identities[name] = {
                "file": path.name,
                "image": info["image"],
                "image_sha256": info["image_sha256"],
                "final_loss": info["final_loss"],
            }
    return {
        "settings": config.settings(),
        "identities": identities,
        "complete": len(identities) == len(names),
        # This process's share of the last run (each process fits about the same number).
        "last_run": {"identities_fitted_by_this_process": fitted, "seconds": seconds},
    }
