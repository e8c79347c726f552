"""Retries that could only repeat what ended the attempt before: recorded by that attempt, so that
Snakemake's retries exit at once instead of running again.

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

A run that stopped ahead of its Slurm job's time limit (or was preempted) would start again at
once if the rule were retried inside the same job, with no time left to train: the Slurm
plugin's job step does that with a rule's own `retries` (seen on the test cluster; the train rule
asks for none there), and so does a whole workflow run inside one allocation. So the run records
the Slurm job it stopped in (`stopped.json`: job id and requeue count), and a train command in
that same job exits at once; the next job resumes. A lost node or a killed process leaves no
record and is retried.
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


STOPPED = "stopped.json"


def slurm_job(env) -> str | None:
    """This Slurm job (its id and how often Slurm requeued it: a requeued job keeps its id), or None."""
    return f"{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}" if "SLURM_JOB_ID" in env else None


def record_stop(run_dir, env) -> None:
    """A run stopped inside this Slurm job (its end is near, or it was preempted)."""
    job = slurm_job(env)
    if job is not None:
        with atomic_path(Path(run_dir) / STOPPED) as tmp:
            tmp.write_text(json.dumps({"job": job}))


def stopped_in_this_job(run_dir, env) -> bool:
    """Whether a run already stopped inside this Slurm job: a retry here has no time left."""
    path, job = Path(run_dir) / STOPPED, slurm_job(env)
    return job is not None and path.exists() and json.loads(path.read_text())["job"] == job
