"""The prepared GPU check (issue 22): training, sampling and captioning on the GPU, measured
against `soraflow plan`, written to one JSON file. benchmarks/gpu_check.sh runs it after `make`.

    .venv/bin/python benchmarks/gpu_check.py --out gpu_check.json [--engines ddp fsdp colossalai]
    .venv/bin/python benchmarks/gpu_check.py --cpu-dry --out dry.json   # tiny sizes on the CPU (CI)

On the GPU (at most 8 minutes on one 80 GB card):

    train    STDiT-XL/2 at 16x256x256 (latents 4x16x32x32) from random weights, the preset's
             bf16 and gradient checkpointing, 50 steps at batch 8, under each engine through the
             trainer itself (soraflow.training.loop.train), one process per engine (colossalai
             in .venv-colossalai): samples/s (median step after two warm-up steps), MFU by the
             planner's FLOP count (model FLOPs, no recompute) over the card's bf16 peak, and the
             peak of allocated memory against the plan's figure for the stage. All GPUs of the
             machine train (one process each); on one GPU every engine trains as one replica.
    sample   one video at 100 steps (classifier-free guidance, IDDPM) from a random-weight
             STDiT-XL/2 checkpoint through inference.sample, with the tiny T5 and VAE of the
             demo (soraflow.demo.models: the hub's T5-XXL and SD-VAE are not fetched): seconds,
             and TFLOP/s by the planner's forward FLOPs.
    caption  the demo's tiny LLaVA captioning a batch of 8 synthetic clips through
             scoring.caption.caption_shard: seconds per clip, and that it ran on the GPU.

--cpu-dry runs the same code at tiny sizes (STDiT-tiny, 2 frames of 32 px, 4 steps at batch 2, fp32,
2 sampling steps, 2 clips) on the CPU, in seconds; its figures say only that the path works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from soraflow.workflow import plan, settings

REPO = Path(__file__).resolve().parents[1]
COLOSSALAI_PYTHON = REPO / ".venv-colossalai" / "bin" / "python"
STAGE = "check"
CLIPS = 16  # in the synthetic latent cache
SIZES = {
    "gpu": {"preset": "STDiT-XL/2", "num_frames": 16, "resolution": 256, "steps": 50, "batch": 8,
            "sample_steps": 100, "caption_clips": 8, "text_tokens": 120, "data_workers": 2},
    # text_tokens: the preset's model_max_length
    "cpu-dry": {"preset": "STDiT-tiny", "num_frames": 2, "resolution": 32, "steps": 4, "batch": 2,
                "sample_steps": 2, "caption_clips": 2, "text_tokens": 32, "data_workers": 0},
}


def check_config(size: dict, models: dict[str, Path], engine: str, gpus: int) -> dict:
    """The workflow config of the check: the preset's training settings for one stage of `size`,
    the demo's tiny VAE, T5 and LLaVA."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    preset = yaml.safe_load((REPO / "presets" / "opensora-1.0.yaml").read_text())
    config["stdit"] = {"preset": size["preset"]}
    config["vae"] = {"kind": "autoencoder_kl", "model": str(models["tiny-vae"]), "scaling_factor": 0.18215,
                     "micro_batch": 64}
    config["text_encoder"] = {"model": str(models["tiny-t5"]), "max_length": size["text_tokens"]}
    config["caption"].update(model=str(models["tiny-llava"]), batch_size=size["caption_clips"])
    config["stages"] = {STAGE: {"init": None, "num_frames": size["num_frames"], "frame_interval": 1,
                                "resolution": size["resolution"], "steps": size["steps"],
                                "batch_size": size["batch"], "lr": 2e-5, "filters": {}}}
    # auto: bf16 on the GPU as the preset's, fp32 on the CPU
    config["train"] = {**preset["train"], "mixed_precision": "auto", "engine": engine, "nproc_per_node": gpus, "log_every": 1,
                       "checkpoint_every": 10 * size["steps"], "data_workers": size["data_workers"]}
    config["plan"] = {**config.get("plan", {}), "gpu": plan_gpu() or preset["plan"]["gpu"]}
    return settings.with_defaults(config)


def plan_gpu() -> str | None:
    """The plan's name for this machine's GPU (closest memory within its family), None without one."""
    if not torch.cuda.is_available():
        return None
    name, memory = torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory
    family = [key for key in plan.GPUS if key.split("-")[0] in name]
    return min(family, key=lambda key: abs(plan.GPUS[key][0] - memory), default=None)


