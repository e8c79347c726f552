"""A training stage on 2 nodes x 2 processes, through `--profile profiles/slurm`, on a real two-node
Slurm cluster on this machine.

`tests/slurm/cluster.sh two-node` starts slurmctld in one network namespace and slurmd node1 and
node2 in two more (own hostnames, a veth bridge, two fake GPUs each); it installs slurm-wlm and munge
with apt where missing. Snakemake submits from inside the controller's namespace. The root network
namespace must gain no address, and the namespaces must be gone after `stop`.

One tiny workflow (one demo video, stage1 only, the STDiT-tiny model) is built here up to the
stage's training index, then:
  1. `--until train_stage1` with a few steps: one job, 2 nodes with 2 GPUs each; the launcher's
     srun starts torchrun on both nodes, the 4 ranks meet over gloo at node1 and report their hosts
  2. more steps (about 90 s of training at the speed just measured; the final checkpoint removed,
     as the rule's protected output asks): every job of the stage's chain has the cluster's 1-minute
     limit (cluster.max_runtime); the ranks stop ahead of it (rank 0 asks squeue for the job's end
     time), checkpoint, and Snakemake submits the next link, which resumes where it stopped, until
     the stage is done
  3. one process (`soraflow train --nproc 1`), no Slurm, the same global batch, every step at once:
     its loss at every step must be the 2 x 2 run's, across the cut
What Slurm receives (the executor plugin's sbatch calls in Snakemake's --verbose log, and
`scontrol show job`) is checked against what the test's config says the stage needs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_slurm import _why_no_cluster, profile_for_test, seconds
from workflow_run import small_config

from soraflow.workflow import settings
from soraflow.workflow.layout import Layout

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
PYTHON_BIN = str(Path(sys.executable).parent)

# What the stage needs, as the config says it; Slurm must receive exactly this.
NODES, GPUS_PER_NODE, PROCESSES_PER_NODE, CPUS_PER_GPU, MEM_MB = 2, 2, 2, 1, 2000
TIME_LIMIT = 1  # minutes: the cluster's job time limit (cluster.max_runtime); Slurm enforces it 60-90 s in
GLOBAL_BATCH = 4  # one sample per rank
FIRST_STEPS = 20
TRAIN_SECONDS = 90  # the second run's training: more than a 1-minute job (enforced 60-90 s in) can hold
SNAKEMAKE_TIMEOUT = 1500

pytestmark = pytest.mark.slow


def root_addresses() -> str:
    return subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True, check=True).stdout


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def cluster(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLUSTER), "two-node", *args], capture_output=True, text=True, timeout=timeout)


def slurm_jobs(workdir: Path) -> list[dict]:
    """Every job the controller still lists (MinJobAge=600) that ran in workdir, oldest first."""
    out = cluster("exec", "scontrol", "show", "job", "-o").stdout
    jobs = [dict(re.findall(r"([^\s=]+)=(\S*)", line)) for line in out.splitlines()]
    return sorted((j for j in jobs if j.get("WorkDir") == str(workdir)), key=lambda j: int(j["JobId"]))


# --- the workflow --------------------------------------------------------------------------------
def two_node_config(workdir: Path) -> dict:
    """test_end_to_end's small config, smaller (one demo video, stage1 only, STDiT-tiny), the stage
    on 2 nodes x 2 GPUs with a process each, every step logged (so every step's loss compares)."""
    config = small_config(workdir)
    (workdir / "manifest.csv").write_text("url,id,text\ndata/demo/cuts_a.mp4,cuts_a,\n")
    stage = {**config["stages"]["stage1"], "steps": FIRST_STEPS, "batch_size": GLOBAL_BATCH}
    stage["resources"] = {"nodes": NODES, "gpus_per_node": GPUS_PER_NODE, "processes_per_node": PROCESSES_PER_NODE,
                          "cpus_per_gpu": CPUS_PER_GPU, "mem_mb": MEM_MB, "runtime": 8}  # fmt: skip
    config["stages"] = {"stage1": stage}
    config["stdit"]["preset"] = "STDiT-tiny"
    config["cluster"] = {"max_runtime": TIME_LIMIT}
    config["train"].update(log_every=1, checkpoint_every=10_000, data_workers=0)
    config["caption"]["max_new_tokens"] = 8
    return config


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "PATH": f"{PYTHON_BIN}:{os.environ['PATH']}"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    log = result.stdout + result.stderr
    assert result.returncode != 124, f"{what} ran past {SNAKEMAKE_TIMEOUT} s:\n{log[-6000:]}"
    assert result.returncode == 0, f"{what} failed:\n{log[-6000:]}"
    return log


def snakemake_on_slurm(workdir: Path, profile: Path, *args: str) -> str:
    """Snakemake inside the controller's namespace; SIGINT at the timeout cancels its jobs."""
    cmd = [str(CLUSTER), "two-node", "exec", "timeout", "-s", "INT", "-k", "60", str(SNAKEMAKE_TIMEOUT),
           sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--profile", str(profile), "--verbose", *args]  # fmt: skip
    return run(cmd, f"snakemake {' '.join(args)}")


def one_process(workdir: Path, config: dict, run_dir: str) -> pd.DataFrame:
    """`soraflow train` on one process with the stage's settings, outside Slurm; its loss log."""
    layout = Layout(settings.with_defaults(config))
    run(["soraflow", "train", layout.stage_index("stage1"), "--out", f"{run_dir}/out.safetensors", "--run-dir", run_dir,
         "--params", layout.params("train", "stage1"), "--operational", layout.operational("train", "stage1"),
         "--nproc", "1", "--nodes", "1"], "one-process training", cwd=workdir)  # fmt: skip
    return pd.read_csv(workdir / run_dir / "loss.csv")


def steps_per_second(log: pd.DataFrame) -> float:
    """From a loss log's last run (`seconds` counts from each run's start)."""
    return (log["step"].iloc[-1] - log["step"].iloc[0]) / (log["seconds"].iloc[-1] - log["seconds"].iloc[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    started = time.time()
    installed = cluster("install", timeout=900)  # slurm-wlm, munge, iproute2 where missing
    if installed.returncode != 0:
        pytest.skip(f"could not install what a two-node Slurm cluster needs with apt: {installed.stderr[-1500:]}")
    runs = {"addresses_before": root_addresses(), "namespaces_before": namespaces()}
    result = cluster("start", timeout=120)
    if result.returncode != 0:
        cluster("stop")
        pytest.fail(f"the two-node Slurm cluster did not start:\n{result.stdout}{result.stderr}")
    try:
        runs["addresses_running"] = root_addresses()
        runs["status"] = cluster("status").stdout
        workdir = runs["workdir"] = tmp_path_factory.mktemp("two_node")
        config = two_node_config(workdir)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        profile = profile_for_test(tmp_path_factory.mktemp("profile"))
        layout = runs["layout"] = Layout(settings.with_defaults(config))

        # the data steps run here, not on Slurm: tests/test_slurm.py covers them there
        run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
             "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--until", "dataset"], "data steps")  # fmt: skip
        runs["seconds_data"] = time.time() - started

        mark = time.time()
        runs["first"] = snakemake_on_slurm(workdir, profile, "--until", "train_stage1")
        runs["first_train_log"] = (workdir / "logs" / "train" / "stage1.log").read_text()
        runs["first_jobs"] = slurm_jobs(workdir)
        speed = steps_per_second(pd.read_csv(workdir / layout.run_dir("stage1") / "loss.csv"))
        runs["seconds_first"] = time.time() - mark

        # More steps of the same run: the final weights go (the rule protects them), the job resumes
        # at FIRST_STEPS and its chain of 1-minute jobs carries it to the end.
        mark = time.time()
        config["stages"]["stage1"]["steps"] = runs["total_steps"] = FIRST_STEPS + int(speed * TRAIN_SECONDS)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config))
        (workdir / layout.checkpoint("stage1")).unlink()
        print(f"\n2 x 2 training at {speed:.2f} steps/s: {runs['total_steps']} steps")
        runs["chain"] = snakemake_on_slurm(workdir, profile, "--until", "train_stage1")
        runs["chain_train_log"] = (workdir / "logs" / "train" / "stage1.log").read_text()
        runs["jobs"] = slurm_jobs(workdir)
        runs["seconds_chain"] = time.time() - mark

        mark = time.time()
        runs["reference"] = one_process(workdir, config, "reference")
        runs["seconds_reference"] = time.time() - mark
    finally:
        stopped = cluster("stop")
        runs["stop"] = stopped.stdout + stopped.stderr
        runs["addresses_after"] = root_addresses()
        runs["namespaces_after"] = namespaces()
    runs["seconds"] = time.time() - started
    report(runs)
    return runs


