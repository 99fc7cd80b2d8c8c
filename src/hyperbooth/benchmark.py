"""`hyperbooth benchmark`: every method on every subject, generated, scored and tabulated.

A cell is (method, subject). Each cell writes `cells/<method>/<subject>/`: its images
(`<prompt>_<seed>.png`) and `result.json` (times, stored bytes, scores), atomically and last,
so a rerun skips finished cells. Cells are dealt out to processes (accelerate / torchrun), and
the first process then writes `table.md`, `results.csv` and the figures.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from hyperbooth.adapters.config import AdapterConfig
from hyperbooth.atomic import atomic_file, read_lines, stored_bytes, write_text
from hyperbooth.errors import HyperboothError
from hyperbooth.images import open_image
from hyperbooth.machine import machine_info
from hyperbooth.methods import NEW_WORD_METHODS

PROMPTS = Path(__file__).parent / "data" / "prompts"
PROMPT_SETS = ("dreambench-object", "dreambench-live", "faces", "mini")
BENCHMARK_METHODS = (
    "hyperdreambooth",
    "dreambooth",
    "lora",
    "lidb",
    "textual-inversion",
    "custom-diffusion",
)
DEFAULT_STEPS = {
    "hyperdreambooth": 40,
    "dreambooth": 400,
    "lora": 400,
    "lidb": 400,
    "textual-inversion": 1000,
    "custom-diffusion": 250,
}
SCORES = (
    "judge_identity",
    "judge_hidden",
    "judge_prompt",
    "face",
    "face_detection_rate",
    "clip_t",
    "clip_i",
    "dino",
    "div",
)


HYPERNET_OPTIONS = ("use_hypernet", "fine_tune", "iterations")


@dataclass
class Row:
    """One row of the table: a method under a name, with the settings that differ from the run's.

    `adapter` sets AdapterConfig fields over the run's (for hyperdreambooth: the relaxed LoRA's
    rank and layers); `hypernet` sets hyperdreambooth's ablations (use_hypernet, fine_tune,
    iterations), so the paper's Table 3 rows are rows of the same table. `max_timestep` fits
    only below that timestep and `adapter_below` switches the UNet's adapters on only below it.
    """

    name: str
    method: str
    steps: int | None = None
    learning_rate: float | None = None
    adapter: dict = field(default_factory=dict)
    hypernet: dict = field(default_factory=dict)
    max_timestep: int | None = None
    adapter_below: int | None = None

    def __post_init__(self) -> None:
        if self.method not in BENCHMARK_METHODS:
            raise HyperboothError(
                f"row {self.name!r}: unknown method {self.method!r}; choose from "
                f"{', '.join(BENCHMARK_METHODS)}"
            )
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise HyperboothError(f"row name {self.name!r}: use letters, digits, '.', '_', '-'")
        known = {f.name for f in fields(AdapterConfig)}
        bad = sorted(set(self.adapter) - known) + sorted(set(self.hypernet) - {*HYPERNET_OPTIONS})
        if bad:
            raise HyperboothError(f"row {self.name!r}: unknown setting {bad[0]!r}")
        if self.hypernet and self.method != "hyperdreambooth":
            raise HyperboothError(f"row {self.name!r}: hypernet settings need hyperdreambooth")


def row_settings(row: Row) -> dict:
    """A row's settings as result.json stores them (unset timestep options left out)."""
    settings = json.loads(json.dumps(asdict(row)))
    for key in ("max_timestep", "adapter_below"):
        if settings[key] is None:
            del settings[key]
    return settings


