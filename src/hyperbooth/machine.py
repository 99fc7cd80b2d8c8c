"""What machine a timing was measured on: CPU model and features, cores, memory, versions.

Timings in this project's reports are only comparable on the same kind of host (the
development machines have been an Intel Xeon with AMX-BF16 on some days and an AMD EPYC
without AMX on others, 2x apart in speed), so every timed report records this beside its
seconds. Standard library only: no torch import.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
import sys
from collections.abc import Set
from pathlib import Path

GB = 1e9
KIB = 1024
_VERSIONED = ("torch", "diffusers", "transformers", "accelerate", "hyperbooth")


def meminfo_gb(field: str) -> float | None:
    """A field of /proc/meminfo (MemTotal, MemAvailable) in GB, or None off Linux."""
    path = Path("/proc/meminfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * KIB / GB
    return None


def parse_cpuinfo(text: str) -> tuple[dict[str, str], int | None]:
    """The first processor's fields of a /proc/cpuinfo text and its number of physical cores."""
    fields: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    physical_id = ""
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        fields.setdefault(key, value)
        if key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return fields, len(cores) or None


NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPU_PRECISIONS = ("auto", "bf16", "no")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first processor's feature flags from /proc/cpuinfo (empty off Linux), read once.

    Cached: autocast contexts ask on every training step.
    """
    path = Path("/proc/cpuinfo")
    fields, _ = parse_cpuinfo(path.read_text() if path.exists() else "")
    return frozenset(fields.get("flags", "").split())


def native_bf16_cpu(flags: Set[str] | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AMX-BF16 or AVX512-BF16)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def cpu_precision(precision: str, flags: Set[str] | None = None) -> str:
    """The CPU autocast precision to run: "auto" is "bf16" where bf16 is native, else "no".

    Without hardware bf16 (an AVX2-only CPU) bf16 autocast is emulated: measured 15x slower
    than float32 for the mini VAE (8 s against 0.53 s a step on a 2-core AMD EPYC).
    """
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"mixed precision must be one of {CPU_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16_cpu(flags) else "no"
    return precision


def machine_info(threads: int | None = None) -> dict:
    """The host, its CPU's bf16 features, memory, library versions and load, as JSON data.

    `threads` defaults to torch's intra-op thread count when torch is already imported.
    """
    if threads is None and "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    path = Path("/proc/cpuinfo")
    fields, physical_cores = parse_cpuinfo(path.read_text() if path.exists() else "")
    flags = set(fields.get("flags", "").split())
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": fields.get("model name", platform.processor() or platform.machine()),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,
        "amx_flags": sorted(f for f in flags if f.startswith("amx")),
        "avx512_bf16": "avx512_bf16" in flags,
        "native_bf16": native_bf16_cpu(flags),
        "memory_gb": meminfo_gb("MemTotal"),
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
