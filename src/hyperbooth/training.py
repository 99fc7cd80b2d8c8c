"""The one training loop every method uses: seeded steps, accumulation, precision, exact resume.

A step is a pure function of (seed, step, micro-batch, process rank): data indices, latent
samples, noise and timesteps all come from a CPU generator seeded from those numbers. So a
checkpoint only needs the trainable tensors, the optimizer state and the step number, and a
resumed run ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from hyperbooth.adapters.files import atomic_save_safetensors
from hyperbooth.choices import LR_SCHEDULERS, PRECISIONS
from hyperbooth.errors import HyperboothError
from hyperbooth.machine import cpu_precision, native_bf16_cpu

FOREACH_MAX_NUMBERS = 50_000_000
BARRIER_TIMEOUT = timedelta(hours=6)  # how long a process may wait for the others


@dataclass
class TrainConfig:
    """How to run the loop (what trains and on which loss is the method's business)."""

    steps: int = 400
    learning_rate: float | None = None  # None: the method's default
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    mixed_precision: str = "no"  # autocast dtype (PRECISIONS); trainable tensors stay float32
    checkpoint_every: int = 0  # 0: only at the end
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    device: str = "auto"  # "auto" picks CUDA when present
    # The learning rate over the run, by diffusers' get_scheduler name (LR_SCHEDULERS), after
    # lr_warmup_steps of linear warm-up; None: constant, no warm-up (what older runs did).
    lr_scheduler: str | None = None
    lr_warmup_steps: int | None = None
    # False: this process trains and saves alone even under `accelerate launch` (a sharded
    # benchmark fits a different subject in each process); True: data parallel across them.
    distributed: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise HyperboothError(f"--steps must be >= 1, got {self.steps}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise HyperboothError(f"--lr must be > 0, got {self.learning_rate}")
        if self.lr_scheduler is not None and self.lr_scheduler not in LR_SCHEDULERS:
            raise HyperboothError(
                f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got "
                f"{self.lr_scheduler!r}"
            )
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise HyperboothError(f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise HyperboothError("--batch-size and --gradient-accumulation must be >= 1")
        if self.mixed_precision not in PRECISIONS:
            raise HyperboothError(
                f"--mixed-precision must be one of {PRECISIONS}, got {self.mixed_precision!r}"
            )


@dataclass
class StepBatch:
    """What a method's loss sees for one micro-batch."""

    generator: torch.Generator  # the only source of randomness for this micro-batch
    batch_size: int
    step: int = 0  # the optimiser step this micro-batch belongs to (0-based)


class Method(Protocol):
    """A personalisation method: what trains, its loss for a batch, and how it is saved.

    A method may also have `learning_rates`: {trainable name: its own rate} (the rest train at
    the run's rate).
    """

    name: str
    default_learning_rate: float

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The tensors the optimizer updates, keyed by module path (set up before training)."""

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """The scalar loss of one micro-batch."""

    def save(self, out_dir: Path) -> Path:
        """Write the result into out_dir and return the main file or folder."""


def param_groups(
    trainable: dict[str, torch.nn.Parameter], lr: float, overrides: dict[str, float]
) -> list[dict]:
    """Optimizer groups: every tensor at lr, except those named in overrides at their own rate."""
    rates = [overrides.get(name, lr) for name in trainable]
    groups = {rate: [] for rate in [lr, *rates]}
    for tensor, rate in zip(trainable.values(), rates, strict=True):
        groups[rate].append(tensor)
    return [{"params": tensors, "lr": rate} for rate, tensors in groups.items() if tensors]


def lr_factor(config: TrainConfig) -> Callable[[int], float] | None:
    """The multiplier of every group's rate at each step (0-based), or None for a constant rate.

    It is diffusers' schedule (`diffusers.optimization.get_scheduler`), read as a pure function
    of the step, so a resumed run sets the same rates with no scheduler state to restore.
    """
    from diffusers.optimization import get_scheduler

    name, warmup = config.lr_scheduler or "constant", config.lr_warmup_steps or 0
    if name == "constant" and not warmup:
        return None
    if name == "constant":
        name = "constant_with_warmup"
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=config.steps)
    return schedule.lr_lambdas[0]


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator for one micro-batch: a pure function of its coordinates."""
    mixed = (seed * 1_000_003 + step) * 1_000_003 + micro
    return torch.Generator(device="cpu").manual_seed((mixed * 65_537 + rank) % (2**63 - 1))


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator on the requested device and precision (works under `accelerate launch`)."""
    if config.device not in ("auto", "cpu", "cuda"):
        raise HyperboothError(
            f"--device {config.device!r}: give auto, cpu or cuda (choose the GPU with "
            "CUDA_VISIBLE_DEVICES=N, or run one process per GPU with accelerate launch)"
        )
    use_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise HyperboothError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if config.mixed_precision == "fp16" and use_cpu:
        raise HyperboothError("fp16 mixed precision needs a GPU; on CPU use --mixed-precision bf16")
    if config.mixed_precision == "bf16" and use_cpu and not native_bf16_cpu():
        warnings.warn(
            "--mixed-precision bf16 on a CPU without bf16 hardware (AMX-BF16 / AVX512-BF16) is "
            "emulated and several times slower than float32; use --mixed-precision no or auto",
            stacklevel=2,
        )
    # Precision is not given to the Accelerator: its state is a process-wide singleton that
    # refuses a second setting, and a library process may train several methods in turn.
    # Processes may wait at a barrier for long (the recipe's main process trains the trait
    # encoder; an uneven precompute shard finishes late): torch's 30-minute default is too short.
    timeout = InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)
    return Accelerator(cpu=use_cpu, kwargs_handlers=[timeout])


def resolve_precision(device: torch.device, precision: str) -> str:
    """The precision "auto" means on the device; other values unchanged.

    A GPU: bf16 where it has it, else fp16. A CPU: bf16 where it has bf16 in hardware
    (AMX-BF16 / AVX512-BF16), else none.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cpu_precision("auto") if device.type == "cpu" else "no"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on the device, or nothing for "no" ("auto": resolve_precision)."""
    precision = resolve_precision(device, precision)
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# -- checkpoints ---------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"


def make_adamw(
    params: list[torch.Tensor] | list[dict], lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW in its fastest form for these tensors: fused on CPU and CUDA, else foreach or loop.

    params may be torch's parameter groups ({"params": [...], "lr": ...}) instead of tensors.

    Measured here (2 cores, float32; benchmarks/adamw_step.py, two runs): one step over SD1.5's
    UNet (860M numbers) takes 0.66-0.71 s fused, 3.1-3.7 s foreach and 4.3-4.4 s as torch's CPU
    default (a Python loop); over mini's UNet, 11-15, 40-53 and 48-49 ms. Fused also needs no
    temporaries as large as all the tensors, which foreach does (a full fine-tune of ~1B numbers
    cannot afford those).
    """
    floats = (torch.float32, torch.float16, torch.bfloat16)
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if all(p.device.type in ("cpu", "cuda") and p.dtype in floats for p in tensors):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    foreach = sum(p.numel() for p in tensors) < FOREACH_MAX_NUMBERS
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    """Inverse of optimizer_tensors."""
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *info["scalars"].items()]:
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(
    out_dir: Path,
    step: int,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    run_info: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write <out>/checkpoint atomically: a temp folder renamed over the old one.

    With fp16 the loss scaler's state goes along, so a resumed run skips the steps it would have.
    """
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt_tensors, opt_info = optimizer_tensors(optimizer)
    atomic_save_safetensors(
        {k: p.detach() for k, p in trainable.items()}, tmp / "trainable.safetensors"
    )
    atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    state = {"step": step, "run": run_info, "optimizer": opt_info}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    (tmp / "state.json").write_text(json.dumps(state))
    old = out_dir / f".{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _recover_checkpoint(out_dir: Path) -> None:
    """Put back a checkpoint that a kill between save_checkpoint's two renames left aside."""
    final = out_dir / CHECKPOINT_DIR
    if final.exists():
        return
    # state.json is written last, so a folder holding it is whole; the newer one first
    for aside in (out_dir / f".{CHECKPOINT_DIR}.tmp", out_dir / f".{CHECKPOINT_DIR}.old"):
        if (aside / "state.json").is_file():
            os.replace(aside, final)
            return


def _set_values(value: object) -> object:
    """A JSON value with every None-valued dict entry dropped, at any depth."""
    if isinstance(value, dict):
        return {k: _set_values(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_set_values(v) for v in value]
    return value


def load_checkpoint(
    out_dir: Path,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    run_info: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> int:
    """Restore trainable tensors, optimizer (and fp16 loss-scaler) state; return the next step."""
    from safetensors.torch import load_file

    folder = out_dir / CHECKPOINT_DIR
    _recover_checkpoint(out_dir)
    if not (folder / "state.json").is_file():
        raise HyperboothError(f"--resume: no checkpoint in {folder} (train without --resume first)")
    state = json.loads((folder / "state.json").read_text())
    # Settings added after a checkpoint was written are None by default: unset matches absent.
    saved, asked = _set_values(state["run"]), _set_values(run_info)
    if "inputs" not in saved:  # checkpoints from before the inputs were hashed
        asked.pop("inputs", None)
    if saved != asked:
        changed = sorted(k for k in {*saved, *asked} if saved.get(k) != asked.get(k))
        raise HyperboothError(
            f"--resume: the checkpoint in {folder} was made with different settings ({', '.join(changed)}); "
            "use the same flags or a new --out"
        )
    tensors = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        for key, param in trainable.items():
            param.copy_(tensors[key])
    load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["step"])


# -- the loop ------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run produced and how long it took."""

    output: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    processes: int = 1  # data-parallel processes that ran the steps


def train(
    method: Method,
    config: TrainConfig,
    out_dir: str | Path,
    accelerator: Accelerator,
    resume: bool = False,
    run_info: dict | None = None,
    progress: bool = True,
    save: bool = True,
) -> TrainResult:
    """Optimise the method's trainable tensors for config.steps steps and save the result.

    With save=False nothing is written after the last step (benchmarks time the steps only).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = method.trainable()
    params = list(trainable.values())
    lr = config.learning_rate if config.learning_rate is not None else method.default_learning_rate
    optimizer = make_adamw(
        param_groups(trainable, lr, getattr(method, "learning_rates", {})), lr, config.weight_decay
    )
    precision = resolve_precision(accelerator.device, config.mixed_precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    factor = lr_factor(config)
    rates = [group["lr"] for group in optimizer.param_groups]  # each group's peak rate
    # Settings a resumed run must share; steps and checkpoint cadence may change (to extend a run).
    loop = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("steps", "checkpoint_every", "device", "distributed")
    }
    run_info = {"method": method.name, "train": loop, **(run_info or {})}
    run_info = json.loads(json.dumps(run_info))  # what JSON would give back, for comparison

    start_step = load_checkpoint(out_dir, trainable, optimizer, run_info, scaler) if resume else 0
    if start_step > config.steps:
        raise HyperboothError(
            f"the checkpoint in {out_dir} is at step {start_step}; resume with --steps "
            f">= {start_step} (or train into a new --out)"
        )
    world, rank = accelerator.num_processes, accelerator.process_index
    if not config.distributed:
        world, rank = 1, 0
    main = accelerator.is_main_process or world == 1
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(
        range(start_step, config.steps),
        initial=start_step,
        total=config.steps,
        desc=f"train {method.name}",
        disable=not (progress and main),
    )
    step_seconds: list[float] = []
    for step in bar:
        step_started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.gradient_accumulation):
            generator = step_generator(config.seed, step, micro, rank)
            batch = StepBatch(generator, config.batch_size, step)
            with autocast(accelerator.device, precision):
                loss = method.loss(batch) / config.gradient_accumulation
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
        if world > 1:  # data parallel: average gradients across processes (what DDP does)
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        if scaler:
            scaler.unscale_(optimizer)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if factor is not None:
            scale = factor(step)
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate * scale
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        losses.append(step_loss)
        step_seconds.append(time.perf_counter() - step_started)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            if main:
                save_checkpoint(out_dir, done, trainable, optimizer, run_info, scaler)
            if world > 1:
                accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    output = out_dir
    if save and main:
        output = method.save(out_dir)
        save_checkpoint(out_dir, config.steps, trainable, optimizer, run_info, scaler)
    if world > 1:
        accelerator.wait_for_everyone()
    return TrainResult(output, config.steps, seconds, losses, step_seconds, world)
