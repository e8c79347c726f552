"""Failures a retry would only repeat: recorded by the attempt that met one, so that Snakemake's
retries do not run them again as if they were preemptions.

Snakemake resubmits a failed job up to its rule's `retries`, whatever the failure: a train
rule's retries are the links of a chained stage plus a few for node losses and preemptions
(soraflow.workflow.resources), and a rule's retries are a fixed number (no per-exit-code retry).
Training is deterministic from its checkpoint, so a loss that turned NaN, or a setting that
does not fit (a ValueError when the trainer starts), fails the same way on every retry, each
one queued for the stage's whole allocation (64 GPUs) and starting every rank before it fails.
So the process that meets such an error records it in the run folder (`failed.json`), and the
train command of a later attempt of the same Snakemake run (`--attempt`, Snakemake's count,
which the train rule passes) exits at once with the recorded error: no torchrun, no model, no
data. A first attempt removes the record, as a new Snakemake run follows a change (a fixed
setting, a fixed bug) that the record cannot see.

A preemption, a time limit, a lost node or a killed process leaves no record and is retried.
"""

from __future__ import annotations

import json
from pathlib import Path

from soraflow.core.atomic import atomic_path

# errors that a rerun from the same checkpoint with the same settings and code meets again:
# a non-finite loss, and settings, data or checkpoints that do not fit (raised as these types)
DETERMINISTIC = (FloatingPointError, ValueError, KeyError, TypeError)
RECORD = "failed.json"


def record(run_dir, error: BaseException, rank: int) -> None:
    """Keep a deterministic failure for the next attempt (each rank that meets one; the last wins)."""
    with atomic_path(Path(run_dir) / RECORD) as tmp:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"error": f"{type(error).__name__}: {error}", "rank": rank}))


def recorded(run_dir, attempt: int) -> str | None:
    """The deterministic failure an earlier attempt of this Snakemake run recorded, or None.
    A first attempt removes any record left by an earlier Snakemake run."""
    path = Path(run_dir) / RECORD
    if attempt <= 1:
        path.unlink(missing_ok=True)
        return None
    if not path.exists():
        return None
    failure = json.loads(path.read_text())
    return f"{failure['error']} (rank {failure['rank']}, recorded in {path}; a new Snakemake run tries again)"
