"""The `hyperbooth` command: parse flags into configs and call the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperbooth.atomic import read_lines, stored_bytes
from hyperbooth.errors import HyperboothError

if TYPE_CHECKING:
    import numpy as np

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str | None):
    """A torch dtype from its name (None stays None)."""
    import torch

    return None if name is None else getattr(torch, name)


DESCRIPTION = """\
Personalise Stable Diffusion-family models from a few photos of a subject.

A base (--base) is a diffusers folder, a Hugging Face hub id already in the local cache,
or a built-in: mini (the miniature world's trained model), tiny-random (tests),
sd15-arch (SD1.5 shapes, random weights).
Run `hyperbooth VERB --help` for each verb's flags."""


def _adapter_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every verb that builds an adapter."""
    from hyperbooth.adapters.config import DEFAULT_TEXT_ENCODER_TARGETS, DEFAULT_UNET_TARGETS

    g = parser.add_argument_group("adapter (lora, lidb)")
    g.add_argument("--rank", type=int, default=1, help="rank r of the LoRA / LiDB (default 1)")
    g.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="LoRA alpha; scale = alpha/rank (default: alpha = rank)",
    )
    g.add_argument("--lidb-a", type=int, default=100, help="LiDB down-aux size a (default 100)")
    g.add_argument("--lidb-b", type=int, default=50, help="LiDB up-aux size b (default 50)")
    g.add_argument(
        "--lidb-seed",
        type=int,
        default=0,
        help="seed of the frozen LiDB aux bases (stored in the file)",
    )
    g.add_argument(
        "--unet-targets",
        nargs="+",
        default=list(DEFAULT_UNET_TARGETS),
        metavar="REGEX",
        help="UNet module paths to adapt (re.fullmatch; default: attn1/attn2 to_q/k/v/out.0; "
        "nn.Linear and nn.Conv2d layers, e.g. '.*resnets\\.\\d+\\.conv[12]' for the ResNet convs)",
    )
    g.add_argument(
        "--text-encoder-targets",
        nargs="*",
        default=list(DEFAULT_TEXT_ENCODER_TARGETS),
        metavar="REGEX",
        help="text-encoder module paths to adapt (default: q/k/v/out_proj, fc1, fc2)",
    )
    g.add_argument("--no-text-encoder", action="store_true", help="adapt the UNet only")


def _adapter_config(args: argparse.Namespace, kind: str):
    """Build an AdapterConfig from the adapter flags."""
    from hyperbooth.adapters.config import AdapterConfig

    try:
        return AdapterConfig(
            kind=kind if kind in ("lora", "lidb") else "lora",
            rank=args.rank,
            alpha=args.alpha,
            lidb_a=args.lidb_a,
            lidb_b=args.lidb_b,
            seed=args.lidb_seed,
            unet_targets=tuple(args.unet_targets),
            text_encoder_targets=() if args.no_text_encoder else tuple(args.text_encoder_targets),
        )
    except ValueError as e:
        raise HyperboothError(str(e)) from e


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    """--lr-scheduler and --lr-warmup-steps, as diffusers' training scripts take them."""
    from hyperbooth.choices import LR_SCHEDULERS

    p.add_argument(
        "--lr-scheduler",
        choices=LR_SCHEDULERS,
        default=None,
        help="how the learning rate moves over the run (diffusers' schedules; default constant)",
    )
    p.add_argument(
        "--lr-warmup-steps",
        type=int,
        default=None,
        help="steps of linear warm-up from 0 to --lr first (default 0)",
    )


def _precision_flag(p: argparse.ArgumentParser) -> None:
    """--mixed-precision, as every training verb takes it."""
    from hyperbooth.choices import PRECISIONS

    p.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        default="no",
        help="autocast: bf16 helps on GPUs and on CPUs with bf16 hardware (AMX-BF16 / "
        "AVX512-BF16) and is emulated, slower, elsewhere; auto picks it where it helps",
    )


