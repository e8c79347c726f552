"""The real Open-Sora 1.0 preset: Open-Sora's own values, its whole DAG, and what Slurm receives.

The expected values come from Open-Sora v1.0.0's files (hpcaitech/Open-Sora, tag v1.0.0), each
row citing the file and field it comes from. What Slurm receives is read from the executor
plugin's own code: each GPU job's resources as Snakemake plans them under preset + profile,
its partition as the plugin picks it from the profile's partitions, and the sbatch command
the plugin builds for it.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_workflow import job_counts, vae_settings

from soraflow.workflow.settings import stages_as_listed, with_defaults

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "opensora-1.0.yaml"
PROFILE = REPO / "profiles" / "slurm"
STAGES = ["video_256", "hq_256", "hq_512"]
OPEN_SORA_GPUS = 64  # README v1.0.0, "Training": 8 nodes x 8 H800 (the 117 GPU-days of stage 1 ran on 64)

# (config path, Open-Sora 1.0's value, where it comes from). Per-GPU batch sizes are checked
# as the global batch over Open-Sora's 64 GPUs, since a soraflow stage's batch_size is global.
OPEN_SORA_1_0 = [
    ("stdit.preset", "STDiT-XL/2", "configs/opensora/train/16x256x256.py: model.type"),
    ("stdit.time_scale", 1.0, "configs/opensora/train/16x256x256.py: model.time_scale"),
    ("stages.video_256.init", "pretrained_models/PixArt-XL-2-512x512.pth",
     "configs/opensora/train/16x256x256.py: model.from_pretrained (PixArt-XL-2-512x512.pth)"),
    ("stages.video_256.num_frames", 16, "configs/opensora/train/16x256x256.py: num_frames"),
    ("stages.video_256.frame_interval", 3, "configs/opensora/train/16x256x256.py: frame_interval"),
    ("stages.video_256.resolution", 256, "configs/opensora/train/16x256x256.py: image_size (256, 256)"),
    ("stages.video_256.space_scale", 0.5, "configs/opensora/train/16x256x256.py: model.space_scale"),
    ("stages.video_256.grad_checkpointing", True, "configs/opensora/train/16x256x256.py: grad_checkpoint"),
    ("stages.video_256.batch_size", 8 * OPEN_SORA_GPUS, "configs/opensora/train/16x256x256.py: batch_size 8 per GPU"),
    ("stages.video_256.lr", 2e-5, "configs/opensora/train/16x256x256.py: lr"),
    ("stages.video_256.steps", 80_000, "README.md v1.0.0: stage 1, 80k iterations on HD-VG-130M (366K clips)"),
    ("stages.hq_256.steps", 24_000, "README.md v1.0.0: stage 2, 24k iterations at 16x256x256 on the HQ subset"),
    ("stages.hq_256.init", "video_256", "README.md v1.0.0: stage 2 continues stage 1"),
    ("stages.hq_512.steps", 20_000, "README.md v1.0.0: stage 3, 20k iterations at 16x512x512 on the HQ subset"),
    ("stages.hq_512.init", "hq_256", "README.md v1.0.0: stage 3 continues stage 2"),
    ("stages.hq_512.num_frames", 16, "configs/opensora/train/16x512x512.py: num_frames"),
    ("stages.hq_512.frame_interval", 3, "configs/opensora/train/16x512x512.py: frame_interval"),
    ("stages.hq_512.resolution", 512, "configs/opensora/train/16x512x512.py: image_size (512, 512)"),
    ("stages.hq_512.space_scale", 1.0, "configs/opensora/train/16x512x512.py: model.space_scale"),
    ("stages.hq_512.batch_size", 8 * OPEN_SORA_GPUS, "configs/opensora/train/16x512x512.py: batch_size 8 per GPU"),
    ("stages.hq_512.lr", 2e-5, "configs/opensora/train/16x512x512.py: lr"),
    ("train.seed", 42, "configs/opensora/train/16x256x256.py: seed"),
    ("train.grad_clip", 1.0, "configs/opensora/train/16x256x256.py: grad_clip"),
    ("train.mixed_precision", "bf16", "configs/opensora/train/16x256x256.py: dtype"),
    ("train.ema_decay", 0.9999, "opensora/utils/train_utils.py: update_ema(decay=0.9999)"),
    ("train.weight_decay", 0.0, "scripts/train.py: HybridAdam(weight_decay=0)"),
    ("train.log_every", 10, "configs/opensora/train/16x256x256.py: log_every"),
    ("train.checkpoint_every", 1000, "configs/opensora/train/16x256x256.py: ckpt_every"),
    ("train.engine", "colossalai", "configs/opensora/train/16x256x256.py: plugin = 'zero2' (scripts/train.py: LowLevelZeroPlugin)"),
    ("train.colossalai.zero_stage", 2, "scripts/train.py: LowLevelZeroPlugin(stage=2, precision=dtype)"),
    ("vae.model", "stabilityai/sd-vae-ft-ema", "configs/opensora/train/16x256x256.py: vae.from_pretrained"),
    ("vae.scaling_factor", 0.18215, "opensora/models/vae/vae.py: VideoAutoencoderKL scales by 0.18215"),
    ("vae.micro_batch", 128, "configs/opensora/train/16x512x512.py: vae.micro_batch_size"),
    ("text_encoder.model", "DeepFloyd/t5-v1_1-xxl", "configs/opensora/train/16x512x512.py: text_encoder.from_pretrained"),
    ("text_encoder.max_length", 120, "configs/opensora/train/16x256x256.py: text_encoder.model_max_length"),
    ("diffusion.num_timesteps", 1000, "opensora/schedulers/iddpm/__init__.py: get_named_beta_schedule(noise_schedule, 1000)"),
    ("diffusion.sample_steps", 100, "configs/opensora/inference/16x256x256.py: scheduler.num_sampling_steps"),
    ("diffusion.cfg_scale", 7.0, "configs/opensora/inference/16x256x256.py: scheduler.cfg_scale"),
    ("sample.fps", 8, "configs/opensora/inference/16x256x256.py: fps"),
    ("caption.positions", [0.2, 0.5, 0.8], "tools/caption/caption_llava.py: frames at 20/50/80 % of the clip"),
    # the detector is TransNetV2 (issue 24); the scene length and pieces are 1.0's
    ("split.min_scene_frames", 15, "tools/scenedetect/scene_detect.py: ContentDetector() default min_scene_len"),
    ("split.max_seconds", 5.0, "tools/scenedetect/scene_detect.py: scenes truncated to 5 s"),
]


def preset_config() -> dict:
    """The preset over the default config, as the workflow reads `--configfile presets/opensora-1.0.yaml`."""

    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for key, value in top.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return out

    config = merge(yaml.safe_load((REPO / "workflow_config.yaml").read_text()), yaml.safe_load(PRESET.read_text()))
    stages_as_listed(config, [PRESET])
    return with_defaults(config)


def value_at(config: dict, path: str):
    for part in path.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("path, expected, source", OPEN_SORA_1_0, ids=[row[0] for row in OPEN_SORA_1_0])
def test_preset_holds_open_sora_1_0s_value(path, expected, source):
    assert value_at(preset_config(), path) == expected, source


def test_preset_stages_run_in_the_recipes_order_on_its_64_gpus():
    stages = preset_config()["stages"]
    assert list(stages) == STAGES  # no demo stage left beside them
    for name, stage in stages.items():
        assert stage["resources"]["nodes"] * stage["resources"]["gpus_per_node"] == OPEN_SORA_GPUS, name


def dry_run(tmp_path: Path, *args: str) -> str:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "manifest.csv").write_text("url\n" + "".join(f"https://example.org/v{i}.mp4\n" for i in range(25_000)))
    (tmp_path / "pretrained_models").mkdir(exist_ok=True)
    (tmp_path / "pretrained_models" / "PixArt-XL-2-512x512.pth").write_bytes(b"")  # no weights load in a dry run
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(PRESET), "-n", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_preset_dry_runs_the_whole_dag(tmp_path):
    plan = dry_run(tmp_path, "--cores", "1", "--printshellcmds")
    counts = job_counts(plan)
    assert counts["ingest"] == counts["caption"] == 3  # 25,000 videos in shards of 10,000
    assert counts["encode_video"] == 9 and counts["train_hq_512"] == 1
    assert "demo_videos" not in counts and "models" not in counts  # real weights only, nothing tiny
    assert not any(rule.endswith(("stage1", "stage2", "stage3")) for rule in counts)  # the demo's stages are gone
    # the encode and sample jobs get SD-VAE's settings, not the default config's pixel_pack block
    # size: under autoencoder_kl no step reads vae.factor, so changing it must re-run nothing
    commands = vae_settings(plan)
    assert commands and all([v["kind"] for v in vae if "kind" in v] == ["autoencoder_kl"] for vae in commands)
    assert not any("factor" in v for vae in commands for v in vae), commands


def planned_resources(plan: str) -> dict[str, dict]:
    """Each rule's resources as the dry run prints them (the operational JSON left out)."""
    found = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:)", plan, flags=re.MULTILINE):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        line = re.search(r"^\s+resources: (.*)$", block, flags=re.MULTILINE)
        if rule and line:
            text = re.sub(r"operational=\{.*\}(, )?", "", line.group(1))
            found[rule.group(1)] = {k: int(v) if v.isdigit() else v for k, v in re.findall(r"(\w+)=([^,]+)", text)}
            threads = re.search(r"^\s+threads: (\d+)$", block, flags=re.MULTILINE)
            found[rule.group(1)]["threads"] = int(threads.group(1)) if threads else 1
    return found


