"""The run folder (DESIGN.md's contract), owned here alone: what a run was made from (a typed
:class:`RunSpec`, recorded in ``manifest.json``), and the reading and writing of every run file —
``plan.json``, ``spectrum.json``, ``sensitivity.json``, ``costs.json``, ``pareto.json``,
``metrics.json``, ``model.safetensors``, ``distilled.safetensors`` and the report.

A new run is staged in a hidden sibling directory and swapped into place only when the command
succeeds (:class:`Stage`), so a failed run leaves no partial output behind, and squeezer never
writes into a folder holding files it did not write.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .atomic import write_json
from .budget import Budget
from .config import Plan
from .costs import Costs
from .errors import ConfigError, first_line

MANIFEST = "manifest.json"
DISTILLED_FILE = "distilled.safetensors"
MODEL_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------------
# The run spec


@dataclass(frozen=True)
class RunSpec:
    """What a run was made from: enough to rebuild its model and data and to redo it.

    Attributes:
        command: the subcommand that made the run.
        model: ``zoo:NAME``, ``pkg.module:factory``, ``hf:minilm`` or ``hf:DIR``.
        weights: the weights file (absolute, or relative to the run folder).
        trust_pickle: the weights file may be a full pickle.
        data: the data set (for a zero-shot run: the evaluation data, or None).
        max_len: token length of text inputs.
        seed: seeds the analysis, the distillation and the split.
        budget: the budget the plan meets (None for runs without a plan).
        method: ``"hessian"`` or ``"uniform"`` (None for runs that make no plan).
        calib: the calibration source (``"real"``, ``"zeroshot"``).
        act_bits: activation bits (None: float activations).
        hessian_samples: training samples of the Hessian analysis (None: the template's).
        hessian_batch_size, hessian_probes: batch size and most probes of the Hessian analysis
            (None: the template's).
        calib_samples: distilled inputs of a zero-shot run.
        input_shape: one input's shape, for zero-shot runs of models that do not declare it.
        latency_backend: where a latency budget's per-layer table is measured.
        replanned: the plan was re-planned (``squeezer plan``) or given (``squeezer quantize``).
        preprocessing: how inputs are prepared for a pretrained zoo model's weights (crop size,
            mean, std; from its registry entry), None otherwise.
        prune: the pruning request (a :class:`squeezer.prune.PruneSpec` as a dict), None for
            runs without pruning; the pruned architecture is in the folder's ``prune.json``.
        prune_finetune: epochs of fine-tuning (distilled from the unpruned model) after pruning.
        bias_correction: biases corrected for the quantization's mean output error (None: the
            default, on for conv nets; a finished run records what it did).
        template: the layer template asked for (``--template``; None: the one matching the
            model). The template a run planned with is recorded in ``costs.json`` too.
        bits: the planner's candidate integer widths (``--bits``; None: the template's).

    Example:
        >>> s = RunSpec("compress", "zoo:digits_cnn", data="digits", budget=Budget(bits=4))
        >>> RunSpec.from_manifest(s.manifest()) == s
        True
    """

    command: str
    model: str
    weights: str | None = None
    trust_pickle: bool = False
    data: str | None = None
    max_len: int = 128
    seed: int = 0
    budget: Budget | None = None
    method: str | None = "hessian"
    calib: str = "real"
    act_bits: int | None = 8
    hessian_samples: int | None = None
    hessian_batch_size: int | None = None
    hessian_probes: int | None = None
    calib_samples: int = 64
    input_shape: tuple[int, ...] | None = None
    latency_backend: str = "onnxruntime"
    replanned: bool = False
    preprocessing: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    prune_finetune: int = 0
    bias_correction: bool | None = None
    template: str | None = None
    bits: tuple[int, ...] | None = None

    def manifest(self, **extra: Any) -> dict[str, Any]:
        """The ``manifest.json`` document: the spec's fields, flat, beside the tool's provenance
        (version, argv, time, Python, torch, threads) and ``extra`` (timings ...)."""
        import torch

        from ._version import __version__

        spec = asdict(self)
        spec["budget"] = None if self.budget is None else str(self.budget)
        return {
            "tool": "squeezer",
            "version": __version__,
            "argv": sys.argv[1:],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            **spec,
            **extra,
        }

    @classmethod
    def from_manifest(cls, man: dict[str, Any]) -> RunSpec:
        """The spec a manifest records (unknown keys are provenance, and ignored)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in man.items() if k in known}
        if not d.get("model"):
            raise ConfigError("the run's manifest.json names no model; make the run again")
        if d.get("budget"):
            d["budget"] = Budget.parse(d["budget"])
        for key in ("input_shape", "bits"):
            if d.get(key):
                d[key] = tuple(d[key])
        d.setdefault("command", "compress")
        return cls(**d)

    def weights_in(self, run_dir: str | os.PathLike) -> str | None:
        """The weights path, made absolute against ``run_dir`` if it is relative."""
        if self.weights and not Path(self.weights).is_absolute():
            return str(Path(run_dir) / self.weights)
        return self.weights


