"""HyperDreamBooth at personalisation time (METHOD 3.3): predict, merge, rank-relaxed fast fine-tune.

    image --hypernetwork--> LiDB theta_hat --merge--> frozen base'
          --40 steps, fresh rank-r LoRA (up = 0), plain diffusion loss--> relaxed LoRA
    one file: parts "prediction" (LiDB) and "relaxed" (LoRA); exports as one rank-(1 + r) LoRA.

Ablations: no hypernetwork (fine-tune from zero), hypernetwork only, K iterations, rank, steps.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.files import save_adapter_parts
from hyperbooth.adapters.inject import Adapter, add_adapter, target_layers
from hyperbooth.errors import HyperboothError
from hyperbooth.hypernet.model import HyperNetwork
from hyperbooth.images import to_tensor
from hyperbooth.training import TrainConfig, make_accelerator, train

if TYPE_CHECKING:
    from hyperbooth.methods import SubjectConfig

PREDICTION, RELAXED = "prediction", "relaxed"


@dataclass
class PersonalizeConfig:
    """The fast path's settings (METHOD 3.3 defaults: r = 4, ~40 steps)."""

    use_hypernet: bool = True  # False: --no-hypernet, the fine-tune starts from the bare base
    fine_tune: bool = True  # False: --hypernet-only
    iterations: int | None = None  # K; None: the hypernetwork's own
    rank: int = 4
    steps: int = 40
    learning_rate: float = 1e-3
    # Noise draws of the photo per step: on a CPU a batch of B costs less than B steps of 1.
    batch_size: int = 1
    token: str = "sks"
    class_name: str = "face"
    # The fine-tune's prompt; None: "a {token} {class_name}". Naming what the photo shows besides
    # the subject ("..., on a white background") leaves the relaxed LoRA the subject alone.
    prompt: str | None = None
    seed: int = 0
    mixed_precision: str = "no"
    device: str = "auto"
    # The relaxed LoRA's layers; None: the hypernetwork's (without one, METHOD 3.1's defaults).
    unet_targets: tuple[str, ...] | None = None
    text_encoder_targets: tuple[str, ...] | None = None
    max_timestep: int | None = None  # the fine-tune sees only timesteps below this (None: all)
    # With a mask of the subject (personalize's `mask`), the fine-tune's loss weighs it
    # 1 + mask_weight times the rest of the picture; 0: a uniform loss.
    mask_weight: float = 0.0
    # The fine-tune's learning-rate schedule (TrainConfig.lr_scheduler / lr_warmup_steps).
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None

    def __post_init__(self) -> None:
        if not (self.use_hypernet or self.fine_tune):
            raise HyperboothError("--no-hypernet and --hypernet-only together leave nothing to do")
        if self.rank < 1 or self.steps < 1 or self.batch_size < 1:
            raise HyperboothError("--rank, --steps and --batch-size must be >= 1")
        if not self.learning_rate > 0:
            raise HyperboothError(f"--lr must be > 0, got {self.learning_rate}")
        if self.iterations is not None and self.iterations < 1:
            raise HyperboothError(f"--iterations must be >= 1, got {self.iterations}")
        for flag, patterns in (
            ("--unet-targets", self.unet_targets),
            ("--text-encoder-targets", self.text_encoder_targets),
        ):
            for pattern in patterns or ():
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise HyperboothError(f"{flag} {pattern!r} is not a regex ({error})") from None
        if self.mask_weight and not self.fine_tune:
            raise HyperboothError("--mask weighs the fine-tune's loss; --hypernet-only has none")
        # A --prompt without the token, or a negative --mask-weight, fails here, before anything
        # loads.
        self.subject()

    def subject(self) -> SubjectConfig:
        """The fast fine-tune's subject settings: token, class, prompt, timesteps, mask weight."""
        from hyperbooth.methods import SubjectConfig

        return SubjectConfig(
            token=self.token,
            class_name=self.class_name,
            instance_prompt=self.prompt,
            max_timestep=self.max_timestep,
            mask_weight=self.mask_weight,
        )


@dataclass
class PersonalizeResult:
    """What personalize wrote and how long each stage took."""

    output: Path
    seconds: dict[str, float]
    parts: list[str]
    bytes: int


