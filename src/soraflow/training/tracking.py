"""Tracked runs: each training run's settings, the project's git commit, its run identity (the
digests of its data and initial weights) and its metrics, in MLflow (`tracking.mlflow`: a local
sqlite store by default, which `mlflow ui --backend-store-uri sqlite:///results/mlflow.db` shows)
and, where `tracking.wandb.project` names one, in Weights & Biases (offline by default: run
folders under `tracking.wandb.dir`/wandb that `wandb sync` uploads later; no network needed).

One tracked run per training run: the run folder remembers its MLflow (W&B) run under the run
identity, so a resumed run (the next link of a chain, a retry) logs into the same tracked run,
and a run that starts afresh (changed settings or data) opens a new one. A run killed after its last
checkpoint had logged points past it, which the resumed run computes again (MLflow would keep
both): the resumed run reads the run's metric history back from MLflow and logs only the points
it lacks, so its history is an uninterrupted run's, each step once, wherever the kill fell (MLflow
itself is the record of what was logged; resume is exact, so the points it holds are the ones the
resumed run computes). W&B keeps the first point at a step by its own rule: a run's steps only
go forward, and a resumed run's points at steps it already holds are dropped. Rank 0 logs.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

from soraflow.core.atomic import atomic_path

MEMO, WANDB_MEMO = "tracking.json", "wandb.json"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
# seconds W&B may take to start its run: online with no network it would otherwise wait 90 s
WANDB_INIT_TIMEOUT_S = 30.0


def git_commit() -> str:
    """The commit of the soraflow checkout this runs from ('unknown' outside a git checkout)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10)  # fmt: skip
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def flattened(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys with string values (lists as JSON)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flattened(value, f"{name}."))
        else:
            out[name] = (json.dumps(value) if isinstance(value, list | tuple) else str(value))[:MAX_PARAM_CHARS]
    return out


def run_tags(run_dir: Path, identity: str, identity_parts: dict) -> dict[str, str]:
    """What identifies a training run: its stage and folder, the git commit, its data digests."""
    return {
        "soraflow.stage": run_dir.name, "soraflow.run_dir": str(run_dir), "soraflow.git_commit": git_commit(),
        "soraflow.identity": identity, "soraflow.index_sha256": identity_parts["index"],
        "soraflow.init_sha256": str(identity_parts["init"]),
        "soraflow.caches_sha256": json.dumps(identity_parts["caches"], sort_keys=True)[:MAX_PARAM_CHARS],
    }  # fmt: skip


def remembered(memo_path: Path, key: dict) -> str | None:
    """The tracked run the run folder remembers under `key` (its identity, the store), if any."""
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    return memo.get("run_id") if all(memo.get(k) == v for k, v in key.items()) else None


def remember(memo_path: Path, key: dict, run_id: str) -> None:
    with atomic_path(memo_path) as tmp:
        tmp.write_text(json.dumps({**key, "run_id": run_id}))


class MlflowTracker:
    """The MLflow run of one training run."""

    def __init__(self, settings: dict, run_dir: Path, identity: str, identity_parts: dict, params: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = settings["mlflow"]
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        memo_path, key = run_dir / MEMO, {"identity": identity, "uri": uri}
        self.logged: set[tuple[str, int]] = set()  # (metric, step) already in the MLflow run
        self.run_id = remembered(memo_path, key)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            for metric in self.client.get_run(self.run_id).data.metrics:
                self.logged.update((metric, m.step) for m in self.client.get_metric_history(self.run_id, metric))
            return
        experiment = self.client.get_experiment_by_name(settings["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings["experiment"])
        tags = run_tags(run_dir, identity, identity_parts)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params_list = [Param(k, v) for k, v in flattened(params).items()]
        for start in range(0, len(params_list), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params_list[start : start + 100])
        remember(memo_path, key, self.run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = {k: v for k, v in metrics.items() if v is not None and (k, step) not in self.logged}
        if new:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in new.items()])

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED (stopped for a resume)."""
        self.client.set_terminated(self.run_id, status=status)


class WandbTracker:
    """The Weights & Biases run of one training run: its settings as the run's config, beside
    them (under `soraflow`) the tags MLflow's run holds."""

    def __init__(self, settings: dict, run_dir: Path, identity: str, identity_parts: dict, params: dict):
        import wandb

        root = Path(settings["dir"])
        root.mkdir(parents=True, exist_ok=True)
        memo_path, key = run_dir / WANDB_MEMO, {"identity": identity, "project": settings["project"]}
        run_id = remembered(memo_path, key) or secrets.token_hex(8)  # W&B's ids: [a-z0-9]
        tags = {name.removeprefix("soraflow."): value for name, value in run_tags(run_dir, identity, identity_parts).items()}
        self.run = wandb.init(
            project=settings["project"], mode=settings["mode"], dir=root, id=run_id, resume="allow",
            name=run_dir.name, config={**params, "soraflow": tags},
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off", silent=True),
        )  # fmt: skip
        remember(memo_path, key, run_id)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self, status: str) -> None:
        if status == "KILLED":
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Trackers:
    """The tracked runs the `tracking` settings ask for, logged to together."""

    def __init__(self, settings: dict, run_dir: Path, identity: str, identity_parts: dict, params: dict):
        self.runs: list[MlflowTracker | WandbTracker] = []
        if settings.get("mlflow"):
            self.runs.append(MlflowTracker(settings, run_dir, identity, identity_parts, params))
        if settings.get("wandb", {}).get("project"):
            self.runs.append(WandbTracker(settings["wandb"], run_dir, identity, identity_parts, params))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for run in self.runs:
            run.log(step, metrics)

    def finish(self, status: str) -> None:
        for run in self.runs:
            run.finish(status)
