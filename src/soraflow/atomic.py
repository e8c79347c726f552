"""Outputs written under a temp name beside their final path, then renamed into place, so a
present file is always complete: a killed job leaves a temp file, never a half-written output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path to write `path` to; it replaces `path` when the block succeeds and is
    removed when it fails. keep_suffix: `a.tmp.mp4` instead of `a.mp4.tmp`, for writers that
    pick the format from the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}" if keep_suffix else f"{path.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
