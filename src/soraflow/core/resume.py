"""A shard job's finished work, kept where Snakemake never deletes it, so that a retry after a
timeout or a kill continues from what is done.

Snakemake deletes a job's declared outputs, files and directory() outputs alike, before it runs
the job again, and again when the job fails. So a shard job keeps its progress in a folder
beside its output, `{output}.progress/`, which no rule declares: one part file per finished item
(a video, a clip, or a batch of clips), written under a temp name and renamed (core.atomic), so
a part that is there is complete. The folder holds the work of one key: the step's
output-changing settings and a signature of its inputs; a job with another key empties it
first, so a settings change never reuses stale work. The job assembles its outputs from the
parts in its shard's order, the same way whether or not a retry came between, so both write
the same bytes; then it removes the folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from soraflow.core.atomic import atomic_path

KEY_FILE = "key.json"
PART_SUFFIX = ".part.json"


def progress_folder(output: str | Path) -> Path:
    """Where the job making `output` keeps its progress: beside it, never inside it."""
    output = Path(output)
    return output.with_name(output.name + ".progress")


def file_digest(path: str | Path) -> str:
    """The file's sha256, hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def input_signature(path: str | Path) -> str | list:
    """What an input is, for a progress key: a file's content digest (tables); for a folder (a
    model's weights, possibly many GB) every file's name, size and modification time; anything
    else (a hub id) as given."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        return [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                for f in sorted(path.rglob("*")) if f.is_file()]
    return str(path)


def _plain(value):
    """numpy scalars as the Python values they hold (pandas rows carry them)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot go into a progress part")


class JobProgress:
    """The parts of one job, by item name.

        progress = JobProgress(progress_folder(out), key)
        done = progress.parts()           # {item: value} of every finished item
        progress.add(item, value)         # as each item finishes (value: JSON-able)
        ...assemble the outputs from progress.parts(), in the shard's order...
        progress.remove()
    """

    def __init__(self, folder: str | Path, key):
        self.folder = Path(folder)
        self.key = json.dumps(key, sort_keys=True, default=_plain)
        key_file = self.folder / KEY_FILE
        if self.folder.exists() and (not key_file.exists() or key_file.read_text() != self.key):
            shutil.rmtree(self.folder)  # another key's work (or a folder killed before its key was written)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            with atomic_path(key_file) as tmp:
                tmp.write_text(self.key)
        finished = sum(1 for _ in self.folder.glob("*" + PART_SUFFIX))
        if finished:
            print(f"{self.folder}: resuming after {finished} finished parts of an earlier attempt", flush=True)

    def _part(self, item: str) -> Path:
        return self.folder / (hashlib.sha256(item.encode()).hexdigest()[:24] + PART_SUFFIX)

    def add(self, item: str, value) -> None:
        """Record `item` as finished with `value` (atomically: a kill leaves it whole or absent)."""
        with atomic_path(self._part(item)) as tmp:
            tmp.write_text(json.dumps({"item": item, "value": value}, default=_plain))

    def parts(self) -> dict:
        """{item: value} of every finished item."""
        found = {}
        for path in self.folder.glob("*" + PART_SUFFIX):
            part = json.loads(path.read_text())
            found[part["item"]] = part["value"]
        return found

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
