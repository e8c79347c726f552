"""benchmarks/gpu_check.sh --cpu-dry: the prepared GPU check's code path, at tiny sizes on the CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_its_path_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry", str(out)], capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-dry" and set(report["train"]) == {"ddp", "fsdp"}
    for engine, run in report["train"].items():
        assert "failed" not in run, run.get("log_tail")
        assert run["steps"] == 4 and run["samples_per_s"] > 0 and 0 < run["mfu"] < 1
        assert run["plan_memory_bytes"]["total"] > 0 and run["peak_memory_bytes"]["host_rss"] > 0
    assert report["sample"]["steps"] == 2 and report["sample"]["video_bytes"] > 0
    assert report["caption"]["captioned"] == 2 and report["caption"]["devices"] == ["cpu"]
