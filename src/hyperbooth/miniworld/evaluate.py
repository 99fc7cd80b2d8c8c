"""Measure `mini` with the judges: does it obey text, and does personalisation on it work?

    python -m hyperbooth.miniworld.evaluate obedience --out docs/mini_obedience.json
    python -m hyperbooth.miniworld.evaluate personalisation --method lidb --out docs/...json
    python -m hyperbooth.miniworld.evaluate conditioning --out runs/conditioning.json
    python -m hyperbooth.miniworld.evaluate two-concepts --out docs/...json
    python -m hyperbooth.miniworld.evaluate identities --count 1000 --out runs/identities

Obedience: generated images for random captions (fixed seeds); the fraction of the context
attributes and of the nameable traits each prompt asks for that the judges see.
Personalisation: for held-out identities (never in the training set), one reference render ->
one adapter -> images in new prompts; identity score, hidden-trait accuracy and prompt score, next
to the same prompts on the base model without the subject.
Conditioning: how much the denoiser's loss drops when it sees the caption (no sampling).
Two concepts: pairs of held-out identities fitted three ways (Custom Diffusion joint, Custom
Diffusion merged, two LiDBs by weight); the share of two-face images showing both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.atomic import atomic_file, stored_bytes, write_text
from hyperbooth.bases import load_base
from hyperbooth.errors import HyperboothError, run_module
from hyperbooth.generate import generate_images
from hyperbooth.machine import machine_info
from hyperbooth.methods import NEW_WORD_METHODS
from hyperbooth.miniworld.captions import (
    caption,
    nameable,
    pair_caption,
    prompt_for,
    sample_training_example,
)
from hyperbooth.miniworld.judges import Judge, Reading, identity_score, prompt_score
from hyperbooth.miniworld.render import (
    CONTEXT_ATTRIBUTES,
    NAMEABLE_TRAITS,
    TRAITS,
    Context,
    Identity,
    feature_map,
    held_out,
    random_context,
    random_identity,
    render,
)
from hyperbooth.training import LR_SCHEDULERS

TOKEN = "sks"
SCORES = ("identity", "hidden", "prompt")
# The reference photo: a plain, front-on portrait, so every new prompt changes something.
REFERENCE_CONTEXT = Context(
    background_colour=0, background_pattern=0, style=0, headwear=0, framing=1
)
# New contexts to draw the subject in: each changes one or two things about the reference.
EVALUATION_CONTEXTS: tuple[dict[str, str], ...] = (
    {"headwear": "hat"},
    {"style": "pencil sketch"},
    {"background_colour": "red"},
    {"style": "flat cartoon", "background_colour": "green"},
    {"framing": "close up"},
    {"headwear": "crown", "background_pattern": "stripes"},
    {"style": "inverted colours"},
    {"framing": "far away", "background_colour": "blue"},
)


def context_indices(names: dict[str, str]) -> dict[str, int]:
    """{"style": "pencil sketch"} -> {"style": 2}."""
    return {name: CONTEXT_ATTRIBUTES[name].index(value) for name, value in names.items()}


def subject_prompt(names: dict[str, str], token: str | None = TOKEN) -> str:
    """The evaluation prompt for one context, naming the subject by token (or not, for the base)."""
    return prompt_for(context_indices(names), token=token)


def held_out_identities(count: int, seed: int = 0) -> list[Identity]:
    """count distinct identities from the held-out split, in a fixed order."""
    rng = np.random.default_rng([seed, 0x686F])  # "ho"
    found: list[Identity] = []
    while len(found) < count:
        identity = random_identity(rng)
        if held_out(identity) and identity not in found:
            found.append(identity)
    return found


def identity_images(folder: Path, count: int, seed: int = 0) -> Path:
    """count distinct training identities (never held out), one reference render each.

    Files are named by identity index, so `hyperbooth precompute --images` keys its per-identity
    files by them. Existing files are kept (a rerun tops up).
    """
    from hyperbooth.miniworld.captions import training_identity

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x6964])  # "id"
    seen: set[int] = set()
    while len(seen) < count:
        identity = training_identity(rng)
        if identity.index in seen:
            continue
        seen.add(identity.index)
        path = folder / f"id{identity.index:07d}.png"
        if not path.is_file():  # written whole or not at all: a killed run leaves no torn PNG
            with atomic_file(path) as temporary:
                render(identity, REFERENCE_CONTEXT, identity.index % 1000).save(
                    temporary, format="PNG"
                )
    return folder


def identity_views(images: Path, folder: Path, per_identity: int, seed: int = 0) -> Path:
    """per_identity renders of each identity in `images` in random contexts, each captioned.

    `<folder>/<identity>/<k>.png` with `<k>.txt`, a prompt naming every context attribute and
    the subject by TOKEN ("a sks face wearing a hat on a red background, far away, ..."), for
    `hyperbooth train-hypernet --views`. Existing files are kept (a rerun tops up).
    """
    for path in sorted(images.glob("id*.png")):
        identity = Identity.from_index(int(path.stem[2:]))
        rng = np.random.default_rng([seed, 0x7669, identity.index])  # "vi"
        out = folder / path.stem
        out.mkdir(parents=True, exist_ok=True)
        for k in range(per_identity):
            context = random_context(rng)
            render_seed = int(rng.integers(1_000_000))
            if (out / f"{k}.png").is_file():
                continue
            write_text(out / f"{k}.txt", prompt_for(context.as_dict(), token=TOKEN))
            with atomic_file(out / f"{k}.png") as temporary:
                render(identity, context, render_seed).save(temporary, format="PNG")
    return folder


def _fraction(hits: Sequence[bool]) -> float | None:
    """The mean of hits, None when empty."""
    return float(np.mean(hits)) if len(hits) else None


# --- Text obedience --------------------------------------------------------------------------------


def obedience(
    base: object,
    judge: Judge,
    prompts: int = 200,
    pair_prompts: int = 50,
    seed: int = 0,
    steps: int = 20,
    progress: bool = True,
    guidance: float = 7.5,
) -> dict:
    """How often generated images show what random captions ask for."""
    rng = np.random.default_rng([seed, 0x6F62])  # "ob"
    # The headline speed: four images of one prompt, as `hyperbooth generate --n 4` draws them.
    generate_images(base, ["a face"], n=1, steps=2, progress=False)  # warm-up
    started = time.perf_counter()
    generate_images(
        base, ["a face with red hair"], n=4, seed=seed, steps=steps, guidance=guidance,
        progress=False,
    )  # fmt: skip
    four_images = time.perf_counter() - started
    singles = []
    while len(singles) < prompts:
        described = caption(random_identity(rng), random_context(rng), rng, bare_probability=0)
        if described.mentioned:
            singles.append(described)
    # one image per caption, the same seeds and sampler for single and two-face captions
    sample = {"n": 1, "seed": seed, "steps": steps, "guidance": guidance, "batch_size": 8}
    started = time.perf_counter()
    images = generate_images(base, [c.text for c in singles], progress=progress, **sample)
    seconds = time.perf_counter() - started
    readings = judge.read([row[0] for row in images])
    asked_context, asked_traits = [], []
    per_attribute: dict[str, list[bool]] = {}
    for described, reading in zip(singles, readings, strict=True):
        for name, value in described.mentioned.items():
            shown = getattr(reading.identity if name in NAMEABLE_TRAITS else reading.context, name)
            hit = shown == value
            (asked_traits if name in NAMEABLE_TRAITS else asked_context).append(hit)
            per_attribute.setdefault(name, []).append(hit)

    pairs = []
    for _ in range(pair_prompts):
        context = random_context(rng)
        pairs.append(
            pair_caption(
                random_identity(rng), random_identity(rng), context, rng, bare_probability=0
            )
        )
    pair_images = generate_images(base, [c.text for c in pairs], progress=progress, **sample)
    pair_traits, pair_context, both_right = [], [], []
    for described, (left, right) in zip(
        pairs, judge.read_pairs([row[0] for row in pair_images]), strict=True
    ):
        hits = []
        for key, value in described.mentioned.items():
            side, _, name = key.rpartition(".")
            if side:
                hits.append(getattr((left if side == "left" else right).identity, name) == value)
            else:
                pair_context.append(getattr(left.context, name) == value)
        pair_traits += hits
        both_right.append(all(hits))
    return {
        "prompts": prompts,
        "context_shown": _fraction(asked_context),
        "nameable_traits_shown": _fraction(asked_traits),
        "per_attribute": {name: _fraction(hits) for name, hits in sorted(per_attribute.items())},
        "seconds_per_image": seconds / prompts,
        "seconds_for_four_images": four_images,
        "sampling_steps": steps,
        "guidance": guidance,
        "pairs": {
            "prompts": pair_prompts,
            "traits_shown": _fraction(pair_traits),
            "context_shown": _fraction(pair_context),
            "all_named_traits_of_both_faces_shown": _fraction(both_right),
        },
    }


@torch.no_grad()
def conditioning_gain(
    base: object, count: int = 256, seed: int = 0, bands: int = 4
) -> dict[str, list[float]]:
    """Epsilon-MSE on fresh captioned renders with the caption and with "", per noise band.

    The gap between the two is how much the denoiser uses the text at that noise level: a cheap
    signal of text conditioning that needs no sampling and no judge.
    """
    from hyperbooth.methods.common import encode_images, token_ids

    rng = np.random.default_rng([seed, 0x6367])  # "cg"
    pictures, texts = [], []
    for _ in range(count):
        image, text, _ = sample_training_example(rng, pair_probability=0.0, bare_probability=0.0)
        pictures.append(Image.fromarray(image))
        texts.append(text)
    device = next(base.unet.parameters()).device
    mean, _ = encode_images(base, pictures, device)

    def hidden(prompts: list[str]) -> torch.Tensor:
        return base.text_encoder(token_ids(base, prompts).to(device))[0]

    with_text, without_text = hidden(texts), hidden([""] * count)
    total = base.scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    result: dict[str, list[float]] = {"band_start": [], "captioned": [], "empty": []}
    for band in range(bands):
        low, high = band * total // bands, (band + 1) * total // bands
        timesteps = torch.randint(low, high, (count,), generator=generator)
        noise = torch.randn(mean.shape, generator=generator)
        noisy = base.scheduler.add_noise(mean, noise, timesteps)
        result["band_start"].append(low)
        for key, states in (("captioned", with_text), ("empty", without_text)):
            prediction = base.unet(noisy, timesteps, states).sample
            result[key].append(torch.nn.functional.mse_loss(prediction, noise).item())
    return result


# --- Personalisation -------------------------------------------------------------------------------


@dataclass
class PersonalisationConfig:
    """What `personalisation` fits and how it samples."""

    method: str = "lidb"  # lidb, lora, dreambooth, textual-inversion, custom-diffusion,
    # hyperdreambooth
    identities: int = 20
    steps: int = 400
    learning_rate: float | None = None  # None: the method's default
    batch_size: int = 1  # noise draws of the reference per fitting step
    images_per_prompt: int = 2
    sampling_steps: int = 20
    guidance: float = 7.5  # classifier-free guidance scale at sampling (subject and base alike)
    # Also draw and score the same fits at these guidance scales (reported under "also_guidance").
    also_guidance: tuple[float, ...] = ()
    seed: int = 0
    regularisation_images: int = 200  # custom-diffusion: captioned training renders
    rank: int = 1  # lidb, lora
    unet_targets: tuple[str, ...] | None = None  # lidb, lora: None keeps METHOD 3.1's layer set
    train_text_encoder: bool | None = None  # None: the method's default
    # Prior preservation on captioned training renders (always on for custom-diffusion).
    regularise: bool = False
    # Fit only at timesteps below this (None: all), and draw with the UNet's adapters on only
    # below adapter_below (None: always on).
    max_timestep: int | None = None
    adapter_below: int | None = None
    # Draw with the bare base following the prompt and the adapters adding the subject at this
    # scale (`adapters.inject.subject_guidance`); None: plain guidance.
    subject_guidance: float | None = None
    # Draw (subject and base alike) guided away from the reference's context in words ("a face
    # with no headwear on a plain white background, medium shot, shaded") instead of from the
    # empty prompt: the negative prompt of a user who says what the photo looked like.
    negative_reference: bool = False
    rescale_copies: int = 0  # SubjectConfig.rescale_copies (not for hyperdreambooth)
    # Fit with a prompt that also names the reference's context ("a sks face with no headwear on
    # a plain white background, medium shot, shaded"), so the base's own words explain the
    # context and the adapter is left the identity (hyperdreambooth: the fast fine-tune's prompt).
    describe_reference: bool = False
    # lora, lidb: a new word ("<sks>", from "face") trains beside the adapter (pivotal tuning).
    pivotal: bool = False
    word_steps: int = 0  # pivotal: the word alone first for this many of `steps`
    # textual-inversion, --pivotal: the word starts from the reference's nameable traits in words
    # ("square face with short gray hair, green eyes, ..."), as a user would describe a subject;
    # these traits (empty: off).
    describe_subject: tuple[str, ...] = ()
    word_learning_rate: float | None = None  # pivotal: the word's own rate (None: the run's)
    lr_scheduler: str | None = None  # TrainConfig.lr_scheduler (None: constant)
    # The loss weighs the reference's face features (render.feature_map, what a face parser
    # would mark) 1 + mask_weight times the rest; 0: uniform.
    mask_weight: float = 0.0
    # hyperdreambooth: the hypernetwork folder and METHOD 3.4's ablations (steps, rank and
    # learning_rate above are the fast fine-tune's).
    hypernet: str | None = None
    use_hypernet: bool = True  # False: fine-tune from the bare base
    fine_tune: bool = True  # False: the hypernetwork's prediction alone
    iterations: int | None = None  # K; None: the hypernetwork's own

    @property
    def token(self) -> str:
        """The subject's word: methods that add a new word need one the tokenizer lacks."""
        return "<sks>" if self.method in NEW_WORD_METHODS or self.pivotal else TOKEN


