"""Training the hypernetwork (METHOD 3.2) in the shared loop: checkpoints, exact resume, data parallel.

Loss for a batch of identity images x with pre-optimised LiDB weights theta*:

    alpha * diffusion_loss(base + LiDB(theta_hat(x)), x, "a sks face") + beta * mean((theta_hat - theta*)^2)
    + gamma * mean((eps(x_t; base + LiDB(theta_hat(x))) - eps(x_t; base + LiDB(theta*)))^2)

Each batch element runs the frozen base with its own predicted LiDB (the per-sample adapter
path, with the predicted tensors passed in by torch.func.functional_call so gradients reach the
hypernetwork). Every term is logged; any of them may be 0.

The third term (an extension of the paper, off by default) distils in function space: on the
same noised latents, the UNet with the predicted weights should predict what it predicts with
the pre-optimised ones. Its target is the fitted model's denoised estimate, not the drawn noise,
so it is far less noisy than the diffusion term, and it ignores whatever part of a fitted LiDB
does not change the UNet's output.

Optional views (an extension of the paper, which reconstructs the input image itself): other
captioned images of the same identity, `<views>/<identity>/<name>.png` + `<name>.txt`. The
diffusion term's target is then drawn uniformly from the identity's reference image (with the
loss prompt) and its views (with their captions), while the hypernetwork still sees only the
reference. Weights that must redraw the face in a described new context carry the identity,
not the photo's background, style and framing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.files import check_fits, read_adapter
from hyperbooth.adapters.inject import add_adapter
from hyperbooth.atomic import file_sha256, write_text
from hyperbooth.diffusion import (
    check_max_timestep,
    diffusion_target,
    draw_noise,
    sample_latents,
)
from hyperbooth.errors import HyperboothError
from hyperbooth.hypernet.model import (
    HyperNetConfig,
    HyperNetwork,
    encoder_fingerprint,
    save_hypernet,
)
from hyperbooth.images import load_image, to_tensor
from hyperbooth.methods.common import encode_images, token_ids
from hyperbooth.training import StepBatch, TrainConfig, TrainResult, train

HYPERNET_DIR = "hypernet"
LOSS_TERMS_LOG = "loss_terms.jsonl"  # one line per micro-step, kept across resumes
_NAME = "hypernet"  # the per-sample adapter's name inside the base


@dataclass
class HyperLossConfig:
    """The terms of the hypernetwork's loss and the prompt they use."""

    alpha: float = 1.0  # diffusion loss with the predicted weights
    beta: float = 1.0  # mean squared distance to the pre-optimised weights
    # mean squared distance between the UNet's outputs with predicted and pre-optimised weights
    gamma: float = 0.0
    prompt: str = "a sks face"
    max_timestep: int | None = None  # the diffusion term's timesteps are below this (None: all)

    def __post_init__(self) -> None:
        terms = (self.alpha, self.beta, self.gamma)
        if min(terms) < 0 or sum(terms) == 0:
            raise HyperboothError("--alpha, --beta and --gamma must be >= 0 and not all 0")
        check_max_timestep(self.max_timestep)


@dataclass
class IdentitySet:
    """Training data: identity images and their pre-optimised LiDB tensors, aligned by index."""

    names: list[str]
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1], the hypernetwork's input
    latent_mean: torch.Tensor  # (N, C, h, w), VAE posterior * scaling_factor
    latent_std: torch.Tensor
    targets: dict[str, torch.Tensor]  # key -> (N, ...) as the adapter stores it
    # The files' adapter config (precompute's settings.json makes it one for all files).
    adapter: AdapterConfig | None = None
    views: ViewSet | None = None


@dataclass
class ViewSet:
    """Other captioned images of the identities: diffusion targets beside the reference."""

    latent_mean: torch.Tensor  # (M, C, h, w), VAE posterior * scaling_factor
    latent_std: torch.Tensor
    ids: torch.Tensor  # (M, 77) token ids of each view's caption
    of_identity: list[list[int]]  # identity index -> its rows in the tensors above


