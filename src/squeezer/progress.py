"""Progress bars on stderr, shown only on a terminal (never in CI logs or pipes)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass


@contextmanager
def progress(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A tqdm bar when ``enabled`` and stderr is a TTY, else a silent stand-in with the same methods.

    Example:
        >>> with progress(total=3, desc="work") as bar:
        ...     for _ in range(3):
        ...         bar.update(1)
    """
    if not (enabled and sys.stderr.isatty() and not os.environ.get("SQUEEZER_NO_PROGRESS")):
        yield _Silent()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