def load_inputs(spec: RunSpec, run_dir: str | os.PathLike | None = None):
    """The float model (its attention split) and the data set (or None) that ``spec`` names, all
    checked before any work, each failure a one-line SqueezerError: the spec's numbers, the
    weights (safetensors or a plain state dict unless ``trust_pickle``; the model's shapes; finite),
    the data (readable, finite, neither split empty, at least two classes) and their fit (the
    model runs on the data, its outputs are finite and cover every label).

    Text data is tokenized with an ``hf:`` model's own tokenizer, and its targets are that FP32
    model's embeddings."""
    from .data import check_fits, load_data
    from .graph import split_attention
    from .models import check_weights, load_model, load_weights

    _check_numbers(spec)
    weights = spec.weights_in(run_dir) if run_dir is not None else spec.weights
    source = f"{spec.model}" + (f" with {Path(weights).name}" if weights else "")
    if spec.model.startswith("hf:"):
        from .hf import load_hf

        model, tokenizer = load_hf(spec.model, trust_pickle=spec.trust_pickle)
        if weights:
            load_weights(model, weights, trust_pickle=spec.trust_pickle)
        check_weights(model, source)
        model = split_attention(model)
        if not spec.data:
            return model, None
        data = load_data(
            spec.data, seed=spec.seed, model=model, tokenizer=tokenizer, max_len=spec.max_len
        )
    else:
        model = load_model(spec.model, weights=weights, trust_pickle=spec.trust_pickle)
        check_weights(model, source)
        if spec.calib == "zeroshot" and spec.command == "compress":
            _check_input_shape(model, spec.input_shape)
        if not spec.data:
            return model, None
        # data labelled by the model itself (photos) takes the FP32 model; others ignore it
        data = load_data(spec.data, seed=spec.seed, model=model)
    check_fits(model, data)
    return model, data


def _check_input_shape(model: Any, shape: tuple[int, ...] | None) -> None:
    """Distillation (``--calib zeroshot``) needs one input's shape, and the model must run on it."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    shape = shape or getattr(model, "input_shape", None)
    if shape is None and not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return  # nothing to distil from: the distillation itself says so, and what to do
    if shape is None:
        raise ConfigError(
            "--calib zeroshot cannot tell the model's input shape; pass --input-shape (one input "
            "without the batch dimension, e.g. --input-shape 1,8,8)"
        )
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except Exception as exc:  # the user's forward may raise anything
        first = first_line(exc, 160)
        raise ConfigError(
            f"the model does not run on inputs of shape {tuple(shape)}: {first}; give the shape "
            "of one input with --input-shape"
        ) from None


def _check_numbers(spec: RunSpec) -> None:
    """The spec's counts and widths are in range (each named by its command-line flag)."""
    checks = [
        ("--max-len", spec.max_len, spec.max_len >= 2),
        ("--act-bits", spec.act_bits, spec.act_bits is None or 2 <= spec.act_bits <= 16),
        ("--hessian-samples", spec.hessian_samples,
         spec.hessian_samples is None or spec.hessian_samples >= 1),
        ("--hessian-batch-size", spec.hessian_batch_size,
         spec.hessian_batch_size is None or spec.hessian_batch_size >= 1),
        ("--hessian-probes", spec.hessian_probes,
         spec.hessian_probes is None or spec.hessian_probes >= 1),
        ("--input-shape", spec.input_shape,
         spec.input_shape is None or (len(spec.input_shape) > 0 and min(spec.input_shape) >= 1)),
        ("--seed", spec.seed, spec.seed >= 0),
    ]  # fmt: skip
    if spec.template is not None:
        from .templates import check_template_name

        check_template_name(spec.template)
    if spec.bits is not None:
        from .templates import check_widths

        check_widths(spec.bits)
    for flag, value, ok in checks:
        if not ok:
            limits = {"--max-len": "at least 2", "--act-bits": "2..16 (0 keeps float)",
                      "--hessian-samples": "at least 1", "--hessian-batch-size": "at least 1",
                      "--hessian-probes": "at least 1", "--seed": "0 or more",
                      "--input-shape": "positive sizes, e.g. 1,8,8"}  # fmt: skip
            raise ConfigError(f"{flag} {value} is out of range; give {limits[flag]}")


# --------------------------------------------------------------------------------------------------
# Folders


