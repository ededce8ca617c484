"""Data-parallel Hessian analysis: 2 gloo processes on 127.0.0.1 give the one-process answer.

Each rank takes every other batch; the Hessian-vector products are all-reduced (weighted by
sample counts), so the spectrum must equal the single-process run on the same data to 1e-5
relative, on every rank.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_hvp import CE, split, trained

from squeezer import distributed
from squeezer.cli import main
from squeezer.spectrum import Spectrum, analyze

pytestmark = pytest.mark.usefixtures("one_thread")

# Uneven batches (5 of them over 2 ranks: 3 + 2 batches, 29 + 19 samples).
SIZES = (10, 10, 9, 9, 10)
KW = dict(
    top_k=2,
    max_probes=16,
    rel_stderr=None,
    probe_batch=8,
    eig_rtol=1e-6,
    density=True,
    density_probes=2,
    density_steps=6,
    seed=5,
)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        net, x, y = trained("conv")
        spec = analyze(net, CE, split(x, y, SIZES), **KW)
        spec.save(f"{out}/rank{rank}.json")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numbers(spec: Spectrum) -> dict[str, float]:
    """Every number of the spectrum that must agree, flattened."""
    out = {"trace": spec.trace, "trace_stderr": spec.trace_stderr}
    out.update({f"eig{i}": v for i, v in enumerate(spec.top_eigenvalues)})
    for name in ("layer_trace", "layer_trace_stderr", "layer_top_eigenvalue"):
        out.update({f"{name}.{k}": v for k, v in getattr(spec, name).items()})
    out["density_m1"] = spec.density.moment(1)
    out["density_m2"] = spec.density.moment(2)
    return out


def test_two_gloo_processes_equal_one_process(tmp_path):
    # fork starts in milliseconds (spawn re-imports torch: seconds); the workers use one thread,
    # so no OpenMP pool is inherited half-initialised.
    method = "fork" if sys.platform == "linux" else "spawn"
    args = (2, _free_port(), str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method=method)
    ranks = [Spectrum.load(tmp_path / f"rank{r}.json") for r in range(2)]

    net, x, y = trained("conv")
    single = analyze(net, CE, split(x, y, SIZES), **KW)
    assert single.samples == ranks[0].samples == 48
    want = _numbers(single)
    for spec in ranks:
        assert spec.probes == single.probes and spec.params == single.params
        got = _numbers(spec)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-12), key
    assert _numbers(ranks[0]) == _numbers(ranks[1])  # the ranks agree exactly


def test_single_process_helpers_are_identities():
    assert distributed.world() == (0, 1)
    assert not distributed.is_active()
    t = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    assert distributed.broadcast_flag(False) is False


def test_shard_deals_batches_round_robin():
    assert distributed.shard(list(range(7)), 1, 3) == [1, 4]
    lazy = distributed.shard(range(7), 0, 3)  # a re-iterable, not a list
    assert list(lazy) == [0, 3, 6] and list(lazy) == [0, 3, 6]
    everything = sorted(i for r in range(3) for i in distributed.shard(range(7), r, 3))
    assert everything == list(range(7))


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's rendezvous is tested on Linux")
def test_cli_analyze_under_torchrun_writes_one_run_equal_to_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m squeezer.cli analyze` joins one gloo group, each rank takes
    its shard, and rank 0 alone writes the run folder, which holds the one-process numbers."""
    args = [
        "analyze", "zoo:digits_cnn", "--data", "digits", "--samples", "96", "--batch-size", "32",
        "--top-k", "1", "--max-probes", "8", "--rel-stderr", "0", "--quiet", "--threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SQUEEZER_NO_PROGRESS": "1"}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "squeezer.cli", *args, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no staging folders left
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    got = json.loads((two / "spectrum.json").read_text())
    want = json.loads((tmp_path / "one" / "spectrum.json").read_text())
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    assert got["samples"] == want["samples"] == 96
    for key in ("trace", "top_eigenvalues", "layer_trace"):
        a, b = got[key], want[key]
        flat_a = list(a.values()) if isinstance(a, dict) else a if isinstance(a, list) else [a]
        flat_b = list(b.values()) if isinstance(b, dict) else b if isinstance(b, list) else [b]
        for x, y in zip(flat_a, flat_b, strict=True):
            assert math.isclose(x, y, rel_tol=1e-4), key
