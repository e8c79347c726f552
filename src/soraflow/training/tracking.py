"""Tracked runs: each training run's settings, the project's git commit, its run identity (the
digests of its data and initial weights) and its metrics, in MLflow (`tracking.mlflow`: a local
sqlite store by default, which `mlflow ui --backend-store-uri sqlite:///results/mlflow.db` shows).

One MLflow run per training run: the run folder remembers its MLflow run under the run identity,
so a resumed run (the next link of a chain, a retry) logs into the same MLflow run, and a run
that starts afresh (changed settings or data) opens a new one. A run killed after its last
checkpoint had logged points past it, which the resumed run computes again (MLflow would keep
both): the resumed run reads the run's metric history back from MLflow and logs only the points
it lacks, so its history is an uninterrupted run's, each step once, wherever the kill fell (MLflow
itself is the record of what was logged; resume is exact, so the points it holds are the ones the
resumed run computes). Rank 0 logs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from soraflow.core.atomic import atomic_path

MEMO = "tracking.json"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


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


class Tracker:
    """The MLflow run of one training run."""

    def __init__(self, settings: dict, run_dir: Path, identity: str, identity_parts: dict, params: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = settings["mlflow"]
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        memo_path = run_dir / MEMO
        memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
        self.logged: set[tuple[str, int]] = set()  # (metric, step) already in the MLflow run
        if memo.get("identity") == identity and memo.get("uri") == uri:
            self.run_id = memo["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.logged.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))
            return
        experiment = self.client.get_experiment_by_name(settings["experiment"])
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings["experiment"])
        tags = {
            "soraflow.stage": run_dir.name, "soraflow.run_dir": str(run_dir), "soraflow.git_commit": git_commit(),
            "soraflow.identity": identity, "soraflow.index_sha256": identity_parts["index"],
            "soraflow.init_sha256": str(identity_parts["init"]),
            "soraflow.caches_sha256": json.dumps(identity_parts["caches"], sort_keys=True)[:MAX_PARAM_CHARS],
        }  # fmt: skip
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params_list = [Param(k, v) for k, v in flattened(params).items()]
        for start in range(0, len(params_list), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params_list[start : start + 100])
        with atomic_path(memo_path) as tmp:
            tmp.write_text(json.dumps({"identity": identity, "uri": uri, "run_id": self.run_id}))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = {k: v for k, v in metrics.items() if v is not None and (k, step) not in self.logged}
        if new:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in new.items()])

    def finish(self, status: str) -> None:
        """FINISHED, FAILED or KILLED (stopped for a resume)."""
        self.client.set_terminated(self.run_id, status=status)