def latent_index(root: Path, config: dict) -> Path:
    """A cache of CLIPS random clips at the stage's latent size with tiny-T5-wide captions."""
    from soraflow.data import cache, table

    root.mkdir(parents=True)
    d, (channels, frames, height, width) = plan.stage_dims(config, config["stages"][STAGE])
    g = torch.Generator().manual_seed(0)
    ids = [f"clip{i}" for i in range(CLIPS)]
    cache.write_cache({"latents": torch.randn(CLIPS, channels, frames, height, width, generator=g)}, ids, {},
                      root / "latents.safetensors")
    tokens = config["text_encoder"]["max_length"]
    mask = torch.ones(CLIPS, tokens, dtype=torch.long)
    features = torch.randn(CLIPS, tokens, plan.text_width(config), generator=g)
    cache.write_cache(cache.text_tensors(features, mask), ids, {}, root / "text.safetensors")
    table.write(pd.DataFrame({
        "id": ids, "latent_path": str(root / "latents.safetensors"), "latent_index": range(CLIPS),
        "text_emb_path": str(root / "text.safetensors"), "text_emb_index": range(CLIPS),
    }), root / "index.parquet")
    return root / "index.parquet"


def peak_memory() -> dict:
    """The GPU's peak of allocated and reserved bytes, or the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    return {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def train_part(config: dict, index: Path, root: Path) -> dict:
    """One engine's training run in this process (rank 0 of torchrun's, or alone)."""
    from soraflow.training.loop import train

    params, operational = settings.params(config, "train", STAGE), settings.operational(config, "train", STAGE)
    started = time.perf_counter()
    train(index, root / "out.safetensors", root / "run", settings.merged(params, operational), params)
    wall = time.perf_counter() - started
    seconds = pd.read_csv(root / "run" / "loss.csv")["seconds"].diff().dropna().tolist()
    seconds = seconds[min(2, len(seconds) - 1):]  # after the warm-up steps
    step_s = statistics.median(seconds)
    stage_plan = plan.stage_plan(config, STAGE)
    d, _ = plan.stage_dims(config, config["stages"][STAGE])
    batch = config["stages"][STAGE]["batch_size"]
    model_flops = batch * plan.training_flops(d, checkpointing=False)
    _, peak_flops = plan.GPUS[config["plan"]["gpu"]]
    gpus = stage_plan.gpus
    return {
        "engine": config["train"]["engine"] if gpus > 1 else f"{config['train']['engine']} (one process: single)",
        "gpus": gpus, "steps": config["stages"][STAGE]["steps"], "batch": batch, "wall_s": wall,
        "step_s_median": step_s, "samples_per_s": batch / step_s,
        "mfu": model_flops / step_s / (peak_flops * gpus), "model_tflop_per_step": model_flops / 1e12,
        "peak_memory_bytes": peak_memory(), "plan_memory_bytes": {**stage_plan.memory, "total": stage_plan.total},
        "plan_gpu": config["plan"]["gpu"],
    }


def run_engine(engine: str, config: dict, index: Path, root: Path, dry: bool, timeout: float) -> dict:
    """train_part in a process of the engine's environment (a fresh CUDA context per engine)."""
    python = COLOSSALAI_PYTHON if engine == "colossalai" else Path(sys.executable)
    if not python.exists():
        return {"skipped": f"no {python}: its environment did not build (make .venv-colossalai/.installed)"}
    env = {**os.environ}
    if engine == "colossalai" and dry:  # ColossalAI's ZeRO stops at its GPU checks: the tests' CPU stand-ins
        env["PYTHONPATH"] = str(REPO / "tests" / "colossalai_cpu")
    gpus = config["train"]["nproc_per_node"]
    launcher = [str(python)] if gpus == 1 else [str(python), "-m", "torch.distributed.run", f"--nproc-per-node={gpus}"]
    command = [*launcher, __file__, "--train-part", json.dumps(config), str(index), str(root)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"did not finish in {timeout:.0f} s"}
    result = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not result:
        return {"failed": f"exit {done.returncode}", "log_tail": (done.stdout + done.stderr)[-3000:]}
    return json.loads(result[-1])


