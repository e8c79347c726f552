"""Start `soraflow train` on several processes: torchrun on one node, srun + torchrun on many.

`soraflow train --nproc N --nodes M` (the train rules pass their `processes_per_node` and
`nodes` resources) re-executes itself under torchrun when it is not already a torchrun worker
(no RANK in the environment) and N*M > 1:

    one node:    torchrun --standalone --nproc-per-node N -m soraflow.cli train ...
    Slurm, M>1:  srun --overlap --whole --nodes M --ntasks M --ntasks-per-node 1 sh -c
                     'exec torchrun --nnodes M --node-rank $SLURM_NODEID --rdzv-backend c10d
                      --rdzv-endpoint <first node of the job>:29500 --nproc-per-node N ...'

The launcher may itself run inside a job step: the Slurm executor plugin runs each job's
command under `srun -n1` (one task on the first node). That step's SLURM_* variables describe
the step, not the job (SLURM_NNODES=1, even SLURM_JOB_NODELIST names one node), and srun would
take them as the shape of the step it starts ("Only allocated 1 nodes asked for 2"). So the
job's nodes come from the controller (`squeue -j $SLURM_JOB_ID`), srun runs with only the
variables that name the job, and `--overlap --whole` let its step share the launcher's step's
CPUs and GPUs and give each node's torchrun all of the job's CPUs and GPUs on that node.
`$SLURM_NODEID` is left for each node's shell to expand, so every node gets its own rank.
`launch_command` builds the command from an environment and a host list and does nothing
else, so it is tested with a fake Slurm environment.

The trainer stops ahead of the job's time limit on its own (soraflow.training.loop): `job_end_time`
asks Slurm when the job ends.

Preemption: SIGTERM and SIGUSR1 reaching the launcher are forwarded to its child;
torchrun is told to forward both to the workers (`--signals-to-handle`) and to give
them time to write their checkpoint (`--shutdown-timeout`). The workers checkpoint and
exit non-zero, and so does the launcher, so Slurm can requeue the job. An older torchrun
without those options (torch 2.5.1, the colossalai environment's) forwards only SIGTERM,
and gives the workers its fixed 30 s: SIGUSR1 reaches it as SIGTERM.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from datetime import datetime

RDZV_PORT = 29500
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
# torchrun's default list plus SIGUSR1 (Slurm's usual warning signal before a preemption)
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SHUTDOWN_TIMEOUT_S = 300
# The Slurm variables that name the job (the ones the executor plugin keeps for its own srun);
# every other SLURM_* describes the step the launcher runs in.
JOB_VARIABLES = {"SLURM_JOB_ID", "SLURM_JOBID", "SLURM_CLUSTER_NAME", "SLURM_CONF", "SLURM_SUBMIT_DIR", "SLURM_SUBMIT_HOST",
                 "SLURM_JOB_END_TIME"}


def needs_launch(nproc: int, nodes: int, env) -> bool:
    """True when this process should start the workers rather than be one."""
    return "RANK" not in env and nproc * nodes > 1


def torchrun_handles_signals() -> bool:
    """Whether this torch's torchrun takes --signals-to-handle and --shutdown-timeout."""
    from torch.distributed.run import get_args_parser

    return "--signals-to-handle" in {option for action in get_args_parser()._actions for option in action.option_strings}


def torchrun_prefix(python: str = sys.executable) -> list[str]:
    """torchrun of this interpreter (`python -m torch.distributed.run` is the same program)."""
    return [python, "-m", "torch.distributed.run"]


