"""Data-parallel training with 2 CPU processes (gloo), as `accelerate launch` runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_launched(rank: int, world: int, port: int) -> None:
    """The environment `accelerate launch` gives process `rank` of `world`, and 1 thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out_dir: str, results) -> None:
    _as_launched(rank, world, port)
    from hyperbooth.adapters.config import AdapterConfig
    from hyperbooth.bases import load_base
    from hyperbooth.methods import SubjectConfig, make_method, prepare_subject
    from hyperbooth.training import TrainConfig, make_accelerator, train

    config = TrainConfig(steps=3, device="cpu", learning_rate=1e-2)
    accelerator = make_accelerator(config)
    base = load_base("tiny-random")
    subject = SubjectConfig()
    image = Image.new("RGB", (32, 32), (150, 80, 40))
    data = prepare_subject(base, subject, [image], accelerator.device, out_dir, progress=False)
    method = make_method("lidb", base, subject, data, AdapterConfig(lidb_a=16, lidb_b=8))
    result = train(method, config, out_dir, accelerator, progress=False)
    # numpy arrays travel by value (torch tensors would go through shared memory).
    weights = {k: v.detach().numpy().copy() for k, v in method.trainable().items()}
    results.put((rank, accelerator.num_processes, result.losses, weights))


def test_two_processes_keep_identical_weights(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict((r, (n, losses, w)) for r, n, losses, w in (results.get() for _ in procs))
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    (n0, loss0, w0), (n1, loss1, w1) = got[0], got[1]
    assert n0 == n1 == 2
    assert loss0 != loss1  # each rank saw its own noise and timesteps
    for key in w0:  # ...but averaged gradients keep the replicas identical
        assert (w0[key] == w1[key]).all(), key
    assert (tmp_path / "adapter.safetensors").is_file()


def test_accelerate_launch_runs_the_cli_unchanged(tmp_path):
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "me.png")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # --multi_gpu picks accelerate's torchrun launcher; without a GPU it runs gloo CPU processes.
    # (--cpu would run a single process: accelerate's simple launcher.)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    cmd += ["-m", "hyperbooth.cli", "train", "--method", "lora", "--base", "tiny-random"]
    cmd += [
        "--images",
        str(tmp_path / "me.png"),
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert '"processes": 2' in result.stdout  # two data-parallel processes really ran


def _save_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from hyperbooth.bases import load_base, save_base

    save_base(load_base("tiny-random"), os.path.join(out_dir, f"rank{rank}"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_every_rank_saves_a_whole_base(tmp_path):
    # transformers saves nothing from a rank other than 0; a benchmark shard's fits must load
    from hyperbooth.bases import load_base

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_save_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    reference = load_base("tiny-random").text_encoder.state_dict()
    for rank in range(2):
        saved = load_base(str(tmp_path / f"rank{rank}")).text_encoder.state_dict()
        assert saved.keys() == reference.keys()
        assert all(torch.equal(saved[k], v) for k, v in reference.items())


def _fit_alone(out_dir: str, colour: tuple[int, int, int], distributed: bool) -> dict:
    """Fit a LiDB on one flat-colour photo through personalise; its weights as numpy arrays."""
    from hyperbooth.adapters.config import AdapterConfig
    from hyperbooth.adapters.files import read_adapter
    from hyperbooth.bases import load_base
    from hyperbooth.methods import SubjectConfig, personalise
    from hyperbooth.training import TrainConfig

    config = TrainConfig(steps=3, device="cpu", learning_rate=1e-2, distributed=distributed)
    image = Image.new("RGB", (32, 32), colour)
    result = personalise(
        load_base("tiny-random"), [image], out_dir, "lidb", SubjectConfig(),
        AdapterConfig(lidb_a=16, lidb_b=8), config, progress=False,
    )  # fmt: skip
    return {k: v.numpy().copy() for k, v in read_adapter(result.output).tensors.items()}


def _cell_worker(rank: int, world: int, port: int, out_dir: str, results) -> None:
    _as_launched(rank, world, port)
    colour = [(150, 80, 40), (20, 60, 220)][rank]  # each process its own subject
    results.put((rank, _fit_alone(os.path.join(out_dir, f"rank{rank}"), colour, False)))


def test_processes_that_train_alone_fit_and_save_their_own_subjects(tmp_path):
    # a sharded benchmark: each process fits another subject; nothing may be averaged across
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_cell_worker, args=(r, 2, port, str(tmp_path), results))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=120) for _ in procs)  # a dead worker fails, not hangs
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    torch.set_num_threads(1)
    alone = _fit_alone(str(tmp_path / "alone"), (20, 60, 220), True)  # rank 1's subject, 1 process
    assert got[1].keys() == alone.keys()
    for key, value in alone.items():
        assert abs(got[1][key] - value).max() < 1e-5, key
    assert any(abs(got[0][k] - got[1][k]).max() > 1e-3 for k in alone)
