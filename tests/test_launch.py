"""The launcher: torchrun / srun + torchrun commands from a (fake) Slurm environment, signal forwarding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from soraflow import cli
from soraflow.training import launch

PY = "/env/bin/python"
WORKER = ["train", "index.parquet", "--out", "out.safetensors", "--run-dir", "run", "--params", '{"a": 1}']
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}


def test_one_process_or_inside_torchrun_runs_in_place():
    assert not launch.needs_launch(1, 1, {})
    assert not launch.needs_launch(4, 1, {"RANK": "0"})  # already a torchrun worker
    assert launch.needs_launch(2, 1, {})
    assert launch.needs_launch(1, 2, SLURM)


def test_one_node_is_standalone_torchrun():
    cmd = launch.launch_command(4, 1, WORKER, {}, python=PY)
    assert cmd[:3] == [PY, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert "SIGUSR1" in cmd[cmd.index("--signals-to-handle") + 1]
    assert cmd[-len(WORKER) - 2 :] == ["-m", "soraflow.cli", *WORKER]
    # the same under Slurm when the job has one node
    assert launch.launch_command(4, 1, WORKER, SLURM, python=PY) == cmd


def test_multi_node_under_slurm_is_srun_of_torchrun_with_slurm_rendezvous():
    cmd = launch.launch_command(2, 2, WORKER, SLURM, hosts=["gpu07", "gpu08"], python=PY)
    # one task per node; the step shares the launcher's own step's CPUs and GPUs (--overlap) and
    # gives each node's torchrun all of the job's on that node (--whole)
    assert cmd[:11] == ["srun", "--overlap", "--whole", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1",
                        "--kill-on-bad-exit=1", "sh"]
    assert cmd[11] == "-c"
    script = cmd[12]
    assert script.startswith(f"exec {PY} -m torch.distributed.run ")
    # each node's shell expands its own node id; the rendezvous is on the job's first node
    assert "--nnodes 2 " in script and "--node-rank $SLURM_NODEID" in script
    assert "--rdzv-backend c10d --rdzv-endpoint gpu07:29500 --rdzv-id 4242" in script
    assert "--nproc-per-node 2" in script and "--standalone" not in script
    assert script.endswith("""-m soraflow.cli train index.parquet --out out.safetensors --run-dir run --params '{"a": 1}'""")
    # what each node's sh runs: the worker arguments arrive intact
    fake_node = {"SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    echoed = subprocess.run(["sh", "-c", script.replace("exec ", "exec printf '%s\\n' ", 1)], env=fake_node,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert echoed[echoed.index("--node-rank") + 1] == "1" and echoed[-len(WORKER) :] == WORKER


def test_multi_node_needs_slurm_and_the_jobs_node_count():
    with pytest.raises(RuntimeError, match="Slurm"):
        launch.launch_command(2, 2, WORKER, {}, hosts=["a", "b"])
    with pytest.raises(RuntimeError, match="--nodes 4 but Slurm job 4242 has 2 nodes"):
        launch.launch_command(2, 4, WORKER, SLURM, hosts=["gpu07", "gpu08"])
    with pytest.raises(ValueError):
        launch.launch_command(0, 1, WORKER, {})


# What `soraflow train` sees inside the Slurm executor plugin's job step (`srun -n1 --nodes=2` in a
# 2-node job, run on the two-node test cluster): SLURM_* describe the one-node step.
PLUGIN_STEP = {
    "SLURM_JOB_ID": "9", "SLURM_JOBID": "9", "SLURM_CLUSTER_NAME": "soraflowtest2", "SLURM_CONF": "/etc/slurm/slurm.conf",
    "SLURM_SUBMIT_DIR": "/tmp/sf2test", "SLURM_SUBMIT_HOST": "vm", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
    "SLURM_NODELIST": "node[1-2]", "SLURM_NTASKS": "1", "SLURM_NPROCS": "1", "SLURM_CPUS_PER_TASK": "2",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node1", "SLURM_STEP_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "1",
    "SLURM_STEP_GPUS": "0,1", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_ON_NODE": "2", "SRUN_DEBUG": "3",
    "CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/usr/bin", "GLOO_SOCKET_IFNAME": "ib0",
}  # fmt: skip


def test_the_workers_srun_gets_only_the_variables_that_name_the_job():
    """srun reads SLURM_NNODES, SLURM_NTASKS and SLURM_JOB_NODELIST as the shape of the step it
    starts: taken from the plugin's step they say one node ("Only allocated 1 nodes asked for 2")."""
    env = launch.job_environment(PLUGIN_STEP)
    assert {k for k in env if k.startswith(("SLURM_", "SRUN_"))} == {
        "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_CONF", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST"}
    # everything else passes through (srun exports it to the nodes: a cluster's GLOO_SOCKET_IFNAME too)
    assert {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "PATH", "GLOO_SOCKET_IFNAME")} == {
        "CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/usr/bin", "GLOO_SOCKET_IFNAME": "ib0"}


def test_cli_train_takes_nproc_and_nodes():
    args = cli.build_parser().parse_args(["train", "i.parquet", "--out", "o", "--run-dir", "r", "--params", "{}",
                                          "--nproc", "8", "--nodes", "2"])
    assert (args.nproc, args.nodes) == (8, 2)


def test_sigusr1_and_sigterm_reach_the_child_and_its_status_comes_back(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in launch.FORWARDED}
    ready = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(3))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )

    def signal_when_ready(sig):
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), sig)

    threading.Thread(target=signal_when_ready, args=(signal.SIGUSR1,), daemon=True).start()
    assert launch.run_forwarding_signals([sys.executable, "-c", child]) == 3
    ready.unlink()
    # SIGTERM is not handled by this child: it dies of it and the launcher says so (128 + 15)
    threading.Thread(target=signal_when_ready, args=(signal.SIGTERM,), daemon=True).start()
    assert launch.run_forwarding_signals([sys.executable, "-c", child]) == 128 + signal.SIGTERM
    # and our own handlers are back afterwards
    assert {sig: signal.getsignal(sig) for sig in launch.FORWARDED} == before


def test_the_jobs_end_time_comes_from_slurm():
    """SLURM_JOB_END_TIME (Slurm 23.02 on) as it is; squeue's %e is local time (the test cluster's
    Slurm 22.05 path, run by tests/test_slurm.py); no limit or no Slurm: no end time."""
    assert launch.job_end_time({"SLURM_JOB_ID": "9", "SLURM_JOB_END_TIME": "1767225600"}) == 1767225600
    assert launch.job_end_time({}) is None
    assert launch.slurm_time("2026-05-01T12:34:56") == time.mktime((2026, 5, 1, 12, 34, 56, 0, 0, -1))
    assert launch.slurm_time("N/A") is None and launch.slurm_time("NONE") is None
