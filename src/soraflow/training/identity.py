"""What a run's checkpoints belong to: a resumed run must be the same run.

A checkpoint resumes only under the identity it was written with: the run's settings,
its training index and its initial weights. Settings that only lengthen the run or change
its pace or its spread over processes (RESUMABLE_CHANGES) are left out of it.
"""

from __future__ import annotations

import hashlib
import json


# Settings a run may change and still resume its checkpoints: train longer, log or save at
# another pace, switch engine. Anything else (data, init, lr, model, seed) starts afresh.
RESUMABLE_CHANGES = {"stage": {"steps"}, "train": {"checkpoint_every", "log_every", "engine", "nproc_per_node"}}


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(params: dict, index_path, init_path) -> str:
    """What a run's checkpoints belong to: its settings, its training index, its initial weights."""
    settings = {
        section: {k: v for k, v in params[section].items() if k not in RESUMABLE_CHANGES.get(section, ())}
        for section in ("stage", "train", "stdit", "diffusion")
    }
    identity = {"settings": settings, "index": file_digest(index_path), "init": init_path and file_digest(init_path)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