def _verb(verbs: Any, name: str, summary: str, func: Callable) -> argparse.ArgumentParser:
    """A sub-command whose --help shows its handler's docstring as written."""
    return verbs.add_parser(
        name,
        help=summary,
        description=func.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _base_flags(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--base, --device and --dtype."""
    parser.add_argument(
        "--base",
        required=required,
        default=None if required else "tiny-random",
        help="diffusers folder, cached hub id, or a built-in: mini, tiny-random, sd15-arch",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if present), cpu or cuda (pick the GPU with CUDA_VISIBLE_DEVICES)",
    )
    parser.add_argument(
        "--base-dtype",
        choices=DTYPES,
        default=None,
        help="precision of the frozen base weights (default float32; generate on CUDA: float16); "
        "trainable tensors always stay float32",
    )


def cmd_info(args: argparse.Namespace) -> None:
    """Print what a method adds to a base."""
    from hyperbooth.bases import load_base
    from hyperbooth.methods import trainable_report

    base = load_base(args.base, meta=True)
    report = trainable_report(
        base,
        args.method,
        _adapter_config(args, args.method),
        train_text_encoder=args.train_text_encoder
        if args.method == "dreambooth"
        else not args.no_text_encoder,
    )
    report = {"base": args.base, **report}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"base {args.base}, method {args.method}")
    print(f"  adapted layers       {report['layers']:,}")
    for component, n in report.get("layers_by_component", {}).items():
        print(f"    {component:<18} {n:,}")
    print(f"  trainable parameters {report['trainable_parameters']:,}")
    print(f"  bytes (float32)      {report['bytes_float32']:,}")
    print(f"  bytes (float16)      {report['bytes_float16']:,}")


def cmd_train(args: argparse.Namespace) -> None:
    """Fit one subject and save the result."""
    from hyperbooth.bases import load_base
    from hyperbooth.images import load_images
    from hyperbooth.methods import (
        CustomDiffusionConfig,
        SubjectConfig,
        TextualInversionConfig,
        personalise,
        personalise_concepts,
    )
    from hyperbooth.methods.textual_inversion import read_templates
    from hyperbooth.training import TrainConfig

    subject = SubjectConfig(
        token=args.token,
        class_name=args.class_name,
        instance_prompt=args.prompt,
        prior_preservation=args.prior_preservation,
        prior_weight=args.prior_weight,
        num_class_images=args.num_class_images,
        class_prompt=args.class_prompt,
        class_images_dir=args.class_images,
        regularisation_dir=args.regularisation,
        max_timestep=args.max_timestep,
        rescale_copies=args.rescale,
        instance_prompts=_image_captions(args) if args.captions else None,
        mask_weight=_mask_weight(args),
    )
    train_config = TrainConfig(
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
        max_grad_norm=args.max_grad_norm,
        device=args.device,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
    )
    started = time.perf_counter()
    if args.method in ("dreambooth", "custom-diffusion") and args.base_dtype not in (
        None,
        "float32",
    ):
        raise HyperboothError(
            f"{args.method} trains base weights themselves: keep --base-dtype float32"
        )
    base = load_base(args.base, dtype=_dtype(args.base_dtype or "float32"))
    if args.concept and args.method != "custom-diffusion":
        raise HyperboothError("--concept is for --method custom-diffusion (joint training)")
    if args.method == "custom-diffusion":
        concepts = _concepts(args, subject, base.resolution)
        loaded = time.perf_counter()
        config = CustomDiffusionConfig(
            initializer=args.initializer or "sks",
            train_q_out=args.train_q_out,
            rescale=not args.no_rescale,
            seed=args.seed,
        )
        result = personalise_concepts(
            base, concepts, args.out, config, train_config, resume=args.resume
        )
        prompts = [concept.prompt for concept, _ in concepts]
    else:
        images = load_images(args.images, base.resolution)
        masks = _image_masks(args, base.resolution) if args.masks else None
        loaded = time.perf_counter()
        te = args.train_text_encoder if args.method == "dreambooth" else not args.no_text_encoder
        textual_inversion = TextualInversionConfig(
            args.initializer or "face", args.vectors, read_templates(args.templates)
        )
        result = personalise(
            base,
            images,
            args.out,
            args.method,
            subject,
            _adapter_config(args, args.method),
            train_config,
            train_text_encoder=te,
            resume=args.resume,
            textual_inversion=textual_inversion,
            pivotal=args.pivotal,
            word_steps=args.word_steps,
            masks=masks,
            word_learning_rate=args.word_lr,
        )
        prompts = list(subject.instance_prompts or [subject.prompt])
        if textual_inversion.templates and args.method == "textual-inversion":
            prompts = [t.format(subject.token) for t in textual_inversion.templates]
    summary = {
        "output": str(result.output),
        "method": args.method,
        "prompt": prompts[0] if len(prompts) == 1 else prompts,
        "steps": result.steps,
        "seconds": {"load": round(loaded - started, 2), "train": round(result.seconds, 2)},
        "final_loss": result.losses[-1] if result.losses else None,
        "bytes": stored_bytes(result.output),
        "processes": result.processes,
    }
    print(json.dumps(summary, indent=2) if args.json else _lines(summary))


def _mask_weight(args: argparse.Namespace) -> float:
    """--mask-weight: 3 with --masks by default; an error without them."""
    if args.mask_weight is not None and not args.masks:
        raise HyperboothError("--mask-weight weighs the --masks regions; pass --masks DIR too")
    if args.masks and args.method == "custom-diffusion":
        raise HyperboothError("custom-diffusion takes no --masks (it rescales its images)")
    return 0.0 if not args.masks else 3.0 if args.mask_weight is None else args.mask_weight


def _image_masks(args: argparse.Namespace, resolution: int) -> list:
    """For --masks: DIR/<stem>.<any image suffix> per --images file, cropped as the image is."""
    from hyperbooth.images import IMAGE_SUFFIXES, collect_images

    folder = Path(args.masks)
    if not folder.is_dir():
        raise HyperboothError(f"--masks {folder} is not a folder of masks named like the images")
    masks = []
    for path in collect_images(args.images):
        found = [folder / f"{path.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
        found = [candidate for candidate in found if candidate.is_file()]
        if not found:
            raise HyperboothError(f"--masks: no mask for {path.name} in {folder} ({path.stem}.png)")
        masks.append(_load_mask(found[0], path, resolution, "--masks"))
    return masks


def _load_mask(mask: Path, image: Path, resolution: int, flag: str) -> np.ndarray:
    """A subject mask (H, W) in [0, 1], cropped and resized as its image is."""
    import numpy as np
    from PIL import Image

    from hyperbooth.images import load_image

    with Image.open(image) as picture, Image.open(mask) as drawn:
        if picture.size != drawn.size:
            raise HyperboothError(
                f"{flag}: {mask.name} is {drawn.size[0]}x{drawn.size[1]} but {image.name} "
                f"is {picture.size[0]}x{picture.size[1]}; a mask must match its image"
            )
    grey = load_image(mask, resolution).convert("L")
    return np.asarray(grey, dtype=np.float32) / 255.0


def _image_captions(args: argparse.Namespace) -> tuple[str, ...]:
    """For --captions: the text of name.txt beside each --images file, in the images' order."""
    from hyperbooth.images import collect_images

    if args.concept:
        raise HyperboothError("--captions reads the --images files' captions; not with --concept")
    captions = []
    for path in collect_images(args.images):
        text = path.with_suffix(".txt")
        if not text.is_file():
            raise HyperboothError(
                f"--captions: {text} is missing; write {path.name}'s prompt in it"
            )
        captions.append(" ".join(read_lines(text, "caption")))
    return tuple(captions)


def _concepts(args: argparse.Namespace, subject, resolution: int) -> list[tuple]:
    """(SubjectConfig, images) per --concept TOKEN:CLASS:IMAGES, else the one --token subject."""
    from dataclasses import replace

    from hyperbooth.images import load_images

    if not args.concept:
        return [(subject, load_images(args.images, resolution))]
    concepts = []
    for spec in args.concept:
        parts = spec.split(":", 2)
        if len(parts) != 3 or not all(parts):
            raise HyperboothError(
                f"--concept {spec!r} must be TOKEN:CLASS:IMAGES, e.g. '<new1>:face:photos/me'"
            )
        token, class_name, images = parts
        concept = replace(subject, token=token, class_name=class_name, instance_prompt=None)
        concepts.append((concept, load_images([images], resolution)))
    return concepts


def _captions(path: str | None, count: int, seed: int) -> list[str]:
    """Captions from a file (one per line), or count of the miniature world's."""
    if path is None:
        from hyperbooth.miniworld.captions import mini_captions

        return mini_captions(count, seed)
    return read_lines(path, "captions")


def _lines(summary: dict) -> str:
    """A dict as aligned 'key value' lines (dicts and lists inside it written out plainly)."""

    def plain(value: object) -> str:
        if isinstance(value, dict):
            return ", ".join(f"{k} {plain(v)}" for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return ", ".join(plain(v) for v in value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    return "\n".join(f"{k:<11} {plain(v)}" for k, v in summary.items())


def _parse_adapter_arg(text: str) -> tuple[str, float]:
    """'file.safetensors[:weight]' -> (path, weight)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not os.path.exists(text):
        try:
            return path, float(weight)
        except ValueError:
            if os.path.exists(path):
                raise HyperboothError(
                    f"{text!r}: the weight after ':' must be a number, e.g. {path}:0.8"
                ) from None
    return text, 1.0


def _check_new_words(base: object, prompts: list[str]) -> None:
    """Refuse a prompt that names a <word> the tokenizer does not know (its file is not loaded)."""
    import re

    vocabulary = base.tokenizer.get_vocab()
    for prompt in prompts:
        for word in re.findall(r"<[^<>\s]+>", prompt):
            if word not in vocabulary and f"{word}</w>" not in vocabulary:
                raise HyperboothError(
                    f"the prompt {prompt!r} names {word}, which this base does not know; load the "
                    "file that defines it (--textual-inversion or --custom-diffusion) or drop it"
                )


def _pivotal_words(specs: list[str], base: object) -> tuple[list[str], list[str]]:
    """Load the word a --pivotal adapter names from the learned_embeds file beside it.

    Returns the words and the files they came from.
    """
    from hyperbooth.adapters.files import adapter_infos
    from hyperbooth.methods.textual_inversion import load_textual_inversion

    words, files = [], []
    for spec in specs:
        path, _ = _parse_adapter_arg(spec)
        for info in adapter_infos(path):
            word = info.get("new_word")
            if not word or word["token"] in base.tokenizer.get_vocab():
                continue  # no word, or already loaded with --textual-inversion
            embeds = Path(path).parent / word["file"]
            if not embeds.is_file():
                raise HyperboothError(
                    f"{path} was trained with the word {word['token']} in {word['file']}, which "
                    f"is not beside it; pass it with --textual-inversion"
                )
            words += load_textual_inversion(embeds, base)
            files.append(str(embeds))
    return words, files


def cmd_generate(args: argparse.Namespace) -> None:
    """Draw prompts into a grid PNG plus a JSON of what produced it."""
    import torch

    from hyperbooth.adapters.files import load_adapters
    from hyperbooth.adapters.inject import parse_region, set_region
    from hyperbooth.atomic import write_text
    from hyperbooth.bases import load_base
    from hyperbooth.generate import generate_images, image_grid
    from hyperbooth.images import save_png
    from hyperbooth.training import TrainConfig, make_accelerator

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise HyperboothError(f"--out must be a .png file, got {out}")
    device = make_accelerator(TrainConfig(device=args.device)).device
    dtype = _dtype(args.base_dtype) or (torch.float16 if device.type == "cuda" else None)
    base = load_base(args.base).to(device, dtype)
    from hyperbooth.methods.custom_diffusion import load_custom_diffusion
    from hyperbooth.methods.textual_inversion import load_textual_inversion

    words = [
        token for path in args.textual_inversion for token in load_textual_inversion(path, base)
    ]
    pivotal_words, pivotal_files = _pivotal_words(args.adapter, base)
    words += pivotal_words
    concepts = []
    for spec in args.custom_diffusion:
        path, weight = _parse_adapter_arg(spec)
        tokens = load_custom_diffusion(path, base, weight)
        concepts.append({"path": str(path), "weight": weight, "tokens": tokens})
    _check_new_words(base, args.prompt)
    if args.region and len(args.region) != len(args.adapter):
        raise HyperboothError(
            f"--region was given {len(args.region)} times for {len(args.adapter)} --adapter: "
            "give one per adapter, in the same order (full for everywhere)"
        )
    regions = [parse_region(spec) for spec in args.region]  # bad specs fail before loading
    adapters = []
    for k, spec in enumerate(args.adapter):
        path, weight = _parse_adapter_arg(spec)
        loaded = load_adapters(path, base, name=f"adapter{len(adapters)}", weight=weight)
        adapters.append({"path": str(path), "weight": weight})
        if regions:
            set_region(base, loaded, regions[k])
            adapters[-1]["region"] = list(regions[k])
    started = time.perf_counter()
    rows = generate_images(
        base,
        args.prompt,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        adapter_below=args.adapter_below,
        subject_scale=args.subject_guidance,
        negative_prompt=args.negative_prompt,
    )
    seconds = time.perf_counter() - started
    save_png(image_grid(rows, labels=args.prompt), out)
    record = {
        "base": args.base,
        "adapters": adapters,
        # the words --pivotal adapters brought along are loaded from the files beside them
        "textual_inversion": {"files": args.textual_inversion + pivotal_files, "tokens": words},
        "custom_diffusion": concepts,
        "prompts": args.prompt,
        "n": args.n,
        "seed": args.seed,
        "steps": args.steps,
        "guidance": args.guidance,
        "adapter_below": args.adapter_below,
        "subject_guidance": args.subject_guidance,
        "negative_prompt": args.negative_prompt,
        "device": str(device),
        "seconds": round(seconds, 2),
        "grid": str(out),
    }
    write_text(out.with_suffix(".json"), json.dumps(record, indent=2))
    rows = f"{len(args.prompt)} prompt{'s' if len(args.prompt) > 1 else ''}"
    print(f"wrote {out} ({rows} x {args.n} images) in {seconds:.1f} s")


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge Custom Diffusion concepts into one file by constrained least squares."""
    from dataclasses import asdict

    from hyperbooth.bases import load_base
    from hyperbooth.merge import merge_custom_diffusion

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise HyperboothError(f"--out must be a .safetensors file, got {out}")
    base = load_base(args.base)
    captions = _captions(args.captions, args.num_captions, args.seed)
    report = asdict(merge_custom_diffusion(args.files, base, out, captions))
    report["output"] = str(report["output"])
    print(json.dumps(report, indent=2) if args.json else _lines(report))


def cmd_eval(args: argparse.Namespace) -> None:
    """Score generated images: CLIP-T, CLIP-I, DINO, DIV (+ the judges on the miniature world)."""
    from hyperbooth.atomic import write_text
    from hyperbooth.evaluation import (
        ClipScorer,
        DinoScorer,
        FaceScorer,
        evaluate,
        judge_scores,
        mini_real_images,
        read_generated,
        read_prompts,
    )

    prompts = read_prompts(args.prompts)
    generated = read_generated(args.generated, prompts)
    references = _open_images(args.references)
    clip = None if args.no_clip else ClipScorer(args.clip)
    dino = None if args.no_dino else DinoScorer(args.dino)
    face = FaceScorer(args.face, detect=not args.face_no_detect) if args.face else None
    class_images = _open_images(args.class_images) if args.class_images else None
    real = None
    if args.real and args.real.startswith("mini:"):
        count = args.real.partition(":")[2]
        if not count.isdigit():
            raise HyperboothError(f"--real {args.real!r}: write mini:N, e.g. mini:500")
        real = mini_real_images(int(count))
    elif args.real:
        real = _open_images([args.real])
    report = evaluate(
        generated, references, prompts, clip, dino, args.token, class_images, real, face
    )
    report |= {
        "clip_model": args.clip if clip else None,
        "dino_model": args.dino if dino else None,
        "face_model": args.face,
    }
    if args.mini_reference:
        report |= judge_scores(generated, args.mini_reference, prompts, args.token)
    if args.out:
        write_text(Path(args.out), json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else _lines(report))


def cmd_benchmark(args: argparse.Namespace) -> None:
    """Personalise every subject with every method, generate, score; table, CSV and figures.

    Finished cells are skipped on a rerun; under `accelerate launch` the cells are shared out.
    """
    from hyperbooth.bases import load_base
    from hyperbooth.benchmark import (
        BenchmarkConfig,
        mini_subjects,
        read_plan,
        read_prompt_set,
        read_subjects,
        run_benchmark,
    )

    if args.plan and args.methods:
        raise HyperboothError("give --methods or --plan, not both (a plan names its own rows)")
    methods = tuple(m.strip() for m in (args.methods or "lidb,lora").split(",") if m.strip())
    steps = {}
    for spec in args.method_steps:
        method, _, value = spec.partition("=")
        if not value.isdigit():
            raise HyperboothError(f"--method-steps {spec!r} must be METHOD=N, e.g. lidb=400")
        steps[method] = int(value)
    rates = {}
    for spec in args.method_lr:
        method, _, value = spec.partition("=")
        try:
            rates[method] = float(value)
        except ValueError:
            raise HyperboothError(
                f"--method-lr {spec!r} must be METHOD=RATE, e.g. lora=1e-3"
            ) from None
    config = BenchmarkConfig(
        methods=methods,
        rows=read_plan(args.plan) if args.plan else (),
        seeds=args.seeds,
        sampling_steps=args.sampling_steps,
        guidance=args.guidance,
        token=args.token,
        steps=steps,
        learning_rates=rates,
        adapter=_adapter_config(args, "lora"),
        hypernet=args.hypernet,
        clip=args.clip,
        dino=args.dino,
        face=args.face,
        seed=args.seed,
        device=args.device,
    )
    out = Path(args.out)
    prompts = read_prompt_set(args.prompts)  # checked before anything is written
    folder = args.subjects
    if folder.startswith("mini:"):
        count = folder.partition(":")[2]
        if not count.isdigit():
            raise HyperboothError(f"--subjects {folder!r}: write mini:N, e.g. mini:20")
        subjects = mini_subjects(out / "subjects", int(count), args.seed)
    else:
        subjects = read_subjects(folder)
    base = load_base(args.base)
    results = run_benchmark(base, subjects, prompts, config, out)
    if results is not None:
        print((out / "table.md").read_text())
        print(f"wrote {out}/table.md, results.csv, scores.png, cost.png, samples.png")


def _open_images(inputs: list[str]) -> list:
    """Every image in the given folders/files, as RGB, upright, at its own size."""
    from hyperbooth.images import collect_images, open_image

    return [open_image(p) for p in collect_images(inputs)]


def cmd_export(args: argparse.Namespace) -> None:
    """Convert an adapter to diffusers' or kohya's LoRA format."""
    from hyperbooth.adapters.export import export_adapter

    base = None
    if args.base:
        from hyperbooth.bases import load_base

        base = load_base(args.base)
    path = export_adapter(args.adapter, args.format, args.out, base)
    print(f"wrote {path}")


def cmd_precompute(args: argparse.Namespace) -> None:
    """Fit one LiDB per image in --images (its stem names the identity), K identities per step.

    Rerunning skips finished identities (and refits any whose image changed), so an interrupted
    run is resumed by running it again.
    Shard over processes or machines with accelerate, e.g.
    `accelerate launch --multi_gpu --num_processes 2 -m hyperbooth.cli precompute ...`
    (--multi_gpu selects accelerate's torchrun launcher; on CPUs it runs gloo processes).
    """
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.precompute import PrecomputeConfig, precompute
    from hyperbooth.training import TrainConfig, make_accelerator

    config = PrecomputeConfig(
        adapter=_adapter_config(args, "lidb"),
        identities_per_step=args.identities_per_step,
        steps=args.steps,
        learning_rate=args.lr,
        prompt=args.prompt,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        max_timestep=args.max_timestep,
        shared_noise=args.shared_noise,
    )
    accelerator = make_accelerator(
        TrainConfig(device=args.device, mixed_precision=args.mixed_precision)
    )
    base = load_base(args.base, dtype=_dtype(args.base_dtype or "float32"))
    manifest = precompute(base, args.images, args.out, config, accelerator)
    if accelerator.is_main_process:
        done, run = len(manifest["identities"]), manifest["last_run"]
        print(
            f"{done} identities in {args.out} (complete: {manifest['complete']}); this process "
            f"fitted {run['identities_fitted_by_this_process']} in {run['seconds']:.1f} s"
        )


def cmd_train_hypernet(args: argparse.Namespace) -> None:
    """Train the HyperDreamBooth hypernetwork on identity images and their pre-optimised LiDBs.

    Data parallel under `accelerate launch`; --checkpoint-every and --resume as for `train`.
    """
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import HyperNetConfig, local_encoder
    from hyperbooth.hypernet.train import HyperLossConfig, train_hypernet
    from hyperbooth.training import TrainConfig, make_accelerator

    train_config = TrainConfig(
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
    )
    accelerator = make_accelerator(train_config)
    base = load_base(args.base, dtype=_dtype(args.base_dtype or "float32"))
    config = HyperNetConfig(
        encoder=local_encoder(args.encoder),  # a folder by absolute path: loads from anywhere
        train_encoder=args.train_encoder,
        image_size=args.image_size or base.resolution,
        width=args.width,
        decoder_layers=args.decoder_layers,
        iterations=args.iterations,
    )
    loss = HyperLossConfig(
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        prompt=args.prompt,
        max_timestep=args.max_timestep,
    )
    result, identities = train_hypernet(
        base, args.images, args.precomputed, args.out, config, loss, train_config, accelerator,
        args.resume, views=args.views,
    )  # fmt: skip
    if accelerator.is_main_process:
        print(
            f"trained on {identities} identities in {result.seconds:.1f} s; wrote {result.output}"
        )


def cmd_personalize(args: argparse.Namespace) -> None:
    """HyperDreamBooth from one image: predict a LiDB, merge it, fine-tune a rank-r LoRA on top.

    Writes one adapter file (parts "prediction" and "relaxed") that `generate` loads and
    `export` turns into one rank-(1 + r) LoRA. Prints the time of each stage.
    """
    from hyperbooth.bases import load_base
    from hyperbooth.hypernet.model import load_hypernet
    from hyperbooth.hypernet.personalize import PersonalizeConfig, personalize
    from hyperbooth.images import load_image
    from hyperbooth.training import TrainConfig, make_accelerator

    config = PersonalizeConfig(
        use_hypernet=not args.no_hypernet,
        fine_tune=not args.hypernet_only,
        iterations=args.iterations,
        rank=args.rank,
        steps=args.steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        token=args.token,
        class_name=args.class_name,
        prompt=args.prompt,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        device=args.device,
        unet_targets=args.unet_targets,
        text_encoder_targets=() if args.no_text_encoder else None,
        max_timestep=args.max_timestep,
        mask_weight=_personalize_mask_weight(args),
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
    )
    started = time.perf_counter()
    device = make_accelerator(TrainConfig(device=args.device)).device
    base = load_base(args.base, dtype=_dtype(args.base_dtype or "float32")).to(device)
    hypernet = None
    if config.use_hypernet:
        if not args.hypernet:
            raise HyperboothError("pass --hypernet FOLDER (or --no-hypernet)")
        hypernet = load_hypernet(args.hypernet)
    image = load_image(args.image, base.resolution)
    mask = None
    if args.mask:
        if not Path(args.mask).is_file():
            raise HyperboothError(f"--mask {args.mask} is not a file (white on the subject)")
        mask = _load_mask(Path(args.mask), Path(args.image), base.resolution, "--mask")
    loaded = time.perf_counter() - started
    result = personalize(base, hypernet, image, args.out, config, mask=mask)
    seconds = {"load": loaded, **result.seconds}
    summary = {
        "output": str(result.output),
        "parts": result.parts,
        "bytes": result.bytes,
        "seconds": {stage: round(value, 3) for stage, value in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 3),
    }
    print(json.dumps(summary, indent=2) if args.json else _lines(summary))


def _personalize_mask_weight(args: argparse.Namespace) -> float:
    """personalize --mask-weight: 3 with --mask by default; an error without it."""
    if args.mask_weight is not None and not args.mask:
        raise HyperboothError("--mask-weight weighs the --mask region; pass --mask FILE too")
    return 0.0 if not args.mask else 3.0 if args.mask_weight is None else args.mask_weight


def cmd_rare_tokens(args: argparse.Namespace) -> None:
    """List identifier words: CLIP tokens seen 5-10 times in a caption corpus (Custom Diffusion),
    and short tokens from CLIP's rarer ids (DreamBooth).

    Without --captions the corpus is --mini-captions random captions of the miniature world.
    """
    from hyperbooth.bases import clip_tokenizer
    from hyperbooth.rare_tokens import custom_diffusion_tokens, dreambooth_tokens

    captions = _captions(args.captions, args.mini_captions, args.seed)
    tokenizer = clip_tokenizer()
    found = custom_diffusion_tokens(tokenizer, captions, args.low, args.high)
    sampled = dreambooth_tokens(tokenizer, args.dreambooth, args.seed)
    report = {
        "corpus": args.captions or f"{args.mini_captions} miniature-world captions",
        "captions": len(captions),
        "custom_diffusion": [{"word": w, "count": c} for w, c in found],
        "dreambooth": sampled,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"corpus: {report['corpus']}" + (f" ({len(captions)} captions)" if args.captions else ""))
    print(
        f"seen {args.low}-{args.high} times: "
        + (", ".join(f"{w} ({c})" for w, c in found) or "none")
    )
    print("short rare CLIP tokens: " + ", ".join(sampled))


def cmd_retrieve(args: argparse.Namespace) -> None:
    """Copy the images of a captioned folder (name.png + name.txt) whose caption is close to
    --prompt (cosine of the base's pooled text features >= --threshold, Custom Diffusion: 0.85)
    into --out, best first; use --out as --class-images for prior preservation."""
    from hyperbooth.bases import load_base
    from hyperbooth.retrieve import copy_matches, retrieve

    base = load_base(args.base)
    matches = retrieve(base, args.folder, args.prompt, args.threshold, args.limit)
    if not matches:
        raise HyperboothError(
            f"no caption in {args.folder} reaches similarity {args.threshold} to {args.prompt!r}; "
            "lower --threshold or add images"
        )
    copy_matches(matches, args.out)
    report = [
        {"image": m.image.name, "caption": m.caption, "similarity": round(m.similarity, 4)}
        for m in matches
    ]
    print(
        json.dumps(report, indent=2) if args.json else f"copied {len(matches)} images to {args.out}"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    """Personalise `mini` from one image of a face it never saw (HyperDreamBooth), draw it, score it."""
    from hyperbooth.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, base_spec=args.base, method=args.method)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every verb."""
    from hyperbooth.choices import EXPORT_FORMATS, METHODS

    parser = argparse.ArgumentParser(
        prog="hyperbooth",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser(
        "info",
        help="count the layers, trainable numbers and bytes a method adds to a base",
        description=cmd_info.__doc__,
    )
    _base_flags(p)
    p.add_argument("--method", choices=METHODS, default="lidb")
    p.add_argument(
        "--train-text-encoder", action="store_true", help="dreambooth: count the text encoder too"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _adapter_flags(p)
    p.set_defaults(func=cmd_info)

    p = verbs.add_parser(
        "train",
        help="fit a subject: dreambooth, lora, lidb, textual-inversion, custom-diffusion",
        description=cmd_train.__doc__,
    )
    p.add_argument("--method", choices=METHODS, required=True)
    _base_flags(p)
    p.add_argument(
        "--images",
        nargs="+",
        required=True,
        help="a folder of photos, or photo files (1-5 is typical)",
    )
    p.add_argument(
        "--out", required=True, help="output folder (adapter.safetensors or model/ + checkpoint/)"
    )
    p.add_argument("--token", default="sks", help="rare word that names the subject (default sks)")
    p.add_argument(
        "--class", dest="class_name", default="face", help="subject class (default face)"
    )
    p.add_argument("--prompt", default=None, help="instance prompt; default 'a {token} {class}'")
    p.add_argument(
        "--captions",
        action="store_true",
        help="each image's prompt is the text of name.txt beside name.png (with the token); "
        "naming what each photo shows besides the subject keeps it out of the subject",
    )
    p.add_argument(
        "--masks",
        default=None,
        metavar="DIR",
        help="a folder with one mask per image, named like it (white on the subject, e.g. from a "
        "face parser); the loss weighs the subject 1 + --mask-weight times the rest",
    )
    p.add_argument(
        "--mask-weight",
        type=float,
        default=None,
        help="with --masks: the subject's extra loss weight (default 3)",
    )
    p.add_argument("--steps", type=int, default=400)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: dreambooth 5e-6, lora 1e-4, lidb 1e-3, textual-inversion 5e-3)",
    )
    _schedule_flags(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    _precision_flag(p)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="write <out>/checkpoint every N steps"
    )
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/checkpoint")
    p.add_argument(
        "--prior-preservation", action="store_true", help="add the class-prior loss (DreamBooth)"
    )
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument(
        "--max-timestep",
        type=int,
        default=None,
        help="fit only at diffusion timesteps below this (of 1000), so the subject does not learn "
        "the photo's layout, background and style (800 on mini: docs/MINIWORLD.md)",
    )
    p.add_argument(
        "--rescale",
        type=int,
        default=0,
        metavar="N",
        help="N copies of each photo rescaled 0.4-1.4x (a shrunk one on grey with the loss masked "
        "to it, 'a far away ...'; an enlarged one cropped, 'close up ...'), so the subject is "
        "learnt at other sizes too; --masks move with the copies; 0: none (custom-diffusion has its "
        "own, see --no-rescale)",
    )
    p.add_argument("--num-class-images", type=int, default=100)
    p.add_argument("--class-prompt", default=None, help="default 'a {class}'")
    p.add_argument(
        "--class-images",
        default=None,
        help="folder of class images, reused and topped up (default <out>/class_images/<one "
        "folder per class prompt>; a folder drawn for another prompt is refused)",
    )
    p.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="dreambooth: fine-tune the text encoder too",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    g = p.add_argument_group(
        "textual-inversion and custom-diffusion (pass a new word as --token, e.g. '<me>')"
    )
    g.add_argument(
        "--initializer",
        default=None,
        help="the word the new vectors start from (default: textual-inversion face, "
        "custom-diffusion sks); textual-inversion and --pivotal also take a phrase, one vector "
        "per token (e.g. 'man with red curly hair')",
    )
    g.add_argument("--vectors", type=int, default=1, help="textual-inversion: vectors of the word")
    g.add_argument(
        "--pivotal",
        action="store_true",
        help="lora, lidb: train a new word (--token '<me>', --initializer, --vectors) beside the "
        "adapter, saved as learned_embeds.safetensors next to it (pivotal tuning; with "
        "--no-text-encoder)",
    )
    g.add_argument(
        "--word-steps",
        type=int,
        default=0,
        help="--pivotal: the word trains alone for this many of --steps first, then stays fixed "
        "while the adapter trains (default 0: both all along)",
    )
    g.add_argument(
        "--word-lr",
        type=float,
        default=None,
        help="--pivotal: the word's own learning rate (default: --lr). A word started from a "
        "long description needs a low one (e.g. 0.1x --lr), or it learns the photo's context",
    )
    g.add_argument(
        "--templates",
        default=None,
        help="textual-inversion: train in prompt templates instead of --prompt: 'photo' (the "
        "paper's 27), 'mini' (the miniature world's words) or a file, one template with {} "
        "per line",
    )
    g = p.add_argument_group("custom-diffusion")
    g.add_argument(
        "--concept",
        action="append",
        default=[],
        metavar="TOKEN:CLASS:IMAGES",
        help="joint training: one concept per flag (replaces --token/--class/--images), e.g. "
        "'<new1>:face:me/' --concept '<new2>:face:you/'",
    )
    g.add_argument(
        "--regularisation",
        default=None,
        metavar="DIR",
        help="real regularisation images with same-stem .txt captions (see `retrieve`), "
        "each trained with its own caption; any method (it turns the prior loss on); "
        "custom-diffusion default: class images drawn by the frozen model",
    )
    g.add_argument(
        "--train-q-out", action="store_true", help="also train attn2.to_q and attn2.to_out.0"
    )
    g.add_argument(
        "--no-rescale", action="store_true", help="skip the 0.4-1.4x rescale augmentation"
    )
    _adapter_flags(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser(
        "generate",
        help="draw prompts with a base and any adapters into a PNG grid (+ JSON)",
        description=cmd_generate.__doc__,
    )
    _base_flags(p)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="an adapter file; :WEIGHT scales its change (default 1); repeatable",
    )
    p.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="REGION",
        help="where the matching --adapter draws (one per --adapter, in order): left, right, top, "
        "bottom, full or x0,y0,x1,y1 as fractions; its UNet layers with a spatial output act "
        "only there, e.g. one subject per side of 'a face next to a face'",
    )
    p.add_argument(
        "--textual-inversion",
        action="append",
        default=[],
        metavar="FILE",
        help="a learned_embeds.safetensors whose words the prompts may use; repeatable",
    )
    p.add_argument(
        "--custom-diffusion",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="a custom_diffusion.safetensors (its words and K/V deltas); repeatable",
    )
    p.add_argument("--prompt", action="append", required=True, help="repeatable; one grid row each")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (DPM-Solver++)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--adapter-below",
        type=int,
        default=None,
        metavar="T",
        help="the adapters act only at timesteps below T (of 1000): the prompt alone lays out "
        "the first steps (default: always on)",
    )
    p.add_argument(
        "--subject-guidance",
        type=float,
        default=None,
        metavar="S",
        help="the bare base follows the prompt (at --guidance) and the UNet's adapters add the "
        "subject at scale S (below --adapter-below if given); one more UNet pass per step "
        "(default: plain guidance)",
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help="guide away from TEXT instead of from the empty prompt, e.g. the reference photo's "
        "own context ('a face on a plain white background, medium shot')",
    )
    p.add_argument(
        "--out", required=True, help="grid .png (a .json with the settings is written beside it)"
    )
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser(
        "merge",
        help="combine Custom Diffusion concepts in closed form (constrained least squares)",
        description=cmd_merge.__doc__
        + " Each K/V weight stays as close to the base as possible on regularisation captions"
        " while mapping every concept's prompt exactly as that concept's own weights do"
        " (float64). Prints the relative residuals on target and regularisation rows.",
    )
    p.add_argument("files", nargs="+", help="custom_diffusion.safetensors files (two or more)")
    _base_flags(p)
    p.add_argument("--out", required=True, help="the merged .safetensors to write")
    p.add_argument(
        "--captions",
        default=None,
        help="regularisation captions, one per line (default: the miniature world's)",
    )
    p.add_argument(
        "--num-captions",
        type=int,
        default=1000,
        help="how many miniature-world captions, without --captions (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser(
        "eval",
        help="score generated images: CLIP-T, CLIP-I, DINO, DIV, face, PRES, KID (+ the mini "
        "world's judges)",
        description=cmd_eval.__doc__,
    )
    p.add_argument(
        "--generated",
        required=True,
        help="folder of images named '<prompt index>_<n>.png' (0-based line of --prompts)",
    )
    p.add_argument("--references", nargs="+", required=True, help="the subject's real photos")
    p.add_argument("--prompts", required=True, help="the prompts, one per line")
    p.add_argument("--token", default=None, help="identifier to drop from prompts for CLIP-T")
    p.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP: hub id or folder")
    p.add_argument("--dino", default="facebook/dino-vits16", help="DINO ViT: hub id or folder")
    p.add_argument("--no-clip", action="store_true", help="skip CLIP-T and CLIP-I")
    p.add_argument("--no-dino", action="store_true", help="skip DINO and DIV")
    p.add_argument(
        "--face",
        default=None,
        metavar="WEIGHTS",
        help="add FaceNet face similarity: vggface2, casia-webface or an InceptionResnetV1 "
        ".safetensors (needs facenet-pytorch: make faces-venv)",
    )
    p.add_argument(
        "--face-no-detect",
        action="store_true",
        help="images are already cropped faces: skip MTCNN detection",
    )
    p.add_argument(
        "--class-images",
        nargs="+",
        default=None,
        help="class images drawn after fine-tuning ('a face'): adds PRES (DINO, vs references)",
    )
    p.add_argument(
        "--real", default=None, help="real images for KID (DINO features): a folder, or mini:N"
    )
    p.add_argument(
        "--mini-reference",
        default=None,
        metavar="JSON",
        help="miniature world: the reference's traits JSON; adds the judges' scores",
    )
    p.add_argument("--out", default=None, help="also write the report to this JSON file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = _verb(
        verbs,
        "benchmark",
        "every method on every subject: table, CSV, figures (resumable, sharded)",
        cmd_benchmark,
    )
    _base_flags(p)
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated: hyperdreambooth, dreambooth, lora, lidb, textual-inversion, "
        "custom-diffusion (default lidb,lora)",
    )
    p.add_argument(
        "--plan",
        default=None,
        help="JSON file of named rows, each a method with its own steps, learning_rate, adapter "
        "and hypernet settings (ablations), instead of --methods; e.g. benchmarks/mini_results.json",
    )
    p.add_argument(
        "--subjects",
        required=True,
        help="folder of subject folders (photos; optional class.txt, traits.json), or mini:N "
        "for N held-out miniature-world identities",
    )
    p.add_argument(
        "--prompts",
        default="faces",
        help="dreambench-object, dreambench-live, faces, mini, or a file (one {} per line)",
    )
    p.add_argument("--seeds", type=int, default=2, help="images per prompt")
    p.add_argument("--out", required=True, help="output folder (cells/, table.md, ...)")
    p.add_argument(
        "--method-steps",
        action="append",
        default=[],
        metavar="METHOD=N",
        help="training steps of a method (defaults: hyperdreambooth 40, dreambooth/lora/lidb "
        "400, textual-inversion 1000, custom-diffusion 250)",
    )
    p.add_argument(
        "--method-lr",
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help="learning rate of a method (default: the method's own)",
    )
    _adapter_flags(p)
    p.add_argument(
        "--hypernet",
        default=None,
        help="hyperdreambooth: train-hypernet's hypernet/ folder, or mini (built in)",
    )
    p.add_argument("--token", default="sks")
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--clip", default=None, help="CLIP for CLIP-T/CLIP-I (hub id or folder)")
    p.add_argument("--dino", default=None, help="DINO ViT for DINO/DIV (hub id or folder)")
    p.add_argument(
        "--face",
        default=None,
        metavar="WEIGHTS",
        help="FaceNet face similarity: vggface2, casia-webface or a .safetensors (make faces-venv)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_benchmark)

    p = verbs.add_parser(
        "export",
        help="convert a hyperbooth adapter to diffusers' or kohya's LoRA format",
        description=cmd_export.__doc__,
    )
    p.add_argument("--adapter", required=True, help="a hyperbooth adapter .safetensors")
    p.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    p.add_argument(
        "--out", required=True, help="diffusers: folder or .safetensors; kohya: .safetensors"
    )
    p.add_argument(
        "--base", default=None, help="optional: first check that the adapter fits this base"
    )
    p.set_defaults(func=cmd_export)

    p = _verb(
        verbs,
        "precompute",
        "fit one LiDB per identity image, K at a time (HyperDreamBooth's training set)",
        cmd_precompute,
    )
    _base_flags(p)
    p.add_argument("--images", required=True, help="folder of identity images, one per identity")
    p.add_argument("--out", required=True, help="folder for <identity>.safetensors + manifest.json")
    p.add_argument(
        "--identities-per-step", type=int, default=8, help="K: identities fitted in one batch"
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prompt", default="a sks face", help="the prompt every identity is fitted to")
    p.add_argument("--seed", type=int, default=0)
    _precision_flag(p)
    p.add_argument(
        "--max-timestep",
        type=int,
        default=None,
        help="fit only at diffusion timesteps below this (of 1000; default: all)",
    )
    p.add_argument(
        "--shared-noise",
        action="store_true",
        help="give every identity the same noise and timesteps at each step, so its LiDB depends "
        "on its image alone (default: each identity's own, seeded by its name)",
    )
    _adapter_flags(p)
    p.set_defaults(func=cmd_precompute)

    p = _verb(
        verbs,
        "train-hypernet",
        "train the hypernetwork on images and their pre-optimised LiDBs",
        cmd_train_hypernet,
    )
    _base_flags(p)
    p.add_argument("--images", required=True, help="the folder given to precompute")
    p.add_argument("--precomputed", required=True, help="precompute's --out folder")
    p.add_argument("--out", required=True, help="output folder (hypernet/ + checkpoint/)")
    p.add_argument(
        "--encoder",
        default="scratch-vit",
        help="scratch-vit (a small ViT trained from scratch), mini-traits (mini's trait encoder), "
        "a transformers vision model name / local folder (ViT, CLIP, DINOv2), or a folder with "
        "a judge-format network (judge.safetensors + judge.json)",
    )
    p.add_argument(
        "--train-encoder", action="store_true", help="fine-tune a pretrained encoder too"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="encoder input side (default: base's)"
    )
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=4, help="K refinement steps")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the diffusion loss")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the weight-space L2 loss")
    p.add_argument(
        "--gamma",
        type=float,
        default=0.0,
        help="weight of the output-space loss: the UNet's prediction with the predicted weights "
        "against its prediction with the pre-optimised ones, on the same noised latents "
        "(default 0, as in the paper)",
    )
    p.add_argument("--prompt", default="a sks face")
    p.add_argument(
        "--views",
        default=None,
        help="folder of <identity>/<view>.png + .txt captions: other pictures of each identity, "
        "drawn as diffusion targets beside the reference (default: the reference only, as in "
        "the paper)",
    )
    p.add_argument(
        "--max-timestep",
        type=int,
        default=None,
        help="the diffusion term's timesteps are below this (of 1000; default: all)",
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4")
    _schedule_flags(p)
    p.add_argument("--seed", type=int, default=0)
    _precision_flag(p)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train_hypernet)

    p = _verb(
        verbs,
        "personalize",
        "HyperDreamBooth from one image: predict, merge, fast fine-tune",
        cmd_personalize,
    )
    _base_flags(p)
    p.add_argument(
        "--hypernet",
        default=None,
        help="train-hypernet's hypernet/ folder, or mini (built in, for --base mini)",
    )
    p.add_argument("--image", required=True, help="one photo of the subject")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--no-hypernet", action="store_true", help="ablation: fine-tune from zero")
    p.add_argument(
        "--hypernet-only", action="store_true", help="ablation: the prediction, no fine-tune"
    )
    p.add_argument("--iterations", type=int, default=None, help="K (default: the hypernet's)")
    p.add_argument("--rank", type=int, default=4, help="rank of the relaxed LoRA")
    p.add_argument("--steps", type=int, default=40, help="fast fine-tune steps")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="noise draws of the photo per fine-tune step (default 1)",
    )
    p.add_argument(
        "--max-timestep",
        type=int,
        default=None,
        help="fine-tune only at diffusion timesteps below this (of 1000), so the subject does "
        "not learn the photo's layout, background and style (default: all)",
    )
    p.add_argument(
        "--unet-targets",
        nargs="+",
        default=None,
        metavar="REGEX",
        help="the relaxed LoRA's UNet layers (default: the hypernetwork's; with --no-hypernet, "
        "METHOD 3.1's attention layers)",
    )
    p.add_argument(
        "--no-text-encoder", action="store_true", help="the relaxed LoRA adapts the UNet only"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    _schedule_flags(p)
    p.add_argument("--token", default="sks")
    p.add_argument("--class", dest="class_name", default="face")
    p.add_argument(
        "--prompt",
        default=None,
        help="the fine-tune's prompt, with the token (default 'a {token} {class}'); naming the "
        "photo's background and style leaves the subject to the adapter",
    )
    p.add_argument(
        "--mask",
        default=None,
        help="a mask of --image, white on the subject (e.g. from a face parser); the fine-tune's "
        "loss weighs it 1 + --mask-weight times the rest",
    )
    p.add_argument(
        "--mask-weight",
        type=float,
        default=None,
        help="with --mask: the subject's extra loss weight (default 3)",
    )
    p.add_argument("--seed", type=int, default=0)
    _precision_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_personalize)

    p = _verb(
        verbs,
        "rare-tokens",
        "words rare enough to name a subject (Custom Diffusion's, DreamBooth's rules)",
        cmd_rare_tokens,
    )
    p.add_argument("--captions", default=None, help="text file, one caption per line")
    p.add_argument(
        "--mini-captions",
        type=int,
        default=300,
        help="without --captions: how many miniature-world captions (default 300)",
    )
    p.add_argument("--low", type=int, default=5)
    p.add_argument("--high", type=int, default=10)
    p.add_argument("--dreambooth", type=int, default=10, help="how many short tokens to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rare_tokens)

    p = verbs.add_parser(
        "retrieve",
        help="a regularisation set: captioned images whose captions are close to a prompt",
        description=cmd_retrieve.__doc__,
    )
    _base_flags(p)
    p.add_argument("--folder", required=True, help="images with same-stem .txt captions")
    p.add_argument("--prompt", required=True, help="the target prompt, e.g. 'a face'")
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--limit", type=int, default=None, help="keep at most this many")
    p.add_argument("--out", required=True, help="folder to copy the retrieved images into")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retrieve)

    p = verbs.add_parser(
        "demo",
        help="personalise the built-in mini model from one image, draw and score it",
        description=cmd_demo.__doc__,
    )
    p.add_argument("--out", default="demo-output")
    p.add_argument(
        "--method",
        choices=("hyperdreambooth", "lora"),
        default=None,
        help="default: hyperdreambooth with the shipped hypernetwork on mini, lora elsewhere",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="fine-tune steps (default 40; lora: 400)"
    )
    p.add_argument("--base", default="mini", help="a miniature-world model (default: mini)")
    p.set_defaults(func=cmd_demo)
    for verb in verbs.choices.values():
        _show_defaults(verb)
    return parser


class _DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's help ends with its default unless it names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The flag's help, with its default appended where that says something."""
        text = (action.help or "").strip()
        if not _says_something(action.default) or "default" in text.lower():
            return text
        return f"{text} (default {action.default})" if text else f"default {action.default}"


def _says_something(default: object) -> bool:
    """Whether a flag's default is worth printing (not unset, off, or an empty list)."""
    return not (
        default is None or default is False or default == [] or default == argparse.SUPPRESS
    )


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Make a verb's --help show every default, including flags that have no help text."""
    parser.formatter_class = _DefaultsHelp
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        if not action.help and _says_something(action.default):
            action.help = f"default {action.default}"  # argparse prints no line without help


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and a non-zero exit for bad input, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HyperboothError as e:
        print(f"hyperbooth: error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # a path that is the wrong kind of thing, or not ours to write: the user's to fix
        what = next(
            text
            for kind, text in (
                (FileExistsError, "a file is in the way of a folder"),
                (NotADirectoryError, "a file stands where a folder should be"),
                (IsADirectoryError, "a folder stands where a file should be"),
                (PermissionError, "permission denied"),
            )
            if isinstance(e, kind)
        )
        print(f"hyperbooth: error: {e.filename}: {what} (choose another path)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hyperbooth: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