def launch_command(
    nproc: int,
    nodes: int,
    worker_argv: list[str],
    env,
    hosts: list[str] | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command that runs `python -m soraflow.cli <worker_argv>` on nproc x nodes processes.

    `hosts` are the Slurm job's node names in order (job_hosts); needed only for nodes > 1.
    """
    if nproc < 1 or nodes < 1:
        raise ValueError(f"--nproc and --nodes must be at least 1 (got {nproc}, {nodes})")
    signals = ["--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]
    common = ["--nproc-per-node", str(nproc), *(signals if torchrun_handles_signals() else []), "--max-restarts", "0"]
    worker = ["-m", "soraflow.cli", *worker_argv]
    if nodes == 1:
        return [*torchrun_prefix(python), "--standalone", *common, *worker]
    if "SLURM_JOB_ID" not in env:
        raise RuntimeError(
            f"--nodes {nodes}: multi-node training runs inside a Slurm allocation (no SLURM_JOB_ID here); "
            "outside Slurm, start torchrun on each node yourself"
        )
    if not hosts or len(hosts) != nodes:
        raise RuntimeError(f"--nodes {nodes} but Slurm job {env['SLURM_JOB_ID']} has {len(hosts or [])} nodes "
                           f"({' '.join(hosts or []) or 'none'}): the rule's nodes resource and the job differ")
    per_node = [
        *torchrun_prefix(python),
        "--nnodes", str(nodes),
        "--node-rank", "$SLURM_NODEID",
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{hosts[0]}:{RDZV_PORT}",
        "--rdzv-id", env["SLURM_JOB_ID"],
        *common,
        *worker,
    ]
    # quote everything but the node id, which each node's shell must expand
    script = " ".join(a if a == "$SLURM_NODEID" else shlex.quote(a) for a in per_node)
    return ["srun", "--overlap", "--whole", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
            "--kill-on-bad-exit=1", "sh", "-c", f"exec {script}"]


def job_environment(env) -> dict:
    """env without the variables of the job step it was taken in (see the module's docstring)."""
    return {k: v for k, v in env.items() if not (k.startswith("SLURM_") and k not in JOB_VARIABLES or k.startswith("SRUN_"))}


def job_hosts(job_id: str) -> list[str]:
    """The Slurm job's node names in order, from the controller (the environment of a job step
    names only the step's nodes)."""
    nodelist = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%N"],
                              capture_output=True, text=True, check=True).stdout.strip()
    return slurm_hosts(nodelist) if nodelist else []


def job_end_time(env) -> float | None:
    """When Slurm ends this job at its time limit (seconds since the epoch), or None outside
    Slurm or without a limit: SLURM_JOB_END_TIME where the Slurm version exports it (23.02 on),
    else the controller's end time of the job (`squeue -j $SLURM_JOB_ID -o %e`)."""
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    if "SLURM_JOB_ID" not in env:
        return None
    cmd = ["squeue", "--noheader", "--jobs", env["SLURM_JOB_ID"], "--format", "%e"]
    try:
        end = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"the job's end time is unknown ({shlex.join(cmd)}: {err}): stopping on signals only", flush=True)
        return None
    return slurm_time(end)


def slurm_time(text: str) -> float | None:
    """A Slurm timestamp (2026-05-01T12:34:56, local time) in seconds since the epoch; None for
    the words Slurm prints where there is none (N/A, NONE, Unknown)."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def slurm_hosts(nodelist: str) -> list[str]:
    """`scontrol show hostnames` of a compressed Slurm node list (node[01-04] -> node01 ...)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def run_forwarding_signals(cmd: list[str], env=None, renamed: dict | None = None) -> int:
    """Run cmd; SIGTERM/SIGUSR1 sent to us go to it (as `renamed` says, else as they are).
    Its exit status (128+N when killed by N)."""
    child = subprocess.Popen(cmd, env=env)
    renamed = renamed or {}

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(renamed.get(signum, signum))

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def launch(nproc: int, nodes: int, worker_argv: list[str], env) -> int:
    """Start the workers and wait for them; the exit status to leave with."""
    hosts = job_hosts(env["SLURM_JOB_ID"]) if nodes > 1 and "SLURM_JOB_ID" in env else None
    cmd = launch_command(nproc, nodes, worker_argv, env, hosts)
    print("launching:", shlex.join(cmd), flush=True)
    renamed = {} if torchrun_handles_signals() else {signal.SIGUSR1: signal.SIGTERM}
    return run_forwarding_signals(cmd, env=job_environment(env) if nodes > 1 else dict(env), renamed=renamed)
