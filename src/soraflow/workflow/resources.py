"""What each job asks the cluster for, from the workflow config alone.

The config says per training stage how many nodes, GPUs and processes it runs on, and per
step what a job needs; the Slurm profile adds only what belongs to the cluster (partitions,
account, QoS). Memory and time left unset follow from the model and the work: a training
stage's time from its steps at the plan's MFU (soraflow.workflow.plan), its host memory from
the model's size. A shard job's time is its shard's items times a per-item cost (`plan`: costs
measured on the development machine, benchmarks/README.md, scaled by plan.cpu_speed for the
cluster's cores; the GPU steps' at the plan's throughput), its memory its model's size plus
what its rows take. A job that needs longer than the cluster's job time limit
(cluster.max_runtime) runs as a chain of jobs at that limit, each resuming where the last
stopped (a training stage from the checkpoint it writes on its own ahead of the limit,
soraflow.training.loop; a shard job from the parts it keeps, soraflow.core.resume): its retries
count the chain's links.
"""

from __future__ import annotations

import math

from soraflow.workflow import plan
from soraflow.workflow.settings import processes_per_node

GIB_MB = 1024
PROCESS_OVERHEAD_MB = 8 * GIB_MB  # per training process: CUDA context, data workers, pinned buffers
TIME_MARGIN = 1.25  # planned time is an estimate: jobs ask for a quarter more, plus startup
STARTUP_MINUTES = 10
# resubmissions for real failures (node loss, preemption), beyond a chain's links (a training
# failure that a retry would repeat ends its retries at once: soraflow.training.failure)
FAILURE_RETRIES = 2
DEFAULT_MEM_MB = 2000  # jobs without a model to size them by: the process, its libraries, decoders
ROW_KIB = 7  # a shard job's memory per row: tables, progress parts read back (bench_shard_costs.py: 6.7)
SPLIT_WORKER_MB = 800  # a split worker's cut ffmpeg (16 x264 encoders at 512 px: 731 MiB) and its decoder
GPU_STEPS = {"caption", "encode_video", "encode_text", "sample"}  # a GPU each unless the config says otherwise


def _minutes(hours: float) -> int:
    return math.ceil(hours * 60 * TIME_MARGIN) + STARTUP_MINUTES


def _chain(runtime: int, limit: int | None) -> tuple[int, int]:
    """(minutes per job, retries): a job longer than the cluster's limit runs as a chain of jobs at
    the limit, each resuming the last, with FAILURE_RETRIES on top of its links."""
    links = math.ceil(runtime / limit) if limit else 1
    return (min(runtime, limit) if limit else runtime), links - 1 + FAILURE_RETRIES


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
        # fp32 weights built on the CPU, and the initial weights of the same size read beside them
        # (a resume reads its checkpoint into the device's tensors instead: benchmarks/README.md)
        mem_mb = processes * (math.ceil(8 * parameters / 2**20) + PROCESS_OVERHEAD_MB)
    runtime, retries = _chain(runtime, config["cluster"]["max_runtime"])
    job = {
        "nodes": nodes,
        "cpus_per_task": max(1, gpus) * resources["cpus_per_gpu"],
        "mem_mb": mem_mb,
        "runtime": runtime,
        "processes_per_node": processes,
        "retries": retries,
    }
    if gpus:
        job["gres"] = f"gpu:{gpus}"  # per node (--gpus would count the whole job)
    return job


def _gpus(config: dict, step: str) -> int:
    gpus = config["resources"][step]["gpus"]
    return gpus if gpus is not None else int(step in GPU_STEPS)


def sample_seconds(config: dict, stage: str) -> float:
    """A sample video's seconds on the plan's GPU at its MFU: every sampling step runs the STDiT
    on the prompt and, for guidance, on the null caption (the text encoder and the VAE's decoding
    are left out: a few per cent of it at Open-Sora 1.0's sizes)."""
    _, peak = plan.GPUS[config["plan"]["gpu"]]
    flops = 2 * config["diffusion"]["sample_steps"] * plan.stage_plan(config, stage).forward_flops
    return flops / (peak * config["plan"]["mfu"])


