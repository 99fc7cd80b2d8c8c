"""Personalisation methods: each a config + which parameters train + the loss for a batch."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from PIL import Image

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.adapters.inject import add_adapter, target_layers, weights_fingerprint
from hyperbooth.choices import METHODS, NEW_WORD_METHODS
from hyperbooth.errors import HyperboothError
from hyperbooth.methods.common import SubjectConfig, SubjectData, SubjectMethod, prepare_subject
from hyperbooth.methods.custom_diffusion import (
    CUSTOM_DIFFUSION_FILE,
    CustomDiffusion,
    CustomDiffusionConfig,
)
from hyperbooth.methods.dreambooth import DreamBooth, DreamBoothConfig
from hyperbooth.methods.lora import ADAPTER_FILE, AdapterDreamBooth, AdapterMethodConfig
from hyperbooth.methods.textual_inversion import TextualInversion, TextualInversionConfig
from hyperbooth.training import TrainConfig, TrainResult, make_accelerator, train


def make_method(
    name: str,
    base: object,
    subject: SubjectConfig,
    data: SubjectData,
    adapter: AdapterConfig | None = None,
    train_text_encoder: bool | None = None,
    textual_inversion: TextualInversionConfig | None = None,
    pivotal: bool = False,
    word_steps: int = 0,
    word_learning_rate: float | None = None,
) -> SubjectMethod:
    """Build a method by name; adapter/text-encoder settings apply to the methods that use them.

    pivotal (lora, lidb): a new word (textual_inversion's settings) trains beside the adapter;
    word_steps > 0: alone for those first steps, then fixed while the adapter trains;
    word_learning_rate: the word's own rate (None: the run's).
    """
    if pivotal and name not in ("lora", "lidb"):
        raise HyperboothError(f"--pivotal is for lora and lidb, not {name}")
    if name == "textual-inversion":
        return TextualInversion(base, subject, data, textual_inversion or TextualInversionConfig())
    if name == "dreambooth":
        return DreamBooth(base, subject, data, DreamBoothConfig(bool(train_text_encoder)))
    if name in ("lora", "lidb"):
        adapter = replace(adapter or AdapterConfig(), kind=name)
        te = True if train_text_encoder is None else train_text_encoder
        word = (textual_inversion or TextualInversionConfig()) if pivotal else None
        config = AdapterMethodConfig(adapter, te, word, word_steps, word_learning_rate)
        return AdapterDreamBooth(base, subject, data, config)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def personalise(
    base: object,
    images: list[Image.Image],
    out_dir: str | Path,
    method: str = "lidb",
    subject: SubjectConfig | None = None,
    adapter: AdapterConfig | None = None,
    train_config: TrainConfig | None = None,
    train_text_encoder: bool | None = None,
    resume: bool = False,
    progress: bool = True,
    textual_inversion: TextualInversionConfig | None = None,
    custom_diffusion: CustomDiffusionConfig | None = None,
    pivotal: bool = False,
    word_steps: int = 0,
    masks: list | None = None,
    word_learning_rate: float | None = None,
) -> TrainResult:
    """Fit one subject with one method and save the result into out_dir.

    masks: one (H, W) array in [0, 1] per image, the subject's region (SubjectConfig.mask_weight).
    """
    subject = subject or SubjectConfig()
    train_config = train_config or TrainConfig()
    if not 0 <= word_steps <= train_config.steps:
        raise HyperboothError(
            f"--word-steps {word_steps} must be in 0..{train_config.steps} (--steps): the adapter "
            "trains in the steps after the word's"
        )
    if method == "custom-diffusion":
        if masks is not None:
            raise HyperboothError("custom-diffusion takes no masks (it rescales its images)")
        if pivotal:
            raise HyperboothError("--pivotal is for lora and lidb, not custom-diffusion")
        return personalise_concepts(
            base, [(subject, images)], out_dir, custom_diffusion, train_config, resume, progress
        )
    out_dir = Path(out_dir)
    accelerator = make_accelerator(train_config)
    base.to(accelerator.device)
    data = prepare_subject(base, subject, images, accelerator.device, out_dir, progress, masks)
    runner = make_method(
        method,
        base,
        subject,
        data,
        adapter,
        train_text_encoder,
        textual_inversion,
        pivotal,
        word_steps,
        word_learning_rate,
    )
    run_info = {
        "subject": asdict(subject),
        "method_config": _jsonable(runner),
        "inputs": _inputs(base, images, masks),
    }
    return train(runner, train_config, out_dir, accelerator, resume, run_info, progress)


def _inputs(base: object, images: list[Image.Image], masks: list | None) -> dict:
    """Hashes of what a run learns from (photos, masks, the base's UNet), checked on resume."""
    import hashlib

    import numpy as np

    photos = hashlib.sha256()
    for image in images:
        photos.update(f"{image.mode}{image.size}".encode() + image.tobytes())
    drawn = None
    if masks is not None:
        drawn = hashlib.sha256(b"".join(np.asarray(m, np.float32).tobytes() for m in masks))
    return {
        "images": photos.hexdigest()[:16],
        "masks": None if drawn is None else drawn.hexdigest()[:16],
        "base_unet": weights_fingerprint(base.unet),
    }


def personalise_concepts(
    base: object,
    concepts: list[tuple[SubjectConfig, list[Image.Image]]],
    out_dir: str | Path,
    config: CustomDiffusionConfig | None = None,
    train_config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Custom Diffusion on one or several concepts (joint training, one modifier token each).

    Every concept is regularised: by its captioned regularisation folder when it has one,
    otherwise by class images the frozen model draws (shared between concepts of one class).
    """
    config = config or CustomDiffusionConfig()
    train_config = train_config or TrainConfig()
    out_dir = Path(out_dir)
    accelerator = make_accelerator(train_config)
    base.to(accelerator.device)
    regularisation: dict[tuple, tuple[SubjectData, float]] = {}  # one per set: data, weight
    for subject, images in concepts:
        if not images:
            raise HyperboothError(
                f"concept {subject.token!r} has no images; give each concept 1-5 photos"
            )
        if not subject.regularisation_dir:
            subject.prior_preservation = True
        key = (subject.regularisation_dir, subject.prior_prompt, subject.class_images_dir)
        if key not in regularisation:  # a shared set counts once, at its first concept's weight
            data = prepare_subject(base, subject, images, accelerator.device, out_dir, progress)
            regularisation[key] = (data, subject.prior_weight)
    runner = CustomDiffusion(base, concepts, list(regularisation.values()), config)
    run_info = {
        "concepts": [asdict(subject) for subject, _ in concepts],
        "method_config": asdict(config),
    }
    return train(runner, train_config, out_dir, accelerator, resume, run_info, progress)


def _jsonable(runner: SubjectMethod) -> dict:
    """The method's own config as plain data (for checkpoint compatibility checks)."""
    config = runner.config
    if isinstance(config, AdapterMethodConfig):
        plain = {"adapter": asdict(config.adapter), "train_text_encoder": config.train_text_encoder}
        if config.new_word is None:
            return plain
        word = {"new_word": asdict(config.new_word), "word_steps": config.word_steps}
        if config.word_learning_rate is not None:  # older checkpoints have no key for it
            word["word_learning_rate"] = config.word_learning_rate
        return plain | word
    return asdict(config)


def trainable_report(
    base: object,
    method: str,
    adapter: AdapterConfig | None = None,
    train_text_encoder: bool | None = None,
) -> dict:
    """Layer count, trainable numbers and stored bytes of a method on a base (meta bases work)."""
    if method == "textual-inversion":
        n = base.text_encoder.get_input_embeddings().weight.shape[1]  # one vector by default
        return {"method": method, "layers": 1, "trainable_parameters": n, **_bytes(n)}
    if method == "custom-diffusion":
        from hyperbooth.methods.custom_diffusion import cross_attention_layers

        layers = cross_attention_layers(base.unet)
        n = sum(p.numel() for layer in layers.values() for p in layer.parameters())
        n += base.text_encoder.get_input_embeddings().weight.shape[1]  # one modifier token
        return {"method": method, "layers": len(layers), "trainable_parameters": n, **_bytes(n)}
    if method == "dreambooth":
        models = [base.unet] + ([base.text_encoder] if train_text_encoder else [])
        n = sum(p.numel() for m in models for p in m.parameters())
        layers = sum(1 for m in models for mod in m.modules() if not list(mod.children()))
        return {"method": method, "layers": layers, "trainable_parameters": n, **_bytes(n)}
    config = replace(adapter or AdapterConfig(), kind=method)
    if train_text_encoder is False:
        config = replace(config, text_encoder_targets=())
    handle = add_adapter(base, config, name=f"report_{method}")
    n = handle.num_parameters()
    by_component: dict[str, int] = {}
    for key in target_layers(base, config):
        component = key.partition(".")[0]
        by_component[component] = by_component.get(component, 0) + 1
    handle.remove()
    return {
        "method": method,
        "layers": len(handle.layers),
        "layers_by_component": by_component,
        "trainable_parameters": n,
        **_bytes(n),
        "adapter": asdict(config),
    }


def _bytes(n: int) -> dict[str, int]:
    """Storage of n numbers in float32 and float16."""
    return {"bytes_float32": 4 * n, "bytes_float16": 2 * n}


__all__ = [
    "ADAPTER_FILE",
    "CUSTOM_DIFFUSION_FILE",
    "CustomDiffusion",
    "CustomDiffusionConfig",
    "METHODS",
    "NEW_WORD_METHODS",
    "AdapterDreamBooth",
    "AdapterMethodConfig",
    "DreamBooth",
    "DreamBoothConfig",
    "SubjectConfig",
    "SubjectData",
    "TextualInversion",
    "TextualInversionConfig",
    "make_method",
    "personalise",
    "personalise_concepts",
    "prepare_subject",
    "trainable_report",
]
