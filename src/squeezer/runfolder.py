"""The run folder (DESIGN.md's contract): every output of a command lands in one directory, written
atomically, and never over files squeezer did not write.

A new run is staged in a hidden sibling directory and moved into place file by file only when the
command succeeds, so a failed run leaves no partial output behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import write_text_atomic
from .errors import ConfigError

MANIFEST = "manifest.json"


def check_output_dir(out: str | os.PathLike) -> Path:
    """``out`` must be absent, empty, or an earlier squeezer run folder (which is then updated)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory path")
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


class Stage:
    """A staging directory for a run; :meth:`commit` moves its files into ``out``.

    Example:
        >>> with Stage("runs/demo") as st:  # doctest: +SKIP
        ...     st.write_json("metrics.json", {"top1": 99.1})
    """

    def __init__(self, out: str | os.PathLike, *, update: bool = False):
        self.out = require_run_folder(out) if update else check_output_dir(out)
        self.update = update
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}

    def __enter__(self) -> Stage:
        parent = self.out.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(
            tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".staging", dir=parent)
        )
        os.chmod(self.dir, 0o755)
        if self.update:  # start from the run's current files; changed ones are overwritten
            for f in self.out.iterdir():
                if f.is_file():
                    shutil.copy2(f, self.dir / f.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        write_text_atomic(p, json.dumps(obj, indent=2, default=_default))
        return p

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


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as JSON (dataclasses through their ``to_dict``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_default))