def regularisation_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """count training renders with their captions (name.png + name.txt): a real regularisation set."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0x7265])  # "re"
    for i in range(count):
        pixels, text, _ = sample_training_example(rng, pair_probability=0.0)
        Image.fromarray(pixels).save(folder / f"reg_{i:05d}.png")
        (folder / f"reg_{i:05d}.txt").write_text(text)
    return folder


def score_images(
    judge: Judge,
    reference: Identity,
    rows: list[list[Image.Image]],
    contexts: Sequence[dict[str, str]] = EVALUATION_CONTEXTS,
) -> dict:
    """Mean identity, hidden-trait and prompt scores of images generated for `contexts`."""
    return mean_scores(scores_by_prompt(reference, [judge.read(i) for i in rows], contexts))


def scores_by_prompt(
    reference: Identity,
    readings: Sequence[Sequence[Reading]],
    contexts: Sequence[dict[str, str]] = EVALUATION_CONTEXTS,
) -> list[dict[str, float]]:
    """Identity, hidden-trait and prompt scores per context, each the mean over its images."""
    out = []
    for names, row in zip(contexts, readings, strict=True):
        shares = [identity_score(reference, reading.identity) for reading in row]
        prompt = [prompt_score(context_indices(names), reading.context) for reading in row]
        out.append(
            {
                "identity": float(np.mean([total for total, _ in shares])),
                "hidden": float(np.mean([hidden for _, hidden in shares])),
                "prompt": float(np.mean(prompt)),
            }
        )
    return out


def trait_hits(reference: Identity, readings: Sequence[Sequence[Reading]]) -> dict[str, float]:
    """The share of all images (every prompt) that show each of the reference's traits."""
    flat = [reading.identity for row in readings for reading in row]
    return {
        name: float(np.mean([getattr(read, name) == getattr(reference, name) for read in flat]))
        for name in TRAITS
    }