def shard_work(config: dict, step: str, stage: str | None = None) -> tuple[float, str, float, float]:
    """(items per job, what an item is, seconds per item, job hours) of a shard job (per stage for
    sample, whose items are its videos; encode_video at its slowest stage without one)."""
    plan_, videos = config["plan"], config["data"]["shard_size"]
    clips = videos * plan_["clips_per_video"]
    if step == "ingest":
        return videos, "video", plan_["ingest_s_per_video"], videos * plan_["ingest_s_per_video"] / 3600
    if step == "split":  # its workers split split.threads videos at once
        per_video = plan_["video_seconds"] * plan_["split_s_per_video_s"] / plan_["cpu_speed"]
        return videos, "video", per_video, videos * per_video / config["split"]["threads"] / 3600
    if step == "score":
        aesthetic = plan_["aesthetic_s_per_clip"] if config["score"]["aesthetic_model"] else 0.0
        text_area = plan_["text_area_s_per_frame"] * config["score"]["text_area"]["frames"]
        per_clip = (plan_["score_s_per_clip"] + text_area + aesthetic) / plan_["cpu_speed"]
        return clips, "clip", per_clip, clips * per_clip / 3600
    if step == "match":
        # without a model the job only writes the clip ids
        per_clip = (plan_["match_s_per_clip"] if config["score"]["match"]["model"] else 0.01) / plan_["cpu_speed"]
        return clips, "clip", per_clip, clips * per_clip / 3600
    gpus = max(1, _gpus(config, step))
    if step == "sample":
        stages = [stage] if stage else list(config["stages"])
        per_video = max(sample_seconds(config, name) for name in stages)
        videos = len(config["sample"]["prompts"]) + config["sample"]["training_captions"]
        return videos, "video", per_video, videos * per_video / gpus / 3600
    # caption, encode_video (every stage's size: the slowest one sizes the rule), encode_text
    sized = min((p for p in plan.model_plans(config) if p.step.split()[0] == step), key=lambda p: p.clips_per_gpu_hour)
    return clips, "clip", 3600 / sized.clips_per_gpu_hour, clips / (sized.clips_per_gpu_hour * gpus)


def step_job(config: dict, step: str, stage: str | None = None) -> dict:
    """A per-shard (or per stage) job's Slurm resources and retries: time from shard_work,
    memory from its model's size and its rows."""
    resources = config["resources"][step]
    mem_mb, runtime, gpus = resources["mem_mb"], resources["runtime"], _gpus(config, step)
    items, _, _, hours = shard_work(config, step, stage)
    if mem_mb is None:
        sized = [p.parameters for p in plan.model_plans(config) if p.step.split()[0] == step and p.parameters]
        # inference weights (bf16) are read into host memory before they move to the GPU
        model_mb = math.ceil(1.2 * 2 * max(sized) / 2**20) + PROCESS_OVERHEAD_MB if sized else DEFAULT_MEM_MB
        rows = config["data"]["shard_size"] * (1 if step == "ingest" else config["plan"]["clips_per_video"])
        workers = config["split"]["threads"] * SPLIT_WORKER_MB if step == "split" else 0
        mem_mb = model_mb + workers + (math.ceil(rows * ROW_KIB / 1024) if step != "sample" else 0)
    runtime, retries = _chain(runtime if runtime is not None else _minutes(hours), config["cluster"]["max_runtime"])
    job = {"mem_mb": mem_mb, "runtime": runtime, "retries": retries}
    if resources["cpus"]:  # else the rule's threads
        job["cpus_per_task"] = resources["cpus"]
    if gpus:
        job["gpu"] = gpus
    return job


def jobs_table(config: dict) -> str:
    """Each shard job's (and sample's) planned runtime, chain and memory, from its items and their cost."""
    limit = config["cluster"]["max_runtime"]
    steps = [(step, None) for step in ("ingest", "split", "score", "caption", "match", "encode_video", "encode_text")]
    rows = []
    for step, stage in steps + [("sample", stage) for stage in config["stages"]]:
        items, unit, per_item, hours = shard_work(config, step, stage)
        job = step_job(config, step, stage)
        given = config["resources"][step]["runtime"] is not None
        links = job["retries"] - FAILURE_RETRIES + 1
        rows.append([f"{step} {stage}" if stage else step, f"{plan.count(items)} {unit}s", f"{per_item:.3g} s",
                     plan.count(hours) if not given else "(set)", f"{job['runtime']:,}", links, f"{job['mem_mb']:,}"])
    return "\n".join([
        f"jobs of a {config['data']['shard_size']:,}-video shard ({config['plan']['clips_per_video']:g} clips and "
        f"{config['plan']['video_seconds']:g} s per video: plan.clips_per_video, plan.video_seconds), cluster.max_runtime "
        f"{'none' if limit is None else f'{limit:,} min'}: a job of several links is a chain, each resuming the last",
        "",
        *plan.markdown(["job", "items per job", "per item", "hours", "runtime/job (min)", "links", "memory (MB)"], rows),
    ])


def check(config: dict) -> str:
    """`soraflow plan`'s report: the plan (plan.check, which raises naming what does not fit the
    GPU) and every job's planned runtime and memory."""
    return plan.check(config) + "\n\n" + jobs_table(config)
