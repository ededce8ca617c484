"""Data-parallel fine-tuning: 2 gloo processes on 127.0.0.1, each its slice of every global batch
under DistributedDataParallel, end with the weights one process reaches on the same global
batches (to float round-off), and only rank 0 writes the checkpoint."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from squeezer.data import Classification, Dataset
from squeezer.quant.apply import quantize
from squeezer.templates import uniform_plan
from squeezer.train.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")

# 150 training samples, global batches of 32: the last one (7 samples after the held-out 15) is
# uneven, so the ranks' shares weigh unequally there. BatchNorm frozen: in train mode (the BN
# classifier recipe's default) each rank normalises by its own slice's statistics, as DDP without
# SyncBatchNorm does, so only frozen statistics give the one-process weights.
KW = dict(epochs=2, batch_size=32, lr=1e-3, lsq=True, freeze_bn=True, restore_best=False,
          progress=False, seed=1)


def _setup():
    """A seeded BN net, its W4A8 quantized copy and a toy data set, the same in every process."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    data = Dataset("toy", x[:150], y[:150], x[150:], y[150:], Classification())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(512, 4)).eval()  # fmt: skip
    with torch.no_grad():
        for xb, _ in data.train_batches(50):
            net.train()(xb)  # BatchNorm statistics that are not the identity
    net.eval()
    q = quantize(net, uniform_plan(net, 4, act_bits=8), calib=data.calibration_batches(64))
    return net, q, data


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        net, q, data = _setup()
        r = finetune(q, data, teacher=net, checkpoint=f"{out}/ft.ckpt", **KW)
        torch.save({"state": r.model.state_dict(), "history": r.history,
                    "world": r.world_size}, f"{out}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert (tmp_path / "ft.ckpt").is_file()

    net, q, data = _setup()
    single = finetune(q, data, teacher=net, **KW)
    want = single.model.state_dict()
    for got in ranks:
        assert got["world"] == 2
        assert got["state"].keys() == want.keys()
        # Round-off only: the all-reduce sums the two slices' gradients in another order, and Adam
        # scales a coordinate's tiny difference by 1/sqrt(v). Measured up to 1.2e-5 on an AVX2
        # CPU (6e-6 on a weight of 0.33); a wrong share or a missing average moves weights by
        # about lr = 1e-3 a step.
        for k, v in want.items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=5e-5, msg=k)
        for a, b in zip(got["history"], single.history, strict=True):
            assert a["val_metric"] == pytest.approx(b["val_metric"], abs=1e-9)
            if b["train_loss"] is not None:
                assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    # the ranks agree with each other exactly: DDP averages one gradient for both
    for k in want:
        assert torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]), k
    # and it did train
    assert not torch.equal(want["0.weight"], q.state_dict()["0.weight"])


def test_only_rank_zero_writes_the_checkpoint(tmp_path, monkeypatch):
    import squeezer.train.checkpoint as mod  # the trainer's state and checkpoints
    written = []
    monkeypatch.setattr(mod, "write_bytes_atomic", lambda path, data: written.append(path))
    monkeypatch.setattr(mod, "is_active", lambda: False)
    mod._save_checkpoint(tmp_path / "c.ckpt", mod._State(), {}, nn.Linear(2, 2),
                         torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
                         _sched(), rank=1)  # fmt: skip
    assert written == []
    mod._save_checkpoint(tmp_path / "c.ckpt", mod._State(), {}, nn.Linear(2, 2),
                         torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
                         _sched(), rank=0)  # fmt: skip
    assert written == [tmp_path / "c.ckpt"]


def _sched():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
