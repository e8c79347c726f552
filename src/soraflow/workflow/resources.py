"""What each job asks the cluster for, from the workflow config alone.

The config says per training stage how many nodes, GPUs and processes it runs on, and per
step what a job needs; the Slurm profile adds only what belongs to the cluster (partitions,
account, QoS). Memory and time left unset follow from the model and the work: a training
stage's time from its steps at the plan's MFU (soraflow.workflow.plan), its host memory from
the model's size; a caption or encode job's from its model's size and the shard's clips at
the plan's throughput. A stage that needs longer than the cluster's job time limit
(cluster.max_runtime) runs as a chain of jobs at that limit, each checkpointing at the limit's
SIGTERM and resuming where the last stopped: its retries count the chain's links.
"""

from __future__ import annotations

import math

from soraflow.workflow import plan
from soraflow.workflow.settings import processes_per_node

GIB_MB = 1024
PROCESS_OVERHEAD_MB = 8 * GIB_MB  # per training process: CUDA context, data workers, pinned buffers
TIME_MARGIN = 1.25  # planned time is an estimate: jobs ask for a quarter more, plus startup
STARTUP_MINUTES = 10
FAILURE_RETRIES = 2  # resubmissions for real failures (node loss, preemption), beyond a chain's links
DEFAULT_MEM_MB, DEFAULT_RUNTIME = 2000, 60  # jobs without a model to size them by
GPU_STEPS = {"caption", "encode_video", "encode_text", "sample"}  # a GPU each unless the config says otherwise


def _minutes(hours: float) -> int:
    return math.ceil(hours * 60 * TIME_MARGIN) + STARTUP_MINUTES


def train_job(config: dict, stage: str) -> dict:
    """The stage's Slurm resources (one task per node: srun starts torchrun on each, which starts
    its processes), the processes per node, and how many times the job may be resubmitted."""
    resources = config["stages"][stage]["resources"]
    nodes, gpus = resources["nodes"], resources["gpus_per_node"]
    processes = processes_per_node(config, stage)
    runtime, mem_mb = resources["runtime"], resources["mem_mb"]
    if runtime is None:
        runtime = _minutes(plan.stage_plan(config, stage).gpu_hours / (nodes * processes))
    if mem_mb is None:
        parameters, _, _ = plan.parameter_counts(plan.stage_dims(config, config["stages"][stage])[0])
        # fp32 weights built on the CPU, and a checkpoint of the same size read beside them
        mem_mb = processes * (math.ceil(8 * parameters / 2**20) + PROCESS_OVERHEAD_MB)
    limit = config["cluster"]["max_runtime"]
    links = math.ceil(runtime / limit) if limit else 1
    job = {
        "nodes": nodes,
        "cpus_per_task": max(1, gpus) * resources["cpus_per_gpu"],
        "mem_mb": mem_mb,
        "runtime": min(runtime, limit) if limit else runtime,
        "processes_per_node": processes,
        "retries": links - 1 + FAILURE_RETRIES,
    }
    if gpus:
        job["gres"] = f"gpu:{gpus}"  # per node (--gpus would count the whole job)
    return job


def step_job(config: dict, step: str) -> dict:
    """A per-shard (or per stage and shard) job's Slurm resources."""
    resources = config["resources"][step]
    mem_mb, runtime = resources["mem_mb"], resources["runtime"]
    gpus = resources["gpus"] if resources["gpus"] is not None else int(step in GPU_STEPS)
    # encode_video runs at every stage's size: the slowest one sizes the rule
    sized = min((p for p in plan.model_plans(config) if p.step.split()[0] == step),
                key=lambda p: p.clips_per_gpu_hour, default=None)
    if mem_mb is None:
        # inference weights (bf16) are read into host memory before they move to the GPU
        parameters = sized.parameters if sized else None
        mem_mb = math.ceil(1.2 * 2 * parameters / 2**20) + PROCESS_OVERHEAD_MB if parameters else DEFAULT_MEM_MB
    if runtime is None:
        clips = config["data"]["shard_size"] * config["plan"]["clips_per_video"]
        runtime = _minutes(clips / (sized.clips_per_gpu_hour * max(1, gpus))) if sized else DEFAULT_RUNTIME
    job = {"mem_mb": mem_mb, "runtime": runtime}
    if resources["cpus"]:  # else the rule's threads
        job["cpus_per_task"] = resources["cpus"]
    if gpus:
        job["gpu"] = gpus
    return job
