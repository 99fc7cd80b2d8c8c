"""The machine description every timed report carries."""

import json

import torch

from hyperbooth.machine import machine_info, parse_cpuinfo

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