def check_output_dir(out: str | os.PathLike) -> Path:
    """``out`` must be absent, empty, or an earlier squeezer run folder (which is then updated)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory path")
    above = next(p for p in out.absolute().parents if p.exists())  # the nearest existing folder
    if not above.is_dir():
        raise ConfigError(f"--out {out}: {above} is a file, not a folder; give a directory path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {above} is not writable; choose a folder you can write")
    if out.is_dir() and any(out.iterdir()) and not is_run_folder(out):
        raise ConfigError(
            f"--out {out} holds files squeezer did not write; choose a new or empty directory"
        )
    return out


def is_run_folder(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("tool") == "squeezer"
    except (OSError, ValueError, AttributeError):
        return False


def require_run_folder(path: str | os.PathLike) -> Path:
    """An existing run folder, or a ConfigError saying how to make one."""
    p = Path(path)
    if not is_run_folder(p):
        raise ConfigError(
            f"{p} is not a squeezer run folder (no manifest.json); create one with "
            "'squeezer compress MODEL --data DATA --budget B --out DIR'"
        )
    return p


class Terminated(SystemExit):
    """SIGTERM arrived during a staged run: raised in the main thread so that :class:`Stage`
    removes its staging folder on the way out; the process then exits with 128 + 15."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def _raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` (main thread only; signals go nowhere else).
    Returns the handler to restore."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def _restore_sigterm(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


class Stage:
    """A staging directory for a run; :meth:`commit` swaps it in for ``out``.

    Example:
        >>> with Stage("runs/demo") as st:  # doctest: +SKIP
        ...     st.write_json("metrics.json", {"top1": 99.1})
    """

    def __init__(self, out: str | os.PathLike, *, update: bool = False):
        self.out = require_run_folder(out) if update else check_output_dir(out)
        self.update = update
        self.t0 = time.perf_counter()

    def __enter__(self) -> Stage:
        self._previous = _raise_on_sigterm()
        parent = self.out.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.dir = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".staging", dir=parent)
            )
        except BaseException:
            _restore_sigterm(self._previous)
            raise
        os.chmod(self.dir, 0o755)
        if self.update:  # start from the run's current files; changed ones are overwritten
            for f in self.out.iterdir():
                if f.is_file():
                    shutil.copy2(f, self.dir / f.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            _restore_sigterm(self._previous)

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        write_json(p, obj)
        return p

    def finish(self, spec: RunSpec, **fields: Any) -> None:
        """Write the run's manifest (``spec`` and ``fields``, the total time added to
        ``timings``) and its report."""
        from .report import write_report

        timings = {**fields.pop("timings", {}), "total": time.perf_counter() - self.t0}
        self.write_json(MANIFEST, spec.manifest(timings=timings, **fields))
        write_report(self.dir)

    def commit(self) -> None:
        """Swap the staged folder in: an earlier run in ``out`` is replaced whole, so no file of it
        survives to contradict the new one."""
        backup = None
        if self.out.exists():
            if any(self.out.iterdir()):
                backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                os.rename(self.out, backup)
            else:
                self.out.rmdir()
        os.rename(self.dir, self.out)
        self.dir = self.out  # nothing left to clean up
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Compression runs


def write_compress_run(stage: Stage, spec: RunSpec, result: Any, data: Any) -> None:
    """Every file of a compression run from a :class:`squeezer.pipeline.Result`."""
    from .models import save_weights
    from .quant.storage import packed_state_dict

    stage.write_json("plan.json", result.plan.to_dict())
    if result.analysis is not None:
        _write_analysis(stage, result.analysis)
    stage.write_json("metrics.json", result.metrics(data))  # data may be None (zero-shot)
    if result.calib_inputs is not None:  # re-planning calibrates on the same distilled inputs
        save_weights(
            {f"batch{i}": x.contiguous() for i, x in enumerate(result.calib_inputs)},
            stage.path(DISTILLED_FILE),
            metadata={"format": "squeezer-distilled-inputs"},
        )
    save_weights(
        packed_state_dict(result.qmodel),
        stage.path(MODEL_FILE),
        metadata={"format": "squeezer-packed", "plan": "plan.json"},
    )
    stage.finish(spec, timings=result.timings)


def _write_analysis(stage: Stage, analysis: Any) -> None:
    """spectrum.json, sensitivity.json, costs.json and pareto.json: what re-planning needs."""
    if analysis.spectrum is not None:
        stage.write_json("spectrum.json", analysis.spectrum.to_dict())
    stage.write_json("sensitivity.json", analysis.sensitivity.to_dict())
    stage.write_json(
        "costs.json",
        {
            "costs": analysis.costs.to_dict(),
            "ties": [list(t) for t in analysis.ties],
            "template": None if analysis.template is None else analysis.template.to_dict(),
            "template_name": analysis.template_name,
        },
    )
    stage.write_json("pareto.json", [p.to_dict() for p in analysis.frontier])


@dataclass(frozen=True)
class SavedRun:
    """A run folder as read back: its spec, its plan and analysis (None where absent), and the
    distilled inputs of a zero-shot run."""

    dir: Path
    spec: RunSpec
    plan: Plan | None
    analysis: Any
    calib_inputs: list | None

    def load(self):
        """The float model and data set (or None) the run was made from."""
        return load_inputs(self.spec, self.dir)

    def redo(self, budget: Budget | None = None) -> RunSpec:
        """The spec of this run re-planned for ``budget`` (or with a given plan)."""
        return replace(self.spec, budget=budget or self.spec.budget, replanned=True)


def read_run(path: str | os.PathLike) -> SavedRun:
    """Read a run folder's manifest, plan, analysis and distilled inputs (not the model)."""
    from .pipeline import Analysis
    from .plan import FrontierPoint
    from .sensitivity import Sensitivity
    from .spectrum import Spectrum

    d = require_run_folder(path)
    spec = RunSpec.from_manifest(json.loads((d / MANIFEST).read_text()))
    plan = Plan.load(d / "plan.json") if (d / "plan.json").is_file() else None
    analysis = None
    if (d / "sensitivity.json").is_file() and (d / "costs.json").is_file():
        c = json.loads((d / "costs.json").read_text())
        spectrum = Spectrum.load(d / "spectrum.json") if (d / "spectrum.json").is_file() else None
        frontier = []
        if (d / "pareto.json").is_file():
            frontier = [
                FrontierPoint(p["cost"], p["omega"], p["bits"])
                for p in json.loads((d / "pareto.json").read_text())
            ]
        analysis = Analysis(
            spectrum=spectrum,
            sensitivity=Sensitivity.load(d / "sensitivity.json"),
            costs=Costs.from_dict(c["costs"]),
            frontier=frontier,
            ties=tuple(tuple(t) for t in c.get("ties", [])),
            template=Plan.from_dict(c["template"]) if c.get("template") else None,
            template_name=c.get("template_name", "default"),
        )
    calib = _distilled_inputs(d) if spec.calib == "zeroshot" else None
    return SavedRun(d, spec, plan, analysis, calib)


def _distilled_inputs(run_dir: Path) -> list:
    """The distilled calibration batches a zero-shot run saved, in order."""
    from .models import read_state_dict

    path = run_dir / DISTILLED_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is a zero-shot run without {DISTILLED_FILE} (made by an older squeezer); "
            "run 'squeezer compress ... --calib zeroshot' again with the new budget"
        )
    sd = read_state_dict(path)
    return [sd[f"batch{i}"] for i in range(len(sd))]


