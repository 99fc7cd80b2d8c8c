"""The machine description every timed report carries."""

import json

import pytest
import torch

from hyperbooth import training
from hyperbooth.errors import HyperboothError
from hyperbooth.machine import cpu_precision, machine_info, native_bf16_cpu, parse_cpuinfo
from hyperbooth.miniworld.train_base import MiniConfig
from hyperbooth.training import resolve_precision

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
physical id\t: 0
core id\t: 0
flags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
physical id\t: 0
core id\t: 1
flags\t\t: fpu avx2 avx512_bf16 amx_bf16 amx_tile
"""


def test_parse_cpuinfo_reads_the_model_and_counts_physical_cores():
    fields, cores = parse_cpuinfo(CPUINFO)
    assert fields["model name"] == "Intel(R) Xeon(R) Processor"
    assert "amx_tile" in fields["flags"].split()
    assert cores == 2
    assert parse_cpuinfo("") == ({}, None)


def test_machine_info_is_json_and_takes_torchs_thread_count():
    info = json.loads(json.dumps(machine_info()))
    assert info["threads"] == torch.get_num_threads()
    assert info["logical_cores"] >= 1
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert info["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert machine_info(threads=3)["threads"] == 3


def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_hardware():
    assert cpu_precision("auto", {"avx2", "amx_bf16"}) == "bf16"
    assert cpu_precision("auto", {"avx2", "avx512_bf16"}) == "bf16"
    assert cpu_precision("auto", {"avx2", "avx512f"}) == "no"  # an AVX2/AVX512 CPU emulates bf16
    assert cpu_precision("bf16", {"avx2"}) == "bf16"  # asked for explicitly: kept
    assert cpu_precision("no", {"amx_bf16"}) == "no"
    assert native_bf16_cpu() == machine_info()["native_bf16"]
    with pytest.raises(ValueError, match="one of"):
        cpu_precision("fp16", set())


def test_training_resolves_auto_per_device_and_warns_of_emulated_bf16(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == ("bf16" if native_bf16_cpu() else "no")
    assert resolve_precision(cpu, "fp16") == "fp16"
    monkeypatch.setattr(training, "native_bf16_cpu", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        training.make_accelerator(training.TrainConfig(mixed_precision="bf16", device="cpu"))


def test_mini_recipe_rejects_an_unknown_precision_in_one_line():
    with pytest.raises(HyperboothError, match="mixed_precision must be one of"):
        MiniConfig(mixed_precision="fp16")