def report(runs: dict) -> None:
    lines = [f"{j['JobId']:>4} {j['JobState']:<9} limit {j['TimeLimit']}  wait {seconds(j, 'SubmitTime', 'StartTime'):3.0f} s"
             f"  run {seconds(j, 'StartTime', 'EndTime'):3.0f} s" for j in runs["jobs"]]  # fmt: skip
    print("\n".join(["", "train_stage1 jobs (2 nodes x 2 processes):", *lines]))
    print(f"wall time {runs['seconds']:.0f} s: data steps {runs['seconds_data']:.0f} s, first run "
          f"{runs['seconds_first']:.0f} s, chain {runs['seconds_chain']:.0f} s, one process {runs['seconds_reference']:.0f} s")
    print("sbatch:", sbatch_calls(runs["chain"])[0])


def sbatch_calls(log: str) -> list[str]:
    """The executor plugin's sbatch commands (logged at --verbose), without the wrapped job command."""
    return [call.split(" --wrap=")[0] for call in re.findall(r"sbatch call: (sbatch .*)", log)]


def chain_jobs(runs: dict) -> list[dict]:
    return runs["jobs"][len(runs["first_jobs"]) :]


# --- the tests -----------------------------------------------------------------------------------
def test_every_address_lives_in_the_clusters_namespaces_and_they_are_removed(runs):
    assert re.search(r"nodes: node1=\w+ node2=\w+", runs["status"]), runs["status"]
    assert runs["addresses_running"] == runs["addresses_before"]
    assert runs["addresses_after"] == runs["addresses_before"]
    assert runs["namespaces_after"] == runs["namespaces_before"], runs["stop"]