def load_compressed(path: str | os.PathLike):
    """(float model, quantized model, test inputs, data set or None) of a compression run. The
    test inputs are the data set's test split, or for a zero-shot run without data its distilled
    inputs."""
    import torch

    from .models import read_state_dict
    from .quant.apply import load_quantized

    d = require_run_folder(path)
    if not (d / "plan.json").is_file() or not (d / MODEL_FILE).is_file():
        raise ConfigError(
            f"{d} holds no compressed model (plan.json and {MODEL_FILE}); make one with "
            f"'squeezer compress MODEL --data DATA --budget B --out {d}'"
        )
    run = read_run(d)
    model, data = run.load()
    inputs = torch.cat(run.calib_inputs) if data is None else data.x_test
    base = model
    if run.spec.prune:  # the quantized weights fit the pruned architecture
        from .prune.stage import skeleton

        base = skeleton(model, run.dir)
    qmodel = load_quantized(base, run.plan, read_state_dict(run.dir / MODEL_FILE))
    return model.eval(), qmodel.eval(), inputs, data


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """A run's metrics.json ({} if it has none)."""
    p = Path(path) / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def update_metrics(path: str | os.PathLike, **entries: Any) -> dict[str, Any]:
    """Merge ``entries`` into a run's metrics.json (atomically) and re-write its report."""
    from .report import write_report

    metrics = {**read_metrics(path), **entries}
    write_json(Path(path) / "metrics.json", metrics)
    write_report(path)
    return metrics


__all__ = [
    "DISTILLED_FILE", "MANIFEST", "MODEL_FILE", "RunSpec", "SavedRun", "Stage",
    "check_output_dir", "is_run_folder", "load_compressed", "load_inputs",
    "read_metrics", "read_run", "require_run_folder", "update_metrics", "write_compress_run",
    "write_json",
]  # fmt: skip