def read_plan(path: str | Path) -> tuple[Row, ...]:
    """The rows of a plan file: JSON {"rows": [{"name", "method", "steps", ...}, ...]}."""
    try:
        data = json.loads(Path(path).read_text())
        rows = tuple(Row(**row) for row in data["rows"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HyperboothError(
            f"cannot read the plan {path} ({error}); it must be JSON "
            '{"rows": [{"name": ..., "method": ..., "steps": ..., "learning_rate": ...}]}'
        ) from None
    return rows


@dataclass
class BenchmarkConfig:
    """What to run: methods (or named rows), sampling, backbones, HyperDreamBooth's hypernetwork."""

    methods: tuple[str, ...] = ("lidb", "lora")
    rows: tuple[Row, ...] = ()  # when given, `methods` becomes the rows' names
    seeds: int = 2
    sampling_steps: int = 25
    guidance: float = 7.5
    token: str = "sks"
    steps: dict[str, int] = field(default_factory=dict)  # per method; default DEFAULT_STEPS
    learning_rates: dict[str, float] = field(default_factory=dict)  # per method; default its own
    adapter: AdapterConfig | None = None  # lora / lidb: rank, layers (kind is set per method)
    hypernet: str | None = None
    clip: str | None = None  # None: no CLIP scores
    dino: str | None = None
    face: str | None = None  # FaceNet weights (facenet-pytorch); None: no face similarity
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.rows = tuple(Row(**r) if isinstance(r, dict) else r for r in self.rows)
        if not self.rows:
            unknown = [m for m in self.methods if m not in BENCHMARK_METHODS]
            if unknown or not self.methods:
                raise HyperboothError(
                    f"unknown method {unknown[:1]}; choose from {', '.join(BENCHMARK_METHODS)}"
                )
            self.rows = tuple(Row(m, m) for m in self.methods)
        self.methods = tuple(row.name for row in self.rows)
        if len(set(self.methods)) != len(self.methods):
            raise HyperboothError(f"row names repeat: {', '.join(self.methods)}")
        if self.seeds < 1 or self.sampling_steps < 1:
            raise HyperboothError("--seeds and --sampling-steps must be >= 1")
        for flag, given in (("--method-steps", self.steps), ("--method-lr", self.learning_rates)):
            unknown = sorted(set(given) - set(BENCHMARK_METHODS))
            if unknown:
                raise HyperboothError(
                    f"{flag} names an unknown method {unknown[0]!r}; choose from "
                    f"{', '.join(BENCHMARK_METHODS)}"
                )
        if any(r.method == "hyperdreambooth" for r in self.rows) and not self.hypernet:
            raise HyperboothError("hyperdreambooth needs --hypernet FOLDER (train-hypernet's out)")

    def row(self, name: str) -> Row:
        """The row called name."""
        return next(row for row in self.rows if row.name == name)

    def word(self, name: str) -> str:
        """The identifier a row's prompts use: a new word for TI / Custom Diffusion."""
        return f"<{self.token}>" if self.row(name).method in NEW_WORD_METHODS else self.token

    def adapter_for(self, name: str) -> AdapterConfig | None:
        """The run's adapter settings with the row's over them."""
        row = self.row(name)
        if not row.adapter:
            return self.adapter
        start = json.loads(self.adapter.to_json()) if self.adapter else {}
        return AdapterConfig.from_json({**start, **row.adapter})


def cell_settings(config: BenchmarkConfig, name: str, prompts: list[str]) -> dict:
    """What a cell of row `name` depends on beyond its row: result.json stores it for resume."""
    row = config.row(name)
    adapter = config.adapter_for(name) if row.method in ("lora", "lidb") else None
    return json.loads(
        json.dumps(
            {
                "steps": row.steps or config.steps.get(row.method, DEFAULT_STEPS[row.method]),
                "learning_rate": row.learning_rate or config.learning_rates.get(row.method),
                "adapter": None if adapter is None else json.loads(adapter.to_json()),
                "hypernet": config.hypernet if row.method == "hyperdreambooth" else None,
                "prompts": prompts,
                **{
                    key: getattr(config, key)
                    for key in ("seeds", "sampling_steps", "guidance", "token", "seed")
                },
                **{key: getattr(config, key) for key in ("clip", "dino", "face")},
            }
        )
    )


@dataclass
class Subject:
    """One subject folder: its photos, class word and (miniature world) traits file."""

    name: str
    images: list[Path]
    class_name: str = "face"
    info: Path | None = None  # a JSON with "traits": the judges score identity against it


def read_prompt_set(spec: str) -> list[str]:
    """A built-in prompt set by name, or a file; every line has one {} for 'word class'."""
    path = PROMPTS / f"{spec.replace('-', '_')}.txt" if spec in PROMPT_SETS else Path(spec)
    if not path.is_file():
        raise HyperboothError(
            f"--prompts {spec!r} is neither a built-in set ({', '.join(PROMPT_SETS)}) nor a file"
        )
    prompts = read_lines(path, "prompts")
    bad = [p for p in prompts if p.count("{}") != 1]
    if bad:
        raise HyperboothError(
            f"{path}: every prompt needs exactly one {{}} where 'sks face' goes, e.g. 'a {{}} "
            f"in the snow' (first bad line: {bad[:1]})"
        )
    return prompts


def mini_subjects(folder: Path, count: int, seed: int = 0) -> list[Subject]:
    """count held-out miniature-world identities as subject folders (reference + traits).

    Returns exactly these subjects, whatever else the folder holds from earlier runs.
    """
    from hyperbooth.images import save_png
    from hyperbooth.miniworld.evaluate import REFERENCE_CONTEXT, held_out_identities
    from hyperbooth.miniworld.render import render

    names = []
    for index, identity in enumerate(held_out_identities(count, seed)):
        subject = folder / f"{index:03d}_id{identity.index:07d}"
        names.append(subject.name)
        if (subject / "traits.json").is_file():
            continue
        save_png(render(identity, REFERENCE_CONTEXT, seed + index), subject / "reference.png")
        info = {"identity_index": identity.index, "traits": identity.names()}
        write_text(subject / "traits.json", json.dumps(info, indent=2))
    return read_subjects(folder, names)


def read_subjects(folder: str | Path, names: list[str] | None = None) -> list[Subject]:
    """Every subfolder with images (or the named ones) is a subject; class.txt names its class."""
    from hyperbooth.images import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise HyperboothError(f"--subjects {folder} is not a folder of subject folders")
    subjects = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if names is not None and sub.name not in names:
            continue
        images = sorted(
            p
            for p in sub.iterdir()
            # dot-files are macOS's "._IMG_0001.jpg" stubs, as collect_images skips them
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not images:
            continue
        class_file, info = sub / "class.txt", sub / "traits.json"
        class_name = read_lines(class_file, "class name")[0] if class_file.is_file() else "face"
        subjects.append(Subject(sub.name, images, class_name, info if info.is_file() else None))
    if not subjects:
        raise HyperboothError(f"{folder} has no subject folders with images")
    return subjects


def _fit(base: object, name: str, subject: Subject, config: BenchmarkConfig, out: Path):
    """Personalise a copy of base in place with row `name`; (stored path, seconds)."""
    from hyperbooth.images import load_image
    from hyperbooth.methods import (
        CustomDiffusionConfig,
        SubjectConfig,
        TextualInversionConfig,
        personalise,
    )
    from hyperbooth.training import TrainConfig

    images = [load_image(p, base.resolution) for p in subject.images]
    row = config.row(name)
    method = row.method
    steps = row.steps or config.steps.get(method, DEFAULT_STEPS[method])
    learning_rate = row.learning_rate or config.learning_rates.get(method)
    if method == "hyperdreambooth":
        from hyperbooth.hypernet.model import load_hypernet
        from hyperbooth.hypernet.personalize import PersonalizeConfig, personalize

        hypernet = load_hypernet(config.hypernet)  # like the base: loaded, not fitted
        relaxed = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in row.adapter.items()
            if key in ("rank", "unet_targets", "text_encoder_targets")
        }
        started = time.perf_counter()
        result = personalize(
            base,
            hypernet,
            images[0],
            out / "subject.safetensors",
            PersonalizeConfig(
                steps=steps,
                learning_rate=learning_rate or PersonalizeConfig.learning_rate,
                token=config.token,
                class_name=subject.class_name,
                seed=config.seed,
                device=config.device,
                max_timestep=row.max_timestep,
                **relaxed,
                **row.hypernet,
            ),
            progress=False,
            distributed=False,  # each process fits its own cells (run_benchmark shards them)
        )
        return result.output, time.perf_counter() - started
    started = time.perf_counter()
    result = personalise(
        base,
        images,
        out / "fit",
        method,
        SubjectConfig(
            token=config.word(name), class_name=subject.class_name, max_timestep=row.max_timestep
        ),
        config.adapter_for(name),
        TrainConfig(
            steps=steps,
            learning_rate=learning_rate,
            seed=config.seed,
            device=config.device,
            distributed=False,  # each process fits its own cells (run_benchmark shards them)
        ),
        progress=False,
        textual_inversion=TextualInversionConfig(initializer=subject.class_name),
        custom_diffusion=CustomDiffusionConfig(seed=config.seed),
    )
    return result.output, time.perf_counter() - started


def run_cell(
    base: object,
    method: str,
    subject: Subject,
    prompts: list[str],
    config: BenchmarkConfig,
    out: Path,
    scorers: tuple,
    judge: object | None = None,
) -> dict:
    """Personalise, generate every prompt x seed, score; result.json marks the cell done."""
    from hyperbooth.evaluation import Generated, evaluate, judge_scores
    from hyperbooth.generate import generate_images
    from hyperbooth.images import save_png

    cell = out / "cells" / method / subject.name
    done = cell / "result.json"
    settings = row_settings(config.row(method))
    run = cell_settings(config, method, prompts)
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("row", settings) != settings:
            raise HyperboothError(
                f"{done} was made with other settings for row {method!r}; give the changed row "
                "a new name or use a new --out"
            )
        before = result.get("run", run)
        changed = sorted(k for k in {*before, *run} if before.get(k) != run.get(k))
        if changed:
            raise HyperboothError(
                f"{done} was made with another {changed[0]!r} than this run's; use a new --out "
                "(or the old settings) so that every cell of the table is made alike"
            )
        return result
    model = copy.deepcopy(base)
    stored, fit_seconds = _fit(model, method, subject, config, cell)
    texts = [p.format(f"{config.word(method)} {subject.class_name}") for p in prompts]
    started = time.perf_counter()
    rows = generate_images(
        model,
        texts,
        n=config.seeds,
        seed=config.seed + 1000,
        steps=config.sampling_steps,
        guidance=config.guidance,
        batch_size=8,
        progress=False,
        adapter_below=config.row(method).adapter_below,
    )
    generate_seconds = time.perf_counter() - started
    images, index = [], []
    for p, row in enumerate(rows):
        for s, image in enumerate(row):
            save_png(image, cell / "images" / f"{p:03d}_{s}.png")
            images.append(image)
            index.append(p)
    generated = Generated(images, index, [])
    references = [open_image(p) for p in subject.images]  # upright, as training sees them
    clip, dino, face = scorers
    scores = evaluate(
        generated, references, texts, clip, dino, token=config.word(method), face=face
    )
    if subject.info is not None:
        scores |= judge_scores(generated, subject.info, texts, config.word(method), judge)
    result = {
        "method": method,
        "kind": settings["method"],
        "row": settings,
        "run": run,
        "subject": subject.name,
        "seconds": {"fit": fit_seconds, "generate": generate_seconds},
        "machine": machine_info(),
        "stored_bytes": stored_bytes(stored),
        "scores": scores,
    }
    write_text(done, json.dumps(result, indent=2))
    return result


def run_benchmark(
    base: object,
    subjects: list[Subject],
    prompts: list[str],
    config: BenchmarkConfig,
    out: str | Path,
    progress: bool = True,
) -> list[dict] | None:
    """Run this process's share of the cells; the first process then writes the summary."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from hyperbooth.evaluation import ClipScorer, DinoScorer, FaceScorer

    out = Path(out)
    state = PartialState()
    scorers = (
        ClipScorer(config.clip) if config.clip else None,
        DinoScorer(config.dino) if config.dino else None,
        FaceScorer(config.face) if config.face else None,
    )
    cells = [(m, s) for m in config.methods for s in subjects]
    mine = cells[state.process_index :: state.num_processes]
    face = scorers[2]
    if face is not None:  # fail before any fitting, not after the first cell's; detection only
        for subject in {s.name: s for _, s in mine}.values():
            references = (open_image(p) for p in subject.images)
            if all(face.crop(image) is None for image in references):
                raise HyperboothError(
                    f"subject {subject.name!r}: no face found in its photos, so --face cannot "
                    "score it; drop --face or give photos that show a face"
                )
    judge = None
    if any(s.info is not None for _, s in mine):
        from hyperbooth.miniworld.judges import Judge

        judge = Judge.load()
    for method, subject in tqdm(mine, desc="benchmark", disable=not progress):
        run_cell(base, method, subject, prompts, config, out, scorers, judge)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    results = [
        json.loads((out / "cells" / m / s.name / "result.json").read_text()) for m, s in cells
    ]
    write_summary(results, config, prompts, out)
    return results


def summarise(results: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """Per method: mean of each score, mean fit and generate seconds, stored bytes."""
    rows = []
    for method in methods:
        mine = [r for r in results if r["method"] == method]
        row: dict = {"method": method, "subjects": len(mine)}
        for score in SCORES:
            values = [r["scores"][score] for r in mine if r["scores"].get(score) is not None]
            row[score] = float(np.mean(values)) if values else None
        row["fit_seconds"] = float(np.mean([r["seconds"]["fit"] for r in mine]))
        row["generate_seconds"] = float(np.mean([r["seconds"]["generate"] for r in mine]))
        row["stored_bytes"] = int(np.mean([r["stored_bytes"] for r in mine]))
        rows.append(row)
    return rows


def _cell(value: object) -> str:
    """A table cell: 3 decimals for fractions, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_summary(results: list[dict], config: BenchmarkConfig, prompts: list, out: Path) -> None:
    """table.md, results.csv (one row per cell), scores.png, cost.png, samples.png."""
    rows = summarise(results, config.methods)
    columns = ["method", "subjects", *[s for s in SCORES if any(r[s] is not None for r in rows)]]
    columns += ["fit_seconds", "generate_seconds", "stored_bytes"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    settings = {k: v for k, v in asdict(config).items() if k not in ("device",)}
    table = "\n".join(lines) + f"\n\nSettings: `{json.dumps(settings)}`; {len(prompts)} prompts.\n"
    write_text(out / "table.md", table)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        ["method", "subject", "fit_seconds", "generate_seconds", "stored_bytes", *SCORES]
    )
    for r in results:
        writer.writerow(
            [r["method"], r["subject"], r["seconds"]["fit"], r["seconds"]["generate"]]
            + [r["stored_bytes"]]
            + [r["scores"].get(s) for s in SCORES]
        )
    write_text(out / "results.csv", buffer.getvalue())
    _figures(rows, results, config, out)


def _figures(rows: list[dict], results: list[dict], config: BenchmarkConfig, out: Path) -> None:
    """Bar charts of the scores and of the costs, and a grid of samples per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from hyperbooth.generate import image_grid
    from hyperbooth.images import save_png

    names = [r["method"] for r in rows]
    scores = [s for s in SCORES if any(r[s] is not None for r in rows)]
    if scores:
        figure, axis = pyplot.subplots(figsize=(max(6, 1.4 * len(scores) * len(rows) / 2), 3.5))
        width = 0.8 / len(rows)
        for k, r in enumerate(rows):
            values = [r[s] if r[s] is not None else 0 for s in scores]
            axis.bar(np.arange(len(scores)) + k * width, values, width, label=r["method"])
        axis.set_xticks(np.arange(len(scores)) + 0.4 - width / 2, scores)
        axis.set_ylim(0, 1)
        axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axis.set_title("scores (mean over subjects)")
        figure.tight_layout()
        with atomic_file(out / "scores.png") as temporary:
            figure.savefig(temporary, dpi=100, format="png")
        pyplot.close(figure)
    figure, axes = pyplot.subplots(1, 2, figsize=(max(10, 1.1 * len(rows)), 4))
    axes[0].bar(names, [r["fit_seconds"] for r in rows], label="personalise")
    axes[0].bar(
        names,
        [r["generate_seconds"] for r in rows],
        bottom=[r["fit_seconds"] for r in rows],
        label="generate",
    )
    axes[0].set_ylabel("seconds per subject")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [r["stored_bytes"] for r in rows])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("stored bytes per subject")
    for axis in axes:
        axis.tick_params(axis="x", labelsize=8)
        pyplot.setp(axis.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    figure.tight_layout()
    with atomic_file(out / "cost.png") as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    pyplot.close(figure)
    first = results[0]["subject"]
    grid_rows, labels = [], []
    for method in config.methods:
        folder = out / "cells" / method / first / "images"
        paths = sorted(folder.glob("*_0.png"))[:8]
        if paths:
            grid_rows.append([Image.open(p).convert("RGB") for p in paths])
            labels.append(method)
    if grid_rows:
        save_png(image_grid(grid_rows, labels=labels), out / "samples.png")
