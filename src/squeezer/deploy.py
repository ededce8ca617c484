"""Deployment of a run folder: export its compressed model to ONNX (checked in ONNX Runtime against
squeezer's simulation, and run on the whole test split), and time the float and deployed models
side by side. What ``squeezer export DIR`` and ``squeezer bench DIR`` do, as functions; the results
go into the run's ``metrics.json`` and report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def _examples(inputs: Any, n: int) -> Any:
    """The first ``n`` of ``inputs`` (a tensor or a dict of tensors), repeated if there are
    fewer."""
    from .data import batch_size

    reps = -(-n // batch_size(inputs))
    if isinstance(inputs, dict):
        return {k: torch.cat([v] * reps)[:n] for k, v in inputs.items()}
    return torch.cat([inputs] * reps)[:n]


def _programs(run: Path) -> dict[str, Any]:
    """{latency row: the run's ExecuTorch programs as a module}, empty without ``model.pte`` or
    without executorch."""
    if not (run / "model.pte").is_file():
        return {}
    from .export.executorch import ROW, PteModule, executorch_available

    if not executorch_available():
        print(f"{run}/model.pte not timed: executorch is not installed", file=sys.stderr)
        return {}
    return {ROW: PteModule.load(run / "model.pte")}


#: Export formats: the file each writes and the metrics.json key its record goes under.
FORMATS = {"onnx": ("model.onnx", "export"), "executorch": ("model.pte", "executorch")}


def export_run(
    run_dir: str | os.PathLike,
    *,
    format: str = "onnx",
    samples: int = 64,
    requantize: bool = True,
    atol: float | None = None,
    threads: int | None = None,
    loaded: tuple | None = None,
    pack: bool = True,
    batches: Sequence[int] = (1, 32),
    weight_codes: str = "auto",
):
    """Write ``run_dir``/model.onnx, checked in ONNX Runtime against the simulated model on
    ``samples`` test inputs, and with data run on the whole test split; both go into
    metrics.json under ``export``. With ``format="executorch"``: ``model.pte`` lowered through
    XNNPACK with squeezer's scales (and ``model.bB.pte`` for each other size in ``batches``: a
    program's input shape is fixed), checked in the ExecuTorch runtime sample by sample and on a
    batch of each size, and timed at each; recorded under ``executorch`` (the optional extra
    ``squeezer[executorch]``). Returns the report and the
    updated metrics. ``pack=False`` stores sub-8-bit ONNX weight codes a byte each;
    ``weight_codes`` is :func:`~squeezer.export.export_onnx`'s (ONNX only).

    Example:
        >>> report, metrics = export_run("runs/digits-w8")  # doctest: +SKIP
    """
    from .data import evaluate
    from .errors import ConfigError
    from .export import OrtModule, export_onnx, ort_session
    from .runfolder import load_compressed, update_metrics

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    run = Path(run_dir)
    model, qmodel, inputs, data = loaded if loaded is not None else load_compressed(run)
    if format == "executorch":
        from .export.executorch import export_executorch

        report = export_executorch(qmodel, run / "model.pte", _examples(inputs, max(samples, 32)),
                                   float_model=model, atol=atol, threads=threads,
                                   samples=min(samples, 32), batches=batches)  # fmt: skip
        return report, update_metrics(run, executorch={**report.to_dict(), "path": "model.pte"})
    report = export_onnx(
        qmodel,
        run / "model.onnx",
        _examples(inputs, samples),
        requantize=requantize,
        atol=atol,
        threads=threads,
        pack=pack,
        weight_codes=weight_codes,
    )
    entry = {**report.to_dict(), "path": "model.onnx"}
    if data is not None:
        deployed = OrtModule(ort_session(run / "model.onnx", threads=threads))
        entry["test_metric"] = evaluate(deployed, data.test_batches(), data.task)
    return report, update_metrics(run, export=entry)


def bench_run(
    run_dir: str | os.PathLike,
    *,
    batches: Sequence[int] = (1, 32),
    runs: int = 30,
    warmup: int = 5,
    threads: int,
) -> dict[str, Any]:
    """Latency of PyTorch FP32, ONNX Runtime FP32 and the run's exported ONNX model at each batch
    size (exported first if it is not yet), and of the run's ExecuTorch programs (``model.pte``,
    ``model.bB.pte``) at the batch sizes they were made for, all in one round-robin per batch
    size; written to metrics.json (``latency``, and the first batch size's medians as the
    before/after latency). Returns the latency table.

    Example:
        >>> table = bench_run("runs/digits-w8", threads=1)  # doctest: +SKIP
    """
    from .export import export_float_onnx, latency_table, ort_session
    from .runfolder import load_compressed, read_metrics, update_metrics

    run = Path(run_dir)
    loaded = load_compressed(run)
    model, _, inputs, _ = loaded
    if not (run / "model.onnx").is_file():
        print(f"no {run}/model.onnx yet: exporting it first", file=sys.stderr)
        export_run(run, threads=threads, loaded=loaded)
    examples = {b: _examples(inputs, b) for b in batches}
    variants = {
        "PyTorch FP32": model,
        "ORT FP32": ort_session(export_float_onnx(model, examples[batches[0]]), threads=threads),
        "ONNX (squeezer)": ort_session(run / "model.onnx", threads=threads),
    }
    pte = _programs(run)
    table = {}
    for b in batches:  # the .pte only where a program was made for b
        both = variants | {k: v for k, v in pte.items() if b in v.batches}
        table.update(latency_table(both, {b: examples[b]}, threads=threads, warmup=warmup,
                                   runs=runs))  # fmt: skip
    metrics = read_metrics(run)
    first = table[f"batch_{batches[0]}"]
    before = {**metrics.get("before", {}), "latency_ms": first["PyTorch FP32"]["median_ms"]}
    after = {**metrics.get("after", {}), "latency_ms": first["ONNX (squeezer)"]["median_ms"]}
    update_metrics(run, latency=table, before=before, after=after)
    return table