def sample_part(config: dict, root: Path, size: dict) -> dict:
    """One video from a random-weight STDiT checkpoint through inference.sample."""
    from soraflow.inference.sample import sample_prompts
    from soraflow.models.checkpoint import save_checkpoint_file, saved
    from soraflow.models.stdit import build_model

    d, latent = plan.stage_dims(config, config["stages"][STAGE])
    model_config = {**config["stdit"], "in_channels": latent[0], "caption_channels": plan.text_width(config)}
    input_size = latent[1:]
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds
        model = build_model(model_config, input_size=input_size)
    ema = {k: v.cpu() for k, v in model.state_dict().items() if saved(k)}
    del model
    checkpoint = root / "final.safetensors"
    save_checkpoint_file(checkpoint, {"ema": ema}, {"model_config": model_config, "input_size": list(input_size)})
    del ema
    params = {"text_encoder": config["text_encoder"], "vae": config["vae"],
              "diffusion": {"cfg_scale": 7.0, "sample_steps": size["sample_steps"], "num_timesteps": 1000},
              "sample": {"seed": 0, "fps": 8, "use_ema": True}}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    sample_prompts(checkpoint, ["a red car drives along a coast road at sunset"], [root / "sample.mp4"], params)
    seconds = time.perf_counter() - started
    flops = 2 * size["sample_steps"] * plan.forward_flops(d)  # two forwards a step: the caption and the null one
    return {"steps": size["sample_steps"], "seconds": seconds, "seconds_per_step": seconds / size["sample_steps"],
            "tflop_per_s": flops / seconds / 1e12, "video_bytes": (root / "sample.mp4").stat().st_size,
            "peak_memory_bytes": peak_memory()}


def caption_part(config: dict, root: Path) -> dict:
    """A batch of synthetic clips captioned by the tiny LLaVA through caption_shard."""
    from soraflow.core.devices import job_devices
    from soraflow.data import table, video
    from soraflow.scoring.caption import caption_shard

    root.mkdir(parents=True)
    clips = config["caption"]["batch_size"]
    rows = []
    for i in range(clips):
        g = torch.Generator().manual_seed(i)
        frames = torch.randint(0, 256, (12, 64, 96, 3), generator=g, dtype=torch.uint8)
        path = root / f"clip{i}.mp4"
        video.write_video(path, frames, fps=8)
        rows.append({"id": f"clip{i}", "path": str(path), "num_frames": 12, "text_manifest": None})
    table.write(pd.DataFrame(rows), root / "clips.parquet")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = caption_shard(root / "clips.parquet", root / "captioned.parquet", root / "rejects.parquet",
                            {**config["caption"], "existing_text": "replace"})
    captioned = table.read(root / "captioned.parquet")
    return {"clips": clips, "captioned": len(captioned), "seconds_per_clip": summary["seconds_per_clip"],
            "devices": [str(d) for d in job_devices()], "peak_memory_bytes": peak_memory(),
            "example": captioned["text"].iloc[0] if len(captioned) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    parser.add_argument("--cpu-dry", action="store_true", help="the same code path at tiny sizes on the CPU")
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp", "colossalai"])
    parser.add_argument("--train-part", nargs=3, metavar=("CONFIG", "INDEX", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_part:  # one engine's run, in its own process
        config, index, root = json.loads(args.train_part[0]), Path(args.train_part[1]), Path(args.train_part[2])
        result = train_part(config, index, root)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(result), flush=True)
        return
    if not args.cpu_dry and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run on a GPU machine, or with --cpu-dry")
    size = SIZES["cpu-dry" if args.cpu_dry else "gpu"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    started = time.perf_counter()
    report = {"mode": "cpu-dry" if args.cpu_dry else "gpu", "sizes": size, "torch": torch.__version__,
              "python": platform.python_version(), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else platform.processor() or "cpu", "gpus": gpus if torch.cuda.is_available() else 0,
              "plan_gpu": plan_gpu()}
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        from soraflow.demo.models import build_all

        root = Path(tmp)
        models = build_all(root / "models")
        index = latent_index(root / "cache", check_config(size, models, "ddp", gpus))
        report["train"] = {}
        for engine in args.engines:
            config = check_config(size, models, engine, gpus)
            report["train"][engine] = run_engine(engine, config, index, root / f"train-{engine}", args.cpu_dry,
                                                 timeout=150)
            print(f"train {engine}: {json.dumps(report['train'][engine])[:400]}", flush=True)
        config = check_config(size, models, "ddp", gpus)
        report["sample"] = sample_part(config, root, size)
        print(f"sample: {json.dumps(report['sample'])}", flush=True)
        report["caption"] = caption_part(config, root / "caption")
        print(f"caption: {json.dumps(report['caption'])}", flush=True)
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.out}: {report['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