def load_views(base: object, folder: str | Path, names: list[str]) -> ViewSet:
    """Encode `<folder>/<name>/*.png` (each with a .txt caption) for every identity name."""
    from hyperbooth.retrieve import captioned_images

    folder = Path(folder)
    if not folder.is_dir():
        raise HyperboothError(
            f"--views {folder} is not a folder; give one holding <identity>/<view>.png + .txt"
        )
    pictures, captions, of_identity = [], [], []
    for name in names:
        rows = []
        if (folder / name).is_dir():
            for path, text in captioned_images(folder / name):
                rows.append(len(pictures))
                pictures.append(load_image(path, base.resolution))
                captions.append(text)
        of_identity.append(rows)
    if not pictures:
        raise HyperboothError(
            f"--views {folder} has no folder named after any identity (e.g. {folder / names[0]})"
        )
    device = next(base.unet.parameters()).device
    mean, std = encode_images(base, pictures, device, chunk=64)
    return ViewSet(mean, std, token_ids(base, captions), of_identity)


def load_identity_set(
    base: object,
    images: str | Path,
    precomputed: str | Path,
    views: str | Path | None = None,
) -> IdentitySet:
    """Pair each pre-optimised identity in `precomputed` (its manifest) with its image (and views)."""
    images, precomputed = Path(images), Path(precomputed)
    manifest_path = precomputed / "manifest.json"
    if not manifest_path.is_file():
        raise HyperboothError(
            f"{precomputed} has no manifest.json; run `hyperbooth precompute --out {precomputed}`"
        )
    try:
        identities = json.loads(manifest_path.read_text())["identities"]
    except (ValueError, KeyError, TypeError):
        raise HyperboothError(
            f"{manifest_path} is damaged; rerun `hyperbooth precompute --out {precomputed}` "
            "(it keeps the fitted files and rewrites the manifest)"
        ) from None
    if not identities:
        raise HyperboothError(f"{precomputed} holds no fitted identities")
    names, pictures, targets, adapter = [], [], {}, None
    for name, entry in sorted(identities.items()):
        image = images / entry["image"]
        if not image.is_file():
            raise HyperboothError(f"identity {name}: its image {image} is missing from {images}")
        recorded = entry.get("image_sha256")
        if recorded and file_sha256(image) != recorded:
            raise HyperboothError(
                f"identity {name}: {image} changed since its LiDB was fitted; rerun `hyperbooth "
                f"precompute --out {precomputed}` with the same --images (it refits changed ones)"
            )
        file = read_adapter(precomputed / entry["file"])
        check_fits(file, base, precomputed / entry["file"])
        adapter = adapter or file.config
        names.append(name)
        pictures.append(load_image(image, base.resolution))
        for key, value in file.tensors.items():
            targets.setdefault(key, []).append(value)
    device = next(base.unet.parameters()).device
    mean, std = encode_images(base, pictures, device)
    return IdentitySet(
        names=names,
        pixels=torch.stack([to_tensor(p) for p in pictures]),
        latent_mean=mean,
        latent_std=std,
        targets={key: torch.stack(values) for key, values in targets.items()},
        adapter=adapter,
        views=None if views is None else load_views(base, views, names),
    )


