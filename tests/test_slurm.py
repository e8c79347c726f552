"""The workflow under `--profile profiles/slurm`, on a real one-node Slurm cluster on localhost.

tests/slurm/cluster.sh starts slurmctld + slurmd (two fake GPUs) for this module and stops them
after; it installs slurm-wlm and munge with apt where missing. The test is skipped only when that
is impossible (not root and no passwordless sudo, or apt cannot install the packages).

One tiny workflow (one demo video, stage1 only) runs through the profile in a temp dir:
  1. `-n`                       plans every rule and submits nothing
  2. `--until train_stage1`     runs up to training (a few steps), nothing after it
  3. `--until train_stage1`     with more steps (about 60 s of training at the speed just measured):
                                training resumes as a chain of jobs with a 1-minute time limit; each
                                stops ahead of its limit (Slurm's end time of the job) with a
                                checkpoint of its last step, and the next resumes it and finishes
  4. `-n --forcerun caption`    plans caption and everything downstream of it, nothing upstream
  5. the whole workflow         samples, plus `flaky` (tests/slurm/Snakefile), which fails on its
                                first attempt and succeeds when the profile's `retries` resubmits it
Every Snakemake call runs under `timeout -s INT`: Snakemake cancels its Slurm jobs and stops.
The module prints the measured figures (submit -> start latency, job and run times).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_run import small_config

from soraflow.data import video
from soraflow.models.checkpoint import load_for_sampling
from soraflow.workflow.layout import Layout

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SNAKEFILE = REPO / "tests" / "slurm" / "Snakefile"  # the workflow + a CUDA probe + a flaky rule
PROFILE = REPO / "profiles" / "slurm" / "config.v8+.yaml"

GPU_RULES = {"caption", "encode_video", "encode_text", "train_stage1", "sample_stage1"}
CPU_RULES = {"demo_videos", "shard", "ingest", "split", "score", "models", "dataset", "flaky"}
FIRST_STEPS = 60  # the first training run, which also measures this machine's steps/s (4-9 seen)
PREEMPT_SECONDS = 60  # then steps for this much training: jobs of a 1-minute limit (30-40 s of training each) cut it
SNAKEMAKE_TIMEOUT = 1500  # training speed here swings 3-15 steps/s with other load on 2 cores

pytestmark = pytest.mark.slow


# --- the cluster ---------------------------------------------------------------------------------
def _why_no_cluster() -> str | None:
    if not sys.platform.startswith("linux"):
        return "a local Slurm cluster needs Linux"
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        return "a local Slurm cluster needs root or passwordless sudo (apt, slurmctld, slurmd)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    started = time.time()
    result = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("sbatch")):
            pytest.skip(f"could not install slurm-wlm with apt: {result.stderr[-1500:]}")
        pytest.fail(f"the local Slurm cluster did not start:\n{result.stdout}{result.stderr}")
    print(f"\ncluster started in {time.time() - started:.1f} s")
    yield
    subprocess.run([str(CLUSTER), "stop"], capture_output=True, text=True, timeout=120)


def slurm_jobs(workdir: Path) -> list[dict]:
    """Every job Slurm still lists (MinJobAge=600) that ran in workdir, oldest first."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") != str(workdir):
            continue
        fields["rule"] = re.sub(r"^rule_|_wildcards_.*$", "", fields.get("Comment", ""))
        jobs.append(fields)
    return sorted(jobs, key=lambda j: int(j["JobId"]))


def seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


# --- the workflow --------------------------------------------------------------------------------
def slurm_config(workdir: Path) -> dict:
    """test_end_to_end's small config, smaller: one demo video (3 scenes, one shard), stage1 only."""
    config = small_config(workdir)
    (workdir / "manifest.csv").write_text("url,id,text\ndata/demo/cuts_a.mp4,cuts_a,\n")
    # what the test cluster's nodes have (2 CPUs, 2 GPUs, a few GB)
    config["stages"] = {"stage1": {**config["stages"]["stage1"], "steps": FIRST_STEPS,
                                   "resources": {"cpus_per_gpu": 2, "mem_mb": 2000, "runtime": 30}}}  # fmt: skip
    config["resources"] = {step: {"mem_mb": 2000} for step in ("caption", "encode_video", "encode_text", "sample")}
    config["train"]["log_every"] = 10
    config["train"]["checkpoint_every"] = 25
    config["caption"]["max_new_tokens"] = 8
    config["diffusion"]["sample_steps"] = 2
    return config