def test_slurm_receives_what_the_stage_needs(runs):
    calls = sbatch_calls(runs["first"]) + sbatch_calls(runs["chain"])
    assert len(calls) == len(runs["jobs"]), calls
    for call in calls:
        options = call.split()
        assert {"--nodes=2", "--gres=gpu:2", "--cpus-per-task=2"} <= set(options), call  # GPUs per node, a CPU each
        assert options[options.index("--mem") + 1] == str(MEM_MB) and options[options.index("-t") + 1] == "1", call
        assert options[options.index("-p") + 1] == "gpu", call
        assert not any(o.startswith(("--gpus", "--ntasks")) for o in options), call  # --gpus counts the whole job
    for job in runs["jobs"]:
        assert (job["NumNodes"], job["NodeList"], job["BatchHost"]) == ("2", "node[1-2]", "node1"), job
        assert (job["NumTasks"], job["CPUs/Task"], job["TresPerNode"]) == ("2", "2", "gres:gpu:2"), job
        assert (job["MinMemoryNode"], job["TimeLimit"], job["Partition"]) == ("2000M", "00:01:00", "gpu"), job


def test_ranks_meet_across_both_nodes_and_report_their_hosts(runs):
    for log in (runs["first_train_log"], runs["chain_train_log"]):
        launch = re.search(r"^launching: (.*)$", log, re.MULTILINE)[1]
        assert launch.startswith("srun --overlap --whole --nodes 2 --ntasks 2 --ntasks-per-node 1 "), launch
        assert "--nnodes 2 " in launch and "--rdzv-endpoint node1:29500 " in launch and "--nproc-per-node 2 " in launch
        hosts = re.findall(r"^ranks on hosts: (.*)$", log, re.MULTILINE)[-1].split()
        assert sorted(hosts) == ["node1", "node1", "node2", "node2"], hosts
        assert "engine ddp x4" in log


def test_the_jobs_stop_ahead_of_the_time_limit_and_the_next_link_resumes(runs):
    workdir, layout = runs["workdir"], runs["layout"]
    assert runs["first_jobs"][-1]["JobState"] == "COMPLETED"
    states = [j["JobState"] for j in chain_jobs(runs)]
    # each link but the last stopped on its own before its limit (a link cut by Slurm is TIMEOUT)
    assert states[-1] == "COMPLETED" and states[:-1] and set(states[:-1]) == {"FAILED"}, states
    last_link_start = int(re.search(r"from step (\d+)", runs["chain_train_log"])[1])  # the log is the last link's
    print(f"\nchain: {' '.join(states)}; the last link resumed from step {last_link_start} of {runs['total_steps']}")
    assert FIRST_STEPS < last_link_start < runs["total_steps"]  # cut mid-run, continued from its checkpoint
    log = pd.read_csv(workdir / layout.run_dir("stage1") / "loss.csv")
    assert log["step"].tolist() == list(range(1, runs["total_steps"] + 1))  # one run, continued, not restarted
    assert (workdir / layout.checkpoint("stage1")).exists()


def test_loss_equals_one_process_on_the_same_global_batch_at_every_step(runs):
    workdir, layout = runs["workdir"], runs["layout"]
    two_nodes = pd.read_csv(workdir / layout.run_dir("stage1") / "loss.csv")
    reference = runs["reference"]
    assert reference["step"].tolist() == two_nodes["step"].tolist()
    assert (two_nodes["loss"] - reference["loss"]).abs().max() < 1e-5, (two_nodes, reference)
    assert (two_nodes["grad_norm"] - reference["grad_norm"]).abs().max() < 1e-4