class _WithParameters(nn.Module):
    """Call `module` with some of its parameters replaced (gradients flow to the replacements)."""

    def __init__(self, module: nn.Module, replacements: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.module = module
        self.replacements = replacements

    def forward(self, *args: object, **kwargs: object) -> object:
        """The module's forward with the replacements in place."""
        return functional_call(self.module, self.replacements, args, kwargs, strict=False)


class HyperNetTraining:
    """The hypernetwork as a Method of the shared training loop."""

    name = "hypernet"
    default_learning_rate = 1e-4

    def __init__(
        self,
        base: object,
        hypernet: HyperNetwork,
        data: IdentitySet,
        loss: HyperLossConfig,
        batch_size: int,
        log_file: Path | None = None,
    ) -> None:
        """log_file: where each step's loss terms are appended as they happen (JSON lines)."""
        self.base, self.hypernet, self.data, self.config = base, hypernet, data, loss
        self.batch_size = batch_size
        self.log_file = log_file
        missing = set(data.targets) ^ {
            f"{key}.{part}" for key in hypernet.keys for part in ("lidb_a_train", "lidb_b_train")
        }
        if missing:
            raise HyperboothError(
                "the pre-optimised weights and the hypernetwork cover different layers "
                f"(e.g. {sorted(missing)[0]}); precompute with the hypernetwork's adapter config"
            )
        self.adapter = add_adapter(base, hypernet.config.adapter, name=_NAME, n_samples=batch_size)
        for param in self.adapter.parameters():
            param.requires_grad_(False)  # only placeholders: the hypernetwork supplies the values
        self.parameter_names = self.adapter.module_parameter_names()
        self.adapts_text = any(
            owner == "text_encoder" for owner, _ in self.parameter_names.values()
        )
        self.ids = token_ids(base, loss.prompt)
        self.log: list[dict[str, float]] = []

    def trainable(self) -> dict[str, nn.Parameter]:
        """The hypernetwork's trainable tensors (the encoder's too when it trains)."""
        return {f"hypernet.{k}": p for k, p in self.hypernet.named_parameters() if p.requires_grad}

    def _replacements(self, predicted: dict[str, torch.Tensor], component: str) -> dict:
        """Predicted tensors under their parameter names inside one component."""
        return {
            name: predicted[key]
            for key, (owner, name) in self.parameter_names.items()
            if owner == component
        }

    def _targets(self, index: torch.Tensor, g: torch.Generator) -> tuple:
        """Each element's diffusion target: (latent mean, latent std, caption ids).

        Without views that is its reference image and the loss prompt; with views, one drawn
        uniformly from the reference and the identity's views.
        """
        data, views = self.data, self.data.views
        if views is None:
            return data.latent_mean[index], data.latent_std[index], self.ids.expand(len(index), -1)
        chosen = []
        for i in index.tolist():
            rows = views.of_identity[i]
            pick = int(torch.randint(0, 1 + len(rows), (1,), generator=g))
            if pick == 0:
                chosen.append((data.latent_mean[i], data.latent_std[i], self.ids[0]))
            else:
                row = rows[pick - 1]
                chosen.append((views.latent_mean[row], views.latent_std[row], views.ids[row]))
        mean, std, ids = (torch.stack(parts) for parts in zip(*chosen, strict=True))
        return mean, std, ids

    def _hidden(self, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's states for `ids` with each element's LiDB tensors `weights`."""
        text_encoder = _WithParameters(
            self.base.text_encoder, self._replacements(weights, "text_encoder")
        )
        return text_encoder(ids)[0]

    def _unet_output(
        self,
        weights: dict[str, torch.Tensor],
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        hidden: torch.Tensor,
    ) -> torch.Tensor:
        """The UNet's prediction (float32) with each element's LiDB tensors `weights`."""
        unet = _WithParameters(self.base.unet, self._replacements(weights, "unet"))
        dtype = next(self.base.unet.parameters()).dtype
        return unet(noisy.to(dtype), timesteps, hidden.to(dtype)).sample.float()

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """alpha * diffusion loss + beta * weight-space MSE + gamma * output-space MSE."""
        if batch.batch_size != self.batch_size:
            raise HyperboothError(
                f"the hypernetwork was set up for batch {self.batch_size}, got {batch.batch_size}"
            )
        g, data = batch.generator, self.data
        device = data.latent_mean.device
        index = torch.randint(0, len(data.names), (batch.batch_size,), generator=g)
        predicted = self.hypernet(data.pixels[index].to(device))
        squared = [
            (predicted[key] - target[index].to(device)).square().sum()
            for key, target in data.targets.items()
        ]
        numbers = len(index) * sum(t[0].numel() for t in data.targets.values())
        weight_loss = torch.stack(squared).sum() / numbers
        total = self.config.beta * weight_loss
        diffusion = torch.zeros((), device=device)
        if self.config.alpha > 0 or self.config.gamma > 0:
            scheduler = self.base.scheduler
            mean, std, ids = self._targets(index, g)
            latents = sample_latents(mean, std, g)
            noise, timesteps = draw_noise(scheduler, latents, g, self.config.max_timestep)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            ids = ids.to(device)
            hidden = self._hidden(predicted, ids)
            output = self._unet_output(predicted, noisy, timesteps, hidden)
            target = diffusion_target(scheduler, latents, noise, timesteps).float()
            diffusion = F.mse_loss(output, target)
            total = total + self.config.alpha * diffusion
        terms = {"diffusion": diffusion.item(), "weights": weight_loss.item()}
        if self.config.gamma > 0:
            with torch.no_grad():
                fitted = {key: stored[index].to(device) for key, stored in data.targets.items()}
                if self.adapts_text:  # else the text states do not depend on the weights
                    hidden = self._hidden(fitted, ids)
                teacher = self._unet_output(fitted, noisy, timesteps, hidden)
            distill = F.mse_loss(output, teacher)
            total = total + self.config.gamma * distill
            terms["distill"] = distill.item()
        self.log.append(terms)
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(terms) + "\n")
        return total

    def save(self, out_dir: Path) -> Path:
        """Write <out>/hypernet/ (weights + JSON) and the per-step loss terms."""
        folder = Path(out_dir) / HYPERNET_DIR
        views = self.data.views
        info = {
            "loss": asdict(self.config),
            "identities": len(self.data.names),
            "views": 0 if views is None else len(views.ids),
        }
        save_hypernet(self.hypernet, folder, info)
        write_text(Path(out_dir) / "loss_terms.json", json.dumps(self.log))
        return folder


def _logged_terms(out: Path, log_file: Path, resume: bool, per_step: int) -> list[dict]:
    """The loss terms up to the checkpoint a resumed run starts from (rewrites log_file)."""
    from hyperbooth.training import CHECKPOINT_DIR

    kept: list[str] = []
    state = out / CHECKPOINT_DIR / "state.json"
    if resume and log_file.is_file() and state.is_file():
        step = json.loads(state.read_text())["step"]
        kept = log_file.read_text().splitlines()[: step * per_step]
    out.mkdir(parents=True, exist_ok=True)
    write_text(log_file, "".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


def train_hypernet(
    base: object,
    images: str | Path,
    precomputed: str | Path,
    out: str | Path,
    config: HyperNetConfig,
    loss: HyperLossConfig,
    train_config: TrainConfig,
    accelerator: object,
    resume: bool = False,
    progress: bool = True,
    views: str | Path | None = None,
) -> tuple[TrainResult, int]:
    """Train a hypernetwork on precomputed identities; (the loop's result, identities used).

    config.adapter is replaced by the precomputed files' own adapter config, so the
    hypernetwork always predicts exactly the layers and sizes it was taught.
    """
    from dataclasses import replace

    from hyperbooth.adapters.inject import target_layers

    base.to(accelerator.device)
    check_max_timestep(loss.max_timestep, base.scheduler.config.num_train_timesteps)
    data = load_identity_set(base, images, precomputed, views)
    config = replace(config, adapter=data.adapter)
    layers = {
        key: tuple(layer.weight.shape) for key, layer in target_layers(base, data.adapter).items()
    }
    torch.manual_seed(train_config.seed)  # the hypernetwork's initial weights
    hypernet = HyperNetwork(config, layers).to(accelerator.device)
    log_file = Path(out) / LOSS_TERMS_LOG if accelerator.is_main_process else None
    method = HyperNetTraining(base, hypernet, data, loss, train_config.batch_size, log_file)
    if log_file is not None:
        method.log = _logged_terms(Path(out), log_file, resume, train_config.gradient_accumulation)
    run_info = {"hypernet": json.loads(config.to_json()), "loss": asdict(loss)}
    fingerprint = encoder_fingerprint(config.encoder)
    if fingerprint is not None:  # a resumed run must read faces through the same network
        run_info["encoder_fingerprint"] = fingerprint
    if views is not None:
        run_info["views"] = str(views)
    try:
        result = train(method, train_config, out, accelerator, resume, run_info, progress)
    finally:
        method.adapter.remove()
    return result, len(data.names)