# The partitions the profile ships: a cluster of 8-GPU nodes with a 48-hour job limit.
PARTITIONS = PROFILE / "partitions.yaml"


def chosen_partition(rule: str, resources: dict, threads: int = 1) -> str | None:
    """The partition of PARTITIONS the Slurm executor plugin's own selection picks for a job."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    job = SimpleNamespace(resources=Resources(resources), threads=threads, name=rule, is_group=lambda: False)
    return get_best_partition(read_partition_file(PARTITIONS), job, SimpleNamespace(debug=print, info=print, warning=print))


class Resources(dict):
    __getattr__ = dict.__getitem__


def sbatch_command(rule: str, resources: dict, threads: int = 1) -> str:
    """The sbatch call the Slurm executor plugin builds for a job with these resources (its
    get_submit_command, then its gres string, as its run_job does), in the partition its own
    partition selection picks from the profile's partitions."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=Resources(resources), threads=threads, name=rule, is_group=lambda: False)
    partition = chosen_partition(rule, resources, threads)
    params = {"run_uuid": "test", "slurm_logfile": "log", "comment_str": rule, "account": "",
              "partition": f"-p {partition}", "workdir": ""}  # fmt: skip
    return get_submit_command(job, params) + set_gres_string(job)


def test_slurm_receives_what_each_gpu_job_needs(tmp_path):
    # a dry run holds each job's threads to --cores (1 unless given); a Slurm submission does not
    plan = dry_run(tmp_path, "--profile", str(PROFILE), "--forceall", "--cores", "1024")
    planned = planned_resources(plan)
    # the profile's own partitions place every job: GPU jobs on the 8-GPU nodes, the rest on CPUs
    gpu_rules = {rule for rule, resources in planned.items() if resources.get("gpu") or "gpu" in str(resources.get("gres"))}
    assert gpu_rules == {"caption", "encode_video", "encode_text", *(f"{step}_{s}" for s in STAGES for step in ("train", "sample"))}
    placed = {rule: chosen_partition(rule, resources, resources["threads"]) for rule, resources in planned.items()}
    assert placed == {rule: "gpu" if rule in gpu_rules else "cpu" for rule in planned}, placed
    limit = preset_config()["cluster"]["max_runtime"]
    chain_minutes = {}
    for stage in STAGES:
        call = sbatch_command(f"train_{stage}", planned[f"train_{stage}"])
        print(f"train_{stage}: {call}")
        # one srun task per node starts torchrun's 8 processes, one per GPU of the node
        assert "--nodes=8" in call and "--gres=gpu:8" in call and "-p gpu" in call, call
        assert "--ntasks-per-gpu" not in call and "--gpus=" not in call, call
        assert planned[f"train_{stage}"]["processes_per_node"] == 8
        assert "--cpus-per-task=96" in call, call  # 12 cores per GPU for data loading
        # host memory per node: at least two fp32 copies of STDiT-XL/2's 724M weights per process
        assert int(re.search(r"--mem (\d+)", call).group(1)) >= 8 * 2 * 4 * 724e6 / 2**20, call
        minutes = int(re.search(r"-t '?(\d+)", call).group(1))
        assert minutes <= limit, call
        chain_minutes[stage] = minutes * (1 + planned_retries(stage))
    # the seed's measured cost: 2,808 GPU-hours for video pretraining and 1,920 for both HQ
    # stages, on 64 GPUs; the jobs each stage may run (a chain, and its failure retries) cover it
    assert chain_minutes["video_256"] >= 2808 / 64 * 60
    assert chain_minutes["hq_256"] + chain_minutes["hq_512"] >= 1920 / 64 * 60
    caption = sbatch_command("caption", planned["caption"])
    print(f"caption: {caption}")
    # LLaVA-1.6-34B: 34.8B parameters (its model card), 69.5 GB in bf16, over two 80 GB GPUs
    assert "--gpus=2" in caption and "-p gpu" in caption, caption
    assert int(re.search(r"--mem (\d+)", caption).group(1)) >= 34.8e9 * 2 / 2**20, caption
    for rule in ("encode_video", "encode_text", "sample_hq_512"):
        call = sbatch_command(rule, planned[rule])
        print(f"{rule}: {call}")
        assert "--gpus=1" in call and "-p gpu" in call, call
    split = sbatch_command("split", planned["split"], threads=planned["split"]["threads"])
    print(f"split: {split}")
    assert "-p cpu" in split and "--gpus" not in split, split
    # a split job's cores are its worker threads (split.threads), none left idle and none shared
    assert f"--cpus-per-task={preset_config()['split']['threads']}" in split, split