def mean_scores(by_prompt: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over contexts (every context has the same number of images)."""
    return {key: float(np.mean([row[key] for row in by_prompt])) for key in SCORES}


def subject_description(identity: Identity, names: Sequence[str] = tuple(NAMEABLE_TRAITS)) -> str:
    """The identity's nameable traits in words, without an article: 'round face with red hair'."""
    unknown = sorted(set(names) - set(NAMEABLE_TRAITS))
    if unknown:
        raise HyperboothError(
            f"--describe-subject {unknown[0]!r} is not a nameable trait; choose from "
            f"{', '.join(NAMEABLE_TRAITS)}"
        )
    traits = {name: getattr(identity, name) for name in (*names, "hair_style")}
    named = {name: value for name, value in nameable(traits).items() if name in names}
    return prompt_for({}, named).split(" ", 1)[1]


def _instance_prompt(config: PersonalisationConfig) -> str | None:
    """The fitting prompt: the reference's context named with --describe-reference, else None."""
    if not config.describe_reference:
        return None
    context = REFERENCE_CONTEXT.as_dict()
    if config.rescale_copies:  # the copies' framing differs; their own words name it
        del context["framing"]
    return prompt_for(context, token=config.token)


def _fast_path(config: PersonalisationConfig) -> tuple[object, object]:
    """The hypernetwork (None for --no-hypernet) and HyperDreamBooth's personalize settings."""
    from hyperbooth.hypernet.model import load_hypernet
    from hyperbooth.hypernet.personalize import PersonalizeConfig

    hypernet = None
    if config.use_hypernet:
        if not config.hypernet:
            raise HyperboothError("hyperdreambooth needs --hypernet FOLDER (or --no-hypernet)")
        hypernet = load_hypernet(config.hypernet)
    fast = PersonalizeConfig(
        use_hypernet=config.use_hypernet,
        fine_tune=config.fine_tune,
        iterations=config.iterations,
        rank=config.rank,
        steps=config.steps,
        learning_rate=config.learning_rate or PersonalizeConfig.learning_rate,
        batch_size=config.batch_size,
        token=config.token,
        prompt=_instance_prompt(config),
        seed=config.seed,
        device="cpu",
        unet_targets=config.unet_targets,
        text_encoder_targets=() if config.train_text_encoder is False else None,
        max_timestep=config.max_timestep,
        mask_weight=config.mask_weight,
        lr_scheduler=config.lr_scheduler,
    )
    return hypernet, fast


def personalisation(
    base: object, judge: Judge, config: PersonalisationConfig, progress: bool = True
) -> dict:
    """Fit each held-out identity from one reference render; score it and the bare base."""
    from hyperbooth.hypernet.personalize import personalize
    from hyperbooth.methods import (
        CustomDiffusionConfig,
        SubjectConfig,
        TextualInversionConfig,
        personalise,
    )
    from hyperbooth.training import TrainConfig

    if config.describe_subject and config.token == TOKEN:
        raise HyperboothError(
            "--describe-subject starts a new word from a description: use it with "
            "--method textual-inversion or --pivotal"
        )
    if config.batch_size < 1 or config.sampling_steps < 1:
        raise HyperboothError("--batch-size and --sampling-steps must be >= 1")
    prompts = [subject_prompt(names, config.token) for names in EVALUATION_CONTEXTS]
    plain_prompts = [subject_prompt(names, token=None) for names in EVALUATION_CONTEXTS]
    generate = {
        "n": config.images_per_prompt,
        "seed": config.seed + 1000,
        "steps": config.sampling_steps,
        "batch_size": 8,
        "progress": False,
    }  # and the guidance of each drawing
    if config.negative_reference:
        generate["negative_prompt"] = prompt_for(REFERENCE_CONTEXT.as_dict())
    hypernet = fast = None
    if config.method == "hyperdreambooth":  # before any work: a bad --hypernet fails at once
        hypernet, fast = _fast_path(config)

    def readings_at(model: object, texts: list[str], guidance: float, **extra) -> list:
        """The judges' readings of model's images for texts at one guidance scale."""
        rows = generate_images(model, texts, **generate | {"guidance": guidance}, **extra)
        return [judge.read(row) for row in rows]

    plain_readings = readings_at(base, plain_prompts, config.guidance)
    also_plain = {g: readings_at(base, plain_prompts, g) for g in config.also_guidance}
    rows = []
    shared = tempfile.TemporaryDirectory()
    regularisation = None
    if config.method == "custom-diffusion" or config.regularise:
        regularisation = str(
            regularisation_folder(
                Path(shared.name) / "regularisation", config.regularisation_images, config.seed
            )
        )
    instance_prompt = _instance_prompt(config)
    adapter = None
    if config.method in ("lidb", "lora"):
        targets = {} if config.unet_targets is None else {"unet_targets": config.unet_targets}
        adapter = AdapterConfig(kind=config.method, rank=config.rank, **targets)
    for index, identity in enumerate(
        tqdm(held_out_identities(config.identities, config.seed), disable=not progress)
    ):
        reference = render(identity, REFERENCE_CONTEXT, config.seed + index)
        subject = copy.deepcopy(base)
        stages = None
        # --mask-weight: the loss weighs the reference's face region (its feature map)
        face_mask = (
            feature_map(REFERENCE_CONTEXT, config.seed + index) if config.mask_weight else None
        )
        with tempfile.TemporaryDirectory() as out:
            if config.method == "hyperdreambooth":
                fitted = personalize(
                    subject, hypernet, reference, Path(out) / "subject.safetensors",
                    fast, progress=False, mask=face_mask,
                )  # fmt: skip
                stages, stored = fitted.seconds, fitted.bytes
                fit_seconds = sum(v for k, v in stages.items() if k != "save")
            else:
                result = personalise(
                    subject,
                    [reference],
                    out,
                    config.method,
                    SubjectConfig(
                        token=config.token,
                        class_name="face",
                        instance_prompt=instance_prompt,
                        regularisation_dir=regularisation,
                        max_timestep=config.max_timestep,
                        rescale_copies=config.rescale_copies,
                        mask_weight=config.mask_weight,
                    ),
                    adapter,
                    TrainConfig(
                        steps=config.steps,
                        learning_rate=config.learning_rate,
                        batch_size=config.batch_size,
                        seed=config.seed,
                        device="cpu",
                        lr_scheduler=config.lr_scheduler,
                    ),
                    progress=False,
                    train_text_encoder=config.train_text_encoder,
                    textual_inversion=TextualInversionConfig(
                        initializer=subject_description(identity, config.describe_subject)
                        if config.describe_subject
                        else "face"
                    ),
                    custom_diffusion=CustomDiffusionConfig(seed=config.seed),
                    pivotal=config.pivotal,
                    word_steps=config.word_steps,
                    word_learning_rate=config.word_learning_rate,
                    masks=None if face_mask is None else [face_mask],
                )
                stored, fit_seconds = stored_bytes(result.output), result.seconds
        started = time.perf_counter()
        sampling = {"adapter_below": config.adapter_below, "subject_scale": config.subject_guidance}
        readings = readings_at(subject, prompts, config.guidance, **sampling)
        by_prompt = scores_by_prompt(identity, readings)
        base_by_prompt = scores_by_prompt(identity, plain_readings)
        row = {
            "identity": identity.index,
            "fit_seconds": fit_seconds,
            **({"stage_seconds": stages} if stages else {}),
            "generate_seconds": time.perf_counter() - started,
            "stored_bytes": stored,
            "personalised": mean_scores(by_prompt),
            "base": mean_scores(base_by_prompt),
            "personalised_by_prompt": by_prompt,
            "base_by_prompt": base_by_prompt,
            "personalised_by_trait": trait_hits(identity, readings),
        }
        if config.also_guidance:
            row["also_guidance"] = {
                str(g): {
                    "personalised_by_prompt": scores_by_prompt(
                        identity, readings_at(subject, prompts, g, **sampling)
                    ),
                    "base_by_prompt": scores_by_prompt(identity, also_plain[g]),
                }
                for g in config.also_guidance
            }
        rows.append(row)
    shared.cleanup()
    summary = {
        side: {score: float(np.mean([row[side][score] for row in rows])) for score in SCORES}
        for side in ("personalised", "base")
    }
    return {
        "config": asdict(config),
        "prompts": prompts,
        "summary": summary,
        "by_prompt": [
            {
                "text": text,
                **mean_scores([row["personalised_by_prompt"][k] for row in rows]),
                "base": mean_scores([row["base_by_prompt"][k] for row in rows]),
            }
            for k, text in enumerate(prompts)
        ],
        "by_trait": {
            name: float(np.mean([row["personalised_by_trait"][name] for row in rows]))
            for name in TRAITS
        },
        "fit_seconds_mean": float(np.mean([row["fit_seconds"] for row in rows])),
        "stored_bytes": rows[0]["stored_bytes"] if rows else None,
        **({"also_guidance": _also_guidance(rows, prompts)} if config.also_guidance else {}),
        "identities": rows,
    }


def _also_guidance(rows: list[dict], prompts: list[str]) -> dict:
    """Per extra guidance scale: the mean scores and the per-prompt means over identities."""
    out = {}
    for g in rows[0]["also_guidance"] if rows else ():
        sides = {
            side: [row["also_guidance"][g][f"{side}_by_prompt"] for row in rows]
            for side in ("personalised", "base")
        }
        out[g] = {
            "summary": {
                side: mean_scores([mean_scores(r) for r in v]) for side, v in sides.items()
            },
            "by_prompt": [
                {"text": text, **mean_scores([r[k] for r in sides["personalised"]])}
                for k, text in enumerate(prompts)
            ],
        }
    return out


# --- Two concepts in one picture (issue 6) ---------------------------------------------------------


@dataclass
class TwoConceptConfig:
    """How `two_concepts` fits each pair of identities and what counts as recognised."""

    pairs: int = 8
    steps: int = 400  # per single concept; joint training runs twice as many (the paper: 250/500)
    learning_rate: float | None = None  # custom-diffusion (None: its default)
    lidb_learning_rate: float | None = None
    images: int = 4
    sampling_steps: int = 20
    seed: int = 0
    threshold: float = 0.7  # a face half is a subject when this share of its traits match
    regularisation_images: int = 200
    approaches: tuple[str, ...] = ()  # () or a subset of TWO_CONCEPT_APPROACHES; () = all
    # The conv LoRA of the regional approaches: the layer set that personalises mini
    # (docs/MINIWORLD.md), fitted below timestep 800 so the prompt keeps the layout.
    lora_rank: int = 16
    lora_learning_rate: float = 1e-3
    lora_max_timestep: int | None = 800
    lora_rescale_copies: int = 0  # SubjectConfig.rescale_copies: faces drawn at pair size too

    def __post_init__(self) -> None:
        unknown = sorted(set(self.approaches) - set(TWO_CONCEPT_APPROACHES))
        if unknown:
            raise HyperboothError(
                f"unknown two-concept approach {unknown[0]!r}; choose from {TWO_CONCEPT_APPROACHES}"
            )


# regional: a conv LoRA per subject, each kept to its half of the picture (left / right);
# conv-everywhere: the same two LoRAs with no region (what weighting does with them).
TWO_CONCEPT_APPROACHES = ("joint", "merge", "weighting", "regional", "conv-everywhere")
# Weighting combines two LiDBs, each trained on its own rare word that the tokenizer knows.
LIDB_WORDS = ("sks", "phol")
CONV_TARGETS = (r".*resnets\.\d+\.conv[12]",)


def both_recognised(
    judge: Judge, images: Sequence[Image.Image], a: Identity, b: Identity, threshold: float
) -> dict:
    """Share of two-face images showing both subjects (either order), and the mean scores."""
    both, either, best = [], [], []
    for left, right in judge.read_pairs(images):
        la, lb = identity_score(a, left.identity)[0], identity_score(b, left.identity)[0]
        ra, rb = identity_score(a, right.identity)[0], identity_score(b, right.identity)[0]
        hits = [
            (la >= threshold and rb >= threshold),
            (lb >= threshold and ra >= threshold),
        ]
        both.append(any(hits))
        either.append(max(la, lb, ra, rb) >= threshold)
        best.append(max((la + rb) / 2, (lb + ra) / 2))
    return {
        "both": float(np.mean(both)),
        "either": float(np.mean(either)),
        "identity": float(np.mean(best)),
    }


def two_concepts(
    base: object, judge: Judge, config: TwoConceptConfig, progress: bool = True
) -> dict:
    """Fit pairs of held-out identities several ways; how often are both drawn in one picture?

    joint: Custom Diffusion on both at once; merge: Custom Diffusion on each, then the
    closed-form merge; weighting: a LiDB per subject (words sks / phol), both loaded at weight 1;
    regional: a conv LoRA per subject, the first kept to the left half, the second to the right;
    conv-everywhere: those two LoRAs with no region.
    """
    from hyperbooth.adapters.files import load_adapters
    from hyperbooth.adapters.inject import parse_region, set_region
    from hyperbooth.merge import merge_custom_diffusion
    from hyperbooth.methods import (
        CustomDiffusionConfig,
        SubjectConfig,
        personalise,
        personalise_concepts,
    )
    from hyperbooth.methods.custom_diffusion import load_custom_diffusion
    from hyperbooth.training import TrainConfig

    approaches = config.approaches or TWO_CONCEPT_APPROACHES
    identities = held_out_identities(2 * config.pairs, config.seed + 1)
    work = tempfile.TemporaryDirectory()
    root = Path(work.name)
    regularisation = None
    if {"joint", "merge"} & set(approaches):
        regularisation = str(
            regularisation_folder(
                root / "regularisation", config.regularisation_images, config.seed
            )
        )
    sample = {
        "n": config.images,
        "seed": config.seed + 2000,
        "steps": config.sampling_steps,
        "batch_size": 8,
        "progress": False,
    }

    def train_config(steps: int, lr: float | None) -> TrainConfig:
        return TrainConfig(steps=steps, learning_rate=lr, seed=config.seed, device="cpu")

    def concept(token: str) -> SubjectConfig:
        return SubjectConfig(token=token, class_name="face", regularisation_dir=regularisation)

    cd = CustomDiffusionConfig(seed=config.seed)
    cd_prompt = "a <a> face next to a <b> face"
    lidb_prompt = f"a {LIDB_WORDS[0]} face next to a {LIDB_WORDS[1]} face"
    conv_prompt = f"a {TOKEN} face next to a {TOKEN} face"
    conv = AdapterConfig(kind="lora", rank=config.lora_rank, unet_targets=CONV_TARGETS)
    rows = []
    for p in tqdm(range(config.pairs), disable=not progress, desc="pairs"):
        a, b = identities[2 * p], identities[2 * p + 1]
        refs = [render(x, REFERENCE_CONTEXT, config.seed + 2 * p + k) for k, x in enumerate((a, b))]
        out = root / f"pair{p}"
        row: dict = {"identities": [a.index, b.index]}
        seconds: dict = {}
        images = {}
        if "joint" in approaches:
            started = time.perf_counter()
            model = copy.deepcopy(base)
            personalise_concepts(
                model,
                [(concept("<a>"), [refs[0]]), (concept("<b>"), [refs[1]])],
                out / "joint",
                cd,
                train_config(2 * config.steps, config.learning_rate),
                progress=False,
            )
            seconds["joint"] = time.perf_counter() - started
            images["joint"] = generate_images(model, [cd_prompt], **sample)[0]
        if "merge" in approaches:  # separate training, then the closed-form merge
            started = time.perf_counter()
            files = []
            for token, ref in zip(("<a>", "<b>"), refs, strict=True):
                result = personalise(
                    copy.deepcopy(base),
                    [ref],
                    out / token.strip("<>"),
                    "custom-diffusion",
                    concept(token),
                    train_config=train_config(config.steps, config.learning_rate),
                    progress=False,
                    custom_diffusion=cd,
                )
                files.append(result.output)
            merged = out / "merged.safetensors"
            merge_custom_diffusion(files, copy.deepcopy(base), merged)
            model = copy.deepcopy(base)
            load_custom_diffusion(merged, model)
            seconds["merge"] = time.perf_counter() - started
            images["merge"] = generate_images(model, [cd_prompt], **sample)[0]
        if "weighting" in approaches:  # two LiDBs combined by weight
            started = time.perf_counter()
            model = copy.deepcopy(base)
            for word, ref in zip(LIDB_WORDS, refs, strict=True):
                result = personalise(
                    copy.deepcopy(base),
                    [ref],
                    out / word,
                    "lidb",
                    SubjectConfig(token=word, class_name="face"),
                    AdapterConfig(kind="lidb"),
                    train_config(config.steps, config.lidb_learning_rate),
                    progress=False,
                )
                load_adapters(result.output, model, name=f"subject_{word}", weight=1.0)
            seconds["weighting"] = time.perf_counter() - started
            images["weighting"] = generate_images(model, [lidb_prompt], **sample)[0]
        if {"regional", "conv-everywhere"} & set(approaches):  # a conv LoRA per subject
            started = time.perf_counter()
            files = []
            for k, ref in enumerate(refs):
                subject = SubjectConfig(
                    token=TOKEN,
                    class_name="face",
                    max_timestep=config.lora_max_timestep,
                    rescale_copies=config.lora_rescale_copies,
                )
                result = personalise(
                    copy.deepcopy(base),
                    [ref],
                    out / f"conv{k}",
                    "lora",
                    subject,
                    conv,
                    train_config(config.steps, config.lora_learning_rate),
                    progress=False,
                    train_text_encoder=False,
                )
                files.append(result.output)
            fitted = time.perf_counter() - started
            for name, regions in (("regional", ("left", "right")), ("conv-everywhere", None)):
                if name not in approaches:
                    continue
                model = copy.deepcopy(base)
                for k, file in enumerate(files):
                    loaded = load_adapters(file, model, name=f"subject{k}", weight=1.0)
                    if regions:
                        set_region(model, loaded, parse_region(regions[k]))
                seconds[name] = fitted
                images[name] = generate_images(model, [conv_prompt], **sample)[0]
        images["base"] = generate_images(base, ["a face next to a face"], **sample)[0]
        row["scores"] = {
            name: both_recognised(judge, pictures, a, b, config.threshold)
            for name, pictures in images.items()
        }
        row["fit_seconds"] = seconds
        rows.append(row)
    work.cleanup()
    names = (*approaches, "base")
    summary = {
        name: {
            score: float(np.mean([row["scores"][name][score] for row in rows]))
            for score in ("both", "either", "identity")
        }
        for name in names
    }
    return {
        "config": asdict(config),
        "prompts": {"custom-diffusion": cd_prompt, "weighting": lidb_prompt, "conv": conv_prompt},
        "summary": summary,
        "fit_seconds_mean": {
            name: float(np.mean([row["fit_seconds"][name] for row in rows])) for name in approaches
        },
        "pairs": rows,
    }


def _described_traits(given: list[str] | None) -> tuple[str, ...]:
    """--describe-subject's traits: none given means every nameable trait; absent means off."""
    if given is None:
        return ()
    return tuple(given) or tuple(NAMEABLE_TRAITS)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one measurement on a base (default `mini`) and write its JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what",
        choices=("obedience", "personalisation", "conditioning", "two-concepts", "identities"),
    )
    parser.add_argument("--base", default="mini")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--prompts", type=int, default=200, help="obedience: single-face prompts")
    parser.add_argument("--pair-prompts", type=int, default=50, help="obedience: two-face prompts")
    parser.add_argument(
        "--method",
        default="lidb",
        help="personalisation: lidb, lora, dreambooth, textual-inversion, custom-diffusion, "
        "hyperdreambooth",
    )
    parser.add_argument("--identities", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8, help="two-concepts: identity pairs")
    parser.add_argument(
        "--approaches",
        nargs="+",
        default=[],
        help=f"two-concepts: a subset of {', '.join(TWO_CONCEPT_APPROACHES)} (default: all)",
    )
    parser.add_argument(
        "--lidb-learning-rate", type=float, default=None, help="two-concepts: the LiDBs' rate"
    )
    parser.add_argument("--steps", type=int, default=400, help="personalisation: training steps")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument(
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        default=None,
        help="personalisation: the fit's learning-rate schedule (diffusers' names; default constant)",
    )
    parser.add_argument("--rank", type=int, default=1, help="personalisation: lidb/lora rank")
    parser.add_argument(
        "--unet-targets",
        nargs="+",
        default=None,
        help="personalisation: UNet layer patterns (regex on module paths; default METHOD 3.1's)",
    )
    parser.add_argument(
        "--no-text-encoder", action="store_true", help="personalisation: adapt the UNet only"
    )
    parser.add_argument(
        "--regularise",
        action="store_true",
        help="personalisation: prior preservation on captioned training renders",
    )
    parser.add_argument(
        "--max-timestep",
        type=int,
        default=None,
        help="personalisation: fit only at timesteps below this (default all)",
    )
    parser.add_argument(
        "--rescale",
        type=int,
        default=0,
        metavar="N",
        help="personalisation, two-concepts' conv LoRAs: N rescaled copies of the reference "
        "(0.4-1.4x, masked loss; Custom Diffusion's augmentation); 0: none",
    )
    parser.add_argument(
        "--describe-reference",
        action="store_true",
        help="personalisation: the fitting prompt also names the reference's context "
        "(background, style, headwear, framing)",
    )
    parser.add_argument(
        "--describe-subject",
        nargs="*",
        metavar="TRAIT",
        default=None,
        help="personalisation, textual-inversion and --pivotal: the new word starts from the "
        "reference's nameable traits in words, one vector per token (these traits; none "
        f"given: all of {', '.join(NAMEABLE_TRAITS)})",
    )
    parser.add_argument(
        "--word-learning-rate",
        type=float,
        default=None,
        help="personalisation, --pivotal: the word's own learning rate (default: the run's)",
    )
    parser.add_argument(
        "--pivotal",
        action="store_true",
        help="personalisation, lora and lidb: a new word trains beside the adapter",
    )
    parser.add_argument(
        "--also-guidance",
        type=float,
        nargs="*",
        default=[],
        help="personalisation: also draw and score the same fits at these guidance scales",
    )
    parser.add_argument(
        "--mask-weight",
        type=float,
        default=0.0,
        help="personalisation: the loss weighs the reference's face features 1 + this (0: uniform)",
    )
    parser.add_argument(
        "--word-steps",
        type=int,
        default=0,
        help="personalisation, --pivotal: the word trains alone for this many of --steps first",
    )
    parser.add_argument(
        "--adapter-below",
        type=int,
        default=None,
        help="personalisation: UNet adapters act only at timesteps below this (default always)",
    )
    parser.add_argument(
        "--subject-guidance",
        type=float,
        default=None,
        metavar="S",
        help="personalisation: the bare base follows the prompt, the UNet's adapters add the "
        "subject at scale S (default: plain guidance)",
    )
    parser.add_argument(
        "--negative-reference",
        action="store_true",
        help="personalisation: draw guided away from the reference's context in words (as a "
        "negative prompt) instead of from the empty prompt",
    )
    hyper = parser.add_argument_group("personalisation --method hyperdreambooth")
    hyper.add_argument(
        "--hypernet", default=None, help="train-hypernet's hypernet/ folder, or mini (built in)"
    )
    hyper.add_argument("--no-hypernet", action="store_true", help="fine-tune from the bare base")
    hyper.add_argument("--hypernet-only", action="store_true", help="no fast fine-tune")
    hyper.add_argument("--iterations", type=int, default=None, help="K refinement steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="obedience, personalisation: CFG scale"
    )
    parser.add_argument(
        "--sampling-steps",
        type=int,
        default=20,
        help="obedience, personalisation: DPM-Solver++ steps",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="personalisation: noise draws of the reference per fitting step",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--count", type=int, default=1000, help="identities: how many")
    args = parser.parse_args(argv)
    if args.what == "identities":  # --out is a folder of training-identity renders
        identity_images(Path(args.out), args.count, args.seed)
        print(f"wrote {args.count} training identities to {args.out}")
        return
    torch.set_num_threads(args.threads)
    base = load_base(args.base)
    judge = Judge.load() if args.what != "conditioning" else None
    started = time.perf_counter()
    if args.what == "conditioning":
        report = conditioning_gain(base, seed=args.seed)
    elif args.what == "obedience":
        report = obedience(
            base,
            judge,
            args.prompts,
            args.pair_prompts,
            args.seed,
            steps=args.sampling_steps,
            guidance=args.guidance,
        )
    elif args.what == "two-concepts":
        config = TwoConceptConfig(
            pairs=args.pairs,
            steps=args.steps,
            learning_rate=args.learning_rate,
            lidb_learning_rate=args.lidb_learning_rate,
            seed=args.seed,
            approaches=tuple(args.approaches),
            lora_rescale_copies=args.rescale,
        )
        report = two_concepts(base, judge, config)
    else:
        config = PersonalisationConfig(
            method=args.method,
            identities=args.identities,
            steps=args.steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=args.seed,
            rank=args.rank,
            unet_targets=None if args.unet_targets is None else tuple(args.unet_targets),
            train_text_encoder=False if args.no_text_encoder else None,
            regularise=args.regularise,
            max_timestep=args.max_timestep,
            adapter_below=args.adapter_below,
            subject_guidance=args.subject_guidance,
            negative_reference=args.negative_reference,
            rescale_copies=args.rescale,
            describe_reference=args.describe_reference,
            pivotal=args.pivotal,
            describe_subject=_described_traits(args.describe_subject),
            word_learning_rate=args.word_learning_rate,
            lr_scheduler=args.lr_scheduler,
            word_steps=args.word_steps,
            mask_weight=args.mask_weight,
            also_guidance=tuple(args.also_guidance),
            hypernet=args.hypernet,
            use_hypernet=not args.no_hypernet,
            fine_tune=not args.hypernet_only,
            iterations=args.iterations,
            guidance=args.guidance,
            sampling_steps=args.sampling_steps,
        )
        report = personalisation(base, judge, config)
    report["command"] = "python -m hyperbooth.miniworld.evaluate " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report["seconds"] = time.perf_counter() - started
    report["machine"] = machine_info()
    write_text(Path(args.out), json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "identities"}, indent=2))


if __name__ == "__main__":
    run_module(main, "hyperbooth.miniworld.evaluate")
