"""Your own data (issue 12): does memory stay flat as a streamed data set grows?

``squeezer compress`` runs, each in its own process, on a user data set given as
``--data own_data:digits_stream``: a map-style ``torch.utils.data.Dataset`` that makes each sample
when it is asked for (a real scikit-learn digit, chosen by the index, with seeded noise and a
one-pixel shift), so the data set itself holds nothing but its length. It is run at 1x and 10x
the samples, and, for comparison, the same samples written whole to an ``.npz`` (which squeezer
loads into memory). Each run's peak resident set size comes from ``os.wait4`` (the child's
``ru_maxrss``), with its wall time and the metrics the run wrote.

Run:  python benchmarks/own_data.py                       (about 3 minutes on 2 loaded cores)
      python benchmarks/own_data.py --samples 2000 --scales 1 3   (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


class DigitsStream(torch.utils.data.Dataset):
    """``n`` samples made on demand from the 1,797 digits: sample ``i`` is digit ``i % 1797``,
    shifted by one pixel in a direction set by ``i``, plus Gaussian noise (σ 0.05) seeded by ``i``.
    Deterministic, and holding only the 1,797 base images whatever ``n`` is."""

    def __init__(self, n: int):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.n = int(n)
        self.x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.y = torch.tensor(d.target, dtype=torch.long)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        base = i % len(self.y)
        shift = (i // len(self.y)) % 5  # none, up, down, left, right
        x = self.x[base]
        if shift:
            dim, step = (1, 2, 2, 1)[shift - 1], (-1, 1, -1, 1)[shift - 1]
            x = torch.roll(x, step, dims=dim)
        g = torch.Generator().manual_seed(i)
        return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1), self.y[base]


def digits_stream() -> DigitsStream:
    """The ``--data own_data:digits_stream`` factory; ``OWN_DATA_SAMPLES`` sets the size."""
    return DigitsStream(int(os.environ.get("OWN_DATA_SAMPLES", "18000")))


def run(argv: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """(exit code, peak RSS in MB, wall seconds, stderr) of ``squeezer`` ``argv`` in a child."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "squeezer", *argv], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    err = p.stderr.read().decode()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024, time.perf_counter() - t, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=18000, help="samples at 1x")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--budget", default="bits=4")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    src = str(HERE.parent / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), src]),
           "SQUEEZER_NO_PROGRESS": "1"}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "w.safetensors"
        rc, *_, err = run(["train", "zoo:digits_cnn", "--data", "digits", "--epochs", "8",
                           "--out", str(Path(tmp) / "train"), "--quiet", "--threads",
                           args.threads], env)  # fmt: skip
        assert rc == 0, err
        weights = Path(tmp) / "train" / "model.safetensors"
        for scale in args.scales:
            n = args.samples * scale
            for kind in ("stream", "npz"):
                data = "own_data:digits_stream"
                if kind == "npz":
                    ds = DigitsStream(n)
                    xs = torch.stack([ds[i][0] for i in range(n)]).numpy()
                    ys = np.array([int(ds[i][1]) for i in range(n)])
                    data = str(Path(tmp) / f"digits_{n}.npz")
                    np.savez(data, x=xs, y=ys)
                    del xs, ys
                out = Path(tmp) / f"run_{kind}_{n}"
                argv = ["compress", "zoo:digits_cnn", "--weights", str(weights), "--data", data,
                        "--budget", args.budget, "--out", str(out), "--quiet", "--threads",
                        args.threads]  # fmt: skip
                rc, rss, wall, err = run(argv, {**env, "OWN_DATA_SAMPLES": str(n)})
                assert rc == 0, err
                m = json.loads((out / "metrics.json").read_text())
                row = {"data": kind, "scale": scale, "samples": n, "peak_rss_mb": round(rss, 1),
                       "wall_s": round(wall, 1), "top1_fp32": round(m["before"]["metric"], 2),
                       "top1_after": round(m["after"]["metric"], 2)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    base = {r["data"]: r["peak_rss_mb"] for r in rows if r["scale"] == args.scales[0]}
    print("\n| data | samples | peak RSS (MB) | vs 1x | wall (s) | top-1 FP32 | top-1 after |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['samples']:,} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / base[r['data']]:.2f}x | {r['wall_s']:.0f} | "
              f"{r['top1_fp32']:.2f} | {r['top1_after']:.2f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