def planned_retries(stage: str) -> int:
    """The retries the train rule gives Snakemake (its `retries:` directive)."""
    from soraflow.workflow.resources import train_job

    return train_job(preset_config(), stage)["retries"]


def test_a_stage_longer_than_the_time_limit_is_a_chain_of_jobs():
    from soraflow.workflow.resources import train_job

    config = preset_config()
    config["stages"]["video_256"]["resources"]["runtime"] = 7 * 24 * 60  # a week
    job = train_job(config, "video_256")
    assert job["runtime"] == config["cluster"]["max_runtime"]
    assert job["retries"] >= 7 * 24 * 60 / config["cluster"]["max_runtime"] - 1 + 2  # links after the first, + failures


def test_more_processes_than_gpus_is_refused_naming_the_stage():
    from soraflow.workflow.resources import train_job
    from soraflow.workflow.settings import ResourceError

    config = preset_config()
    config["stages"]["hq_256"]["resources"]["processes_per_node"] = 16
    with pytest.raises(ResourceError, match="stages.hq_256: 16 training processes per node but only 8 GPUs"):
        train_job(config, "hq_256")



def test_a_gpu_step_keeps_its_gpu_when_the_config_sets_only_its_memory():
    from soraflow.workflow.resources import step_job

    config = preset_config()
    config["resources"]["sample"] = {"gpus": None, "cpus": None, "mem_mb": 2000, "runtime": None}
    assert step_job(config, "sample")["gpu"] == 1 and "gpu" not in step_job(config, "split")


