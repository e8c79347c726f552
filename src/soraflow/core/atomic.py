"""Outputs written under a temp name beside their final path, then renamed into place, so a
present file or folder is always complete: a killed job leaves a temp name, never a
half-written output."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _temp_name(path: Path, keep_suffix: bool) -> Path:
    return path.with_name(f"{path.stem}.tmp{path.suffix}" if keep_suffix else f"{path.name}.tmp")


@contextmanager
def atomic_paths(*paths: str | Path, keep_suffix: bool = False) -> Iterator[list[Path]]:
    """Yield temp paths to write `paths` to (files, or folders the block creates); they replace
    `paths` together when the block succeeds and are removed when it fails. keep_suffix:
    `a.tmp.mp4` instead of `a.mp4.tmp`, for writers that pick the format from the extension."""
    finals = [Path(p) for p in paths]
    temps = [_temp_name(p, keep_suffix) for p in finals]
    for final, tmp in zip(finals, temps):
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # left by a killed run
    try:
        yield temps
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise
    for final, tmp in zip(finals, temps):
        if tmp.is_dir() and final.exists():
            _remove(final)  # a folder cannot be renamed over another
        tmp.replace(final)


@contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """atomic_paths for one output."""
    with atomic_paths(path, keep_suffix=keep_suffix) as (tmp,):
        yield tmp