def predict(
    base: object, hypernet: HyperNetwork, image: Image.Image, iterations: int | None = None
) -> Adapter:
    """Add the hypernetwork's LiDB for `image` to the base as adapter 'prediction'."""
    layers = target_layers(base, hypernet.config.adapter)
    shapes = {key: list(layer.weight.shape) for key, layer in layers.items()}
    if shapes != hypernet.layer_shapes:
        differ = sorted(set(shapes) ^ set(hypernet.layer_shapes)) or [
            k for k in shapes if shapes[k] != hypernet.layer_shapes[k]
        ]
        raise HyperboothError(
            f"the hypernetwork was trained for another base (layer {differ[0]} differs); "
            "pass the --base it was trained on"
        )
    device = next(base.unet.parameters()).device
    pixels = to_tensor(image.convert("RGB").resize((base.resolution,) * 2))[None].to(device)
    with torch.no_grad():
        tensors = hypernet.to(device).eval()(pixels, iterations)
    adapter = add_adapter(base, hypernet.config.adapter, name=PREDICTION)
    adapter.load_state_dict({key: value[0] for key, value in tensors.items()})
    return adapter


def personalize(
    base: object,
    hypernet: HyperNetwork | None,
    image: Image.Image,
    out: str | Path,
    config: PersonalizeConfig,
    progress: bool = True,
    mask: np.ndarray | None = None,
    distributed: bool = True,
) -> PersonalizeResult:
    """One image -> one adapter file; the base is left with the adapters in place (unmerged).

    mask: (H, W) in [0, 1], white on the subject, sized like the image as the base sees it;
    the fine-tune's loss weighs it 1 + config.mask_weight times the rest. distributed=False:
    this process fine-tunes alone under `accelerate launch` (TrainConfig.distributed).
    """
    from hyperbooth.methods import make_method, prepare_subject

    out = Path(out)
    if out.suffix != ".safetensors":
        raise HyperboothError(f"--out must be a .safetensors file, got {out}")
    if config.use_hypernet and hypernet is None:
        raise HyperboothError("pass --hypernet (or --no-hypernet to fine-tune from the base alone)")
    if (mask is None) != (config.mask_weight == 0):
        raise HyperboothError(
            "--mask and --mask-weight go together: a mask of the subject and its weight (> 0)"
        )
    train_config = TrainConfig(  # the fine-tune's loop
        steps=config.steps,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        seed=config.seed,
        mixed_precision=config.mixed_precision,
        device=config.device,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        distributed=distributed,
    )
    accelerator = make_accelerator(train_config)
    # Predict and fine-tune where the accelerator trains (CUDA when present), wherever the
    # caller loaded the base (the demo loads it on the CPU).
    base.to(accelerator.device)
    seconds: dict[str, float] = {}
    parts: dict[str, tuple[Adapter, dict]] = {}
    subject = config.subject()
    info = {"method": "hyperdreambooth", "prompt": subject.prompt, "settings": asdict(config)}
    if hypernet is not None and config.use_hypernet:  # which network made the prediction
        info["hypernet"] = getattr(hypernet, "source", {})  # load_hypernet sets it
    prediction = None
    if config.use_hypernet:
        started = time.perf_counter()
        prediction = predict(base, hypernet, image, config.iterations)
        seconds["predict"] = time.perf_counter() - started
        parts[PREDICTION] = (prediction, info)
    if config.fine_tune:
        if prediction is not None:
            prediction.merge()  # frozen from here on; the relaxed LoRA learns on top of it
        masks = None if mask is None else [mask]
        data = prepare_subject(base, subject, [image], accelerator.device, out.parent, False, masks)
        lora = replace(
            hypernet.config.adapter if hypernet is not None else AdapterConfig(),
            kind="lora",
            rank=config.rank,
            alpha=None,
        )
        if config.unet_targets is not None:
            lora = replace(lora, unet_targets=tuple(config.unet_targets))
        if config.text_encoder_targets is not None:
            lora = replace(lora, text_encoder_targets=tuple(config.text_encoder_targets))
        method = make_method("lora", base, subject, data, lora)
        result = train(method, train_config, out.parent, accelerator, progress=progress, save=False)
        seconds["fine_tune"] = result.seconds
        if prediction is not None:
            prediction.unmerge()  # stored and applied as separate parts
        parts[RELAXED] = (method.adapter, info)  # the LoRA is the method's "default" adapter
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_adapter_parts(parts, out, base_name=getattr(base, "name", ""))
    seconds["save"] = time.perf_counter() - started
    return PersonalizeResult(out, seconds, list(parts), out.stat().st_size)