def test_shard_jobs_ask_for_their_shards_items_times_the_cost_of_one(tmp_path):
    """At 10,000 videos a shard, what Slurm receives for split, score and sample is the shard's
    items times the per-item cost the config states (measured in benchmarks/README.md), with the
    plan's margin (a quarter more, plus 10 minutes of startup); a shard job longer than the
    cluster's limit is a chain of jobs at the limit, each resuming the last."""
    from soraflow.workflow.plan import stage_plan
    from soraflow.workflow.resources import step_job

    config = preset_config()
    costs, videos = config["plan"], config["data"]["shard_size"]
    assert videos == 10_000
    plan = dry_run(tmp_path, "--profile", str(PROFILE), "--forceall", "--cores", "1024")
    planned = planned_resources(plan)

    def minutes(rule: str) -> int:
        call = sbatch_command(rule, planned[rule], threads=planned[rule]["threads"])
        print(f"{rule}: {call}")
        return int(re.search(r"-t '?(\d+)", call).group(1))

    def asked(hours: float) -> int:
        return math.ceil(hours * 60 * 1.25) + 10

    # split: every video's seconds at the split's cost per video-second, split.threads at once
    split_hours = videos * costs["video_seconds"] * costs["split_s_per_video_s"] / config["split"]["threads"] / 3600
    assert minutes("split") == asked(split_hours)
    # score: every clip at the motion and pHash cost and OCR's per frame (the preset has no aesthetic model)
    assert config["score"]["aesthetic_model"] is None
    per_clip = costs["score_s_per_clip"] + costs["text_area_s_per_frame"] * config["score"]["text_area"]["frames"]
    assert minutes("score") == asked(videos * costs["clips_per_video"] * per_clip / 3600)
    # sample: every video's sampling steps, each two STDiT forwards (guidance), at the plan's MFU
    samples = len(config["sample"]["prompts"]) + config["sample"]["training_captions"]
    flops = samples * config["diffusion"]["sample_steps"] * 2 * stage_plan(config, "hq_512").forward_flops
    assert minutes("sample_hq_512") == asked(flops / (989e12 * costs["mfu"]) / 3600)  # H800's bf16 peak

    # a corpus of 10-minute videos: the split needs more than the cluster's 48 hours
    config["plan"]["video_seconds"] = 600
    long = step_job(config, "split")
    links = math.ceil(asked(10 * split_hours) / config["cluster"]["max_runtime"])
    assert links == 4 and long["runtime"] == config["cluster"]["max_runtime"]  # 125 hours at 1.2 s a video-second
    assert long["retries"] == links - 1 + 2  # the chain's later links, and two failure retries