def profile_for_test(folder: Path) -> Path:
    """profiles/slurm as it is, but for the partition file's path: relative to the repository,
    where Snakemake runs in its --directory (the workdir) it would not be found."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["slurm-partition-config"] = str(REPO / profile["slurm-partition-config"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(profile))
    return folder


def snakemake(workdir: Path, profile: Path, *args: str) -> str:
    cmd = ["timeout", "-s", "INT", "-k", "60", str(SNAKEMAKE_TIMEOUT), sys.executable, "-m", "snakemake",
           "-s", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"),
           "--profile", str(profile), *args]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = result.stdout + result.stderr
    assert result.returncode != 124, f"snakemake {' '.join(args)} ran past {SNAKEMAKE_TIMEOUT} s:\n{log[-6000:]}"
    assert result.returncode == 0, f"snakemake {' '.join(args)} failed:\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("slurm_workflow")
    config = slurm_config(workdir)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    profile = profile_for_test(tmp_path_factory.mktemp("profile"))
    layout = Layout(config)
    runs = {"workdir": workdir, "layout": layout, "seconds": {}}

    def timed(name, *args):
        started = time.time()
        runs[name] = snakemake(workdir, profile, *args)
        runs["seconds"][name] = time.time() - started
        runs[f"jobs_after_{name}"] = slurm_jobs(workdir)

    timed("dry_run", "-n")
    timed("until", "--until", "train_stage1")
    # More steps for the same run: train_stage1 runs again (its params changed; its protected
    # final checkpoint removed first, as a user does), resumes at step FIRST_STEPS and stops ahead
    # of the 1-minute limit; the chain's next job resumes it, and so on until it finishes. A loss row
    # only when a job stops or the stage ends (log_every, an operational setting, re-runs nothing).
    log = pd.read_csv(workdir / "results" / "runs" / "stage1" / "loss.csv")
    steps_per_second = (log["step"].iloc[-1] - log["step"].iloc[1]) / (log["seconds"].iloc[-1] - log["seconds"].iloc[1])
    # then a cluster whose jobs last a minute: the stage (3 minutes) runs as a chain of them
    config["cluster"] = {"max_runtime": 1}
    config["stages"]["stage1"]["resources"]["runtime"] = 3
    config["stages"]["stage1"]["steps"] = runs["total_steps"] = FIRST_STEPS + int(steps_per_second * PREEMPT_SECONDS)
    config["train"]["log_every"] = 10 * runs["total_steps"]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    (workdir / layout.checkpoint("stage1")).unlink()
    print(f"\ntraining speed {steps_per_second:.1f} steps/s: {runs['total_steps']} steps")
    timed("preempt", "--until", "train_stage1")
    runs["captioned_mtime"] = (workdir / layout.shard_file("captioned", layout.shards[0])).stat().st_mtime_ns
    timed("forcerun_plan", "-n", "--forcerun", "caption")
    timed("full")
    report(runs)
    return runs


def report(runs: dict) -> None:
    jobs = runs["jobs_after_full"]
    waits = [seconds(j, "SubmitTime", "StartTime") for j in jobs]
    lines = [f"{j['JobId']:>4} {j['rule']:<14} {j['Partition']:<4} {j.get('TresPerJob', '-'):<12} "
             f"{j['JobState']:<9} wait {seconds(j, 'SubmitTime', 'StartTime'):3.0f} s  "
             f"run {seconds(j, 'StartTime', 'EndTime'):4.0f} s" for j in jobs]  # fmt: skip
    print("\n".join(["", "slurm jobs:", *lines]))
    print(f"submit -> start: min {min(waits):.0f} s, median {sorted(waits)[len(waits) // 2]:.0f} s, max {max(waits):.0f} s")
    print("snakemake calls: " + ", ".join(f"{k} {v:.0f} s" for k, v in runs["seconds"].items()))


def by_rule(jobs: list[dict], rule: str) -> list[dict]:
    return [j for j in jobs if j["rule"] == rule]


# --- the tests -----------------------------------------------------------------------------------
def test_dry_run_plans_every_rule_and_submits_nothing(runs):
    for rule in GPU_RULES | CPU_RULES:
        assert f"rule {rule}:" in runs["dry_run"], rule
    assert runs["jobs_after_dry_run"] == []


def test_until_train_stage1_stops_before_sampling(runs):
    workdir, layout = runs["workdir"], runs["layout"]
    assert "train_stage1" in runs["until"] and "sample_stage1" not in runs["until"]
    rules = {j["rule"] for j in runs["jobs_after_until"]}
    assert rules == GPU_RULES - {"sample_stage1"} | CPU_RULES - {"flaky"}, rules
    assert (workdir / layout.checkpoint("stage1")).exists()
    before = {j["JobId"] for j in runs["jobs_after_until"]}  # squeue forgets old jobs: compare ids
    rules = {j["rule"] for j in runs["jobs_after_preempt"] if j["JobId"] not in before}
    assert rules == {"train_stage1"}, rules  # a changed train param reruns training only


def test_gpu_rules_get_a_gpu_and_see_cuda_visible_devices(runs):
    workdir = runs["workdir"]
    jobs = runs["jobs_after_full"]
    # squeue keeps finished jobs for MinJobAge only: the full run's own jobs, at least
    assert {"sample_stage1", "flaky"} <= {j["rule"] for j in jobs} <= GPU_RULES | CPU_RULES
    for job in jobs:
        gpu = job["rule"] in GPU_RULES
        assert job["Partition"] == ("gpu" if gpu else "cpu"), job
        # training asks per node (gres gpu:1 on each of its nodes), the other GPU jobs per job
        tres = job.get("TresPerNode") if job["rule"] == "train_stage1" else job.get("TresPerJob")
        assert (tres == "gres:gpu:1") == gpu, job
        logs = list((workdir / ".snakemake" / "slurm_logs").glob(f"rule_{job['rule']}/**/{job['JobId']}.log"))
        assert len(logs) == 1, (job["rule"], job["JobId"])
        probe = re.search(r"probe CUDA_VISIBLE_DEVICES=(\S+) SLURM_JOB_ID=(\d+)", logs[0].read_text())
        assert probe and probe[2] == job["JobId"], logs[0]
        assert (probe[1] in {"0", "1"}) if gpu else probe[1] == "unset", (job["rule"], probe[1])


def test_a_job_that_fails_once_is_retried_and_succeeds(runs):
    workdir = runs["workdir"]
    flaky = by_rule(runs["jobs_after_full"], "flaky")
    assert [j["JobState"] for j in flaky] == ["FAILED", "COMPLETED"]
    assert (workdir / "results" / "flaky_attempts.txt").read_text() == "attempt 1\nattempt 2\n"
    assert (workdir / "results" / "flaky.txt").read_text() == "ok\n"


def test_training_stops_ahead_of_the_time_limit_with_its_last_step_checkpointed(runs):
    """Every job of the chain but the last stops on its own before its 1-minute limit (FAILED, not
    TIMEOUT: nothing was killed) with a checkpoint of the last step it ran: its loss row, logged as
    it stops, is still in the log after the next job resumed (a resume drops the rows past its
    checkpoint), one row per job."""
    workdir, layout = runs["workdir"], runs["layout"]
    total = runs["total_steps"]
    first, *train = by_rule(runs["jobs_after_preempt"], "train_stage1")
    assert first["JobState"] == "COMPLETED"  # FIRST_STEPS, within the limit
    states = [j["JobState"] for j in train]
    assert states[-1] == "COMPLETED" and states[:-1] and set(states[:-1]) == {"FAILED"}, states  # a chain
    assert {j["TimeLimit"] for j in train} == {"00:01:00"}  # every link at the cluster's limit
    log = (workdir / "logs" / "train" / "stage1.log").read_text()  # the last attempt's
    resumed_from = int(re.search(r"from step (\d+)", log)[1])
    assert "the job ends at" in log  # it knew its end time (squeue %e under Slurm 22.05)
    run_dir = workdir / "results" / "runs" / "stage1"
    rows = pd.read_csv(run_dir / "loss.csv")
    stops = rows[rows["step"] > FIRST_STEPS]["step"].tolist()
    print(f"\ntraining: jobs of {[round(seconds(j, 'StartTime', 'EndTime')) for j in train]} s stopped at steps "
          f"{stops[:-1]}, the last resumed from step {resumed_from} and ended at {total}")
    assert len(stops) == len(train) and stops == sorted(stops) and stops[-1] == total, (stops, states)
    assert resumed_from == stops[-2]  # the last job resumed from the step its predecessor stopped at
    _, input_size = load_for_sampling(workdir / layout.checkpoint("stage1"), use_ema=False)
    assert input_size[0] == 1


def test_forcerun_caption_plans_caption_and_downstream_only(runs):
    plan = runs["forcerun_plan"]
    for rule in ("caption", "encode_text", "dataset", "train_stage1", "sample_stage1"):
        assert f"rule {rule}:" in plan, rule
    for rule in ("demo_videos", "shard", "ingest", "split", "models", "encode_video"):
        assert f"rule {rule}:" not in plan, rule
    assert len(runs["jobs_after_forcerun_plan"]) == len(runs["jobs_after_preempt"])  # a plan submits nothing


def test_the_whole_workflow_completes_under_the_profile(runs):
    workdir, layout = runs["workdir"], runs["layout"]
    for sample in layout.sample_videos("stage1"):
        assert video.read_frames(workdir / sample).shape[0] == 1
    assert "steps (100%) done" in runs["full"]
