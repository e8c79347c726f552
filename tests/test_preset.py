"""The real Open-Sora 1.0 preset: valid against the schema, and its whole DAG dry-runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from test_workflow import job_counts

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "presets" / "opensora-1.0.yaml"


def merged_preset() -> dict:
    """The preset over the default config, key by key, as Snakemake's --configfile merges it."""

    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for key, value in top.items():
            out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return out

    return merge(yaml.safe_load((REPO / "workflow_config.yaml").read_text()), yaml.safe_load(PRESET.read_text()))


def test_preset_is_valid_and_is_open_sora_1_0():
    config = merged_preset()
    schema = yaml.safe_load((REPO / "src/soraflow/workflow/schemas/config.schema.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["vae"]["model"] == "stabilityai/sd-vae-ft-ema" and config["vae"]["scaling_factor"] == 0.18215
    assert config["text_encoder"] == {"model": "DeepFloyd/t5-v1_1-xxl", "max_length": 120}
    assert config["diffusion"] == {"num_timesteps": 1000, "sample_steps": 100, "cfg_scale": 7.0}
    assert all(stage["lr"] == 2e-5 for stage in config["stages"].values())
    assert config["train"]["ema_decay"] == 0.9999 and config["train"]["mixed_precision"] == "bf16"
    assert config["stages"]["stage1"]["init"].endswith(".pth")  # PixArt-α
    assert config["stdit"]["preset"] == "STDiT-XL/2"  # 759,620,768 parameters: tests/test_stdit.py


def test_preset_dry_runs_the_whole_dag(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("url\n" + "".join(f"https://example.org/v{i}.mp4\n" for i in range(25_000)))
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models" / "PixArt-XL-2-512x512.pth").write_bytes(b"")  # no weights load in a dry run
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(PRESET), "-n", "--cores", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["ingest"] == counts["caption"] == 3  # 25,000 videos in shards of 10,000
    assert counts["encode_video"] == 9 and counts["train_stage3"] == 1
    assert "demo_videos" not in counts and "models" not in counts  # real weights only, nothing tiny


def test_stage_resources_reach_the_training_jobs(tmp_path):
    from soraflow.workflow.layout import Layout

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("url\nv.mp4\n")
    layout = Layout({**merged_preset(), "data": {"manifest": str(manifest), "shard_size": 10, "root": "data"}})
    resources = layout.train_resources("stage2")
    assert resources["nodes"] == 8 and resources["gpu"] == 8 and resources["tasks"] == 8
    assert resources["runtime"] == merged_preset()["stages"]["stage2"]["resources"]["runtime"]
