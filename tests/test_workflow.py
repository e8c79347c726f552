"""The workflow's layout, config validation, lint and DAG shape (planned, not run: only the manifest
re-run test runs its shard jobs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from soraflow.workflow.layout import Layout

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]


def default_config() -> dict:
    return yaml.safe_load((REPO / "workflow_config.yaml").read_text())


def vae_settings(plan: str) -> list[list[dict]]:
    """Per encode-video and sample command of a dry run's --printshellcmds output, the `vae`
    sections it is given (its params', then its operational settings')."""
    commands = [line for line in plan.splitlines() if "soraflow encode-video" in line or "soraflow sample " in line]
    return [[json.loads(found) for found in re.findall(r'"vae": (\{[^{}]*\})', line)] for line in commands]


def snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the table a dry run prints."""
    counts = {}
    for line in output.splitlines():
        match = re.fullmatch(r"\s*(\w+)\s+(\d+)\s*", line)
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def write_manifest(path: Path, rows: int) -> Path:
    path.write_text("url\n" + "".join(f"data/raw/v{i}.mp4\n" for i in range(rows)))
    return path


def test_layout_chains_stages_and_names_outputs():
    layout = Layout(default_config())
    assert layout.stages == ["stage1", "stage2", "stage3"]
    assert layout.init_checkpoint("stage1") == []
    assert layout.init_checkpoint("stage2") == [layout.checkpoint("stage1")]
    assert layout.init_checkpoint("stage3") == [layout.checkpoint("stage2")]
    sample = default_config()["sample"]
    assert len(layout.samples("stage2")) == len(sample["prompts"])
    assert len(layout.caption_samples("stage2")) == sample["training_captions"] > 0
    assert layout.sample_comparison("stage2") == ["results/samples/stage2/vs_training.png",
                                                  "results/samples/stage2/vs_training.csv"]
    assert len(layout.all_samples()) == 3 * (len(sample["prompts"]) + sample["training_captions"] + 2)
    assert layout.model_input("models/tiny-llava") == ["models/tiny-llava"]
    assert layout.model_input("llava-hf/llava-v1.6-34b-hf") == []


def test_without_training_captions_a_stage_has_prompt_samples_only():
    config = default_config()
    config["sample"]["training_captions"] = 0
    layout = Layout(config)
    assert layout.caption_samples("stage1") == [] and layout.sample_comparison("stage1") == []
    assert layout.all_samples() == [path for stage in layout.stages for path in layout.samples(stage)]


def test_stages_run_in_the_order_listed_and_start_from_an_earlier_one():
    config = default_config()
    config["stages"] = {"late": {**config["stages"]["stage1"], "init": None},
                        "early": {**config["stages"]["stage2"], "init": "late"}}  # fmt: skip
    layout = Layout(config)
    assert layout.stages == ["late", "early"] and layout.init_checkpoint("early") == [layout.checkpoint("late")]
    config["stages"]["late"]["init"] = "early"
    with pytest.raises(ValueError, match=r"stages.late.init: 'early' is not an earlier stage"):
        Layout(config)


def test_a_pixart_checkpoint_path_is_an_init_input():
    config = default_config()
    config["stages"]["stage2"]["init"] = "weights/PixArt-XL-2-512x512.pth"
    assert Layout(config).init_checkpoint("stage2") == ["weights/PixArt-XL-2-512x512.pth"]


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "good condition" in result.stdout + result.stderr


def test_dry_run_prints_the_whole_dag():
    result = snakemake("-n", "--forceall", "--cores", "1")  # whatever a previous demo left behind
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    shards = len(Layout(default_config()).shards)
    assert counts["ingest"] == counts["split"] == counts["caption"] == counts["encode_text"] == shards
    assert counts["encode_video"] == 3 * shards
    for stage in ("stage1", "stage2", "stage3"):
        assert counts[f"train_{stage}"] == 1 and counts[f"sample_{stage}"] == 1


def override(tmp_path: Path, **sections) -> str:
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


def test_dag_grows_with_shards_not_videos(tmp_path):
    manifest = write_manifest(tmp_path / "manifest.csv", rows=1000)
    data = {"manifest": str(manifest), "shard_size": 250, "root": "data"}
    result = snakemake("-n", "--forceall", "--cores", "1", "--configfile", override(tmp_path, data=data))
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["ingest"] == 4 and counts["caption"] == 4 and counts["encode_video"] == 12


@pytest.mark.parametrize(
    "section, value, key",
    [
        ("split", {"detector": "magic", "threshold": 27, "min_scene_frames": 15, "min_seconds": 1, "max_seconds": 5},
         "detector"),
        ("data", {"manifest": "demo/manifest.csv", "shard_size": 4, "root": "data", "shardsize": 4}, "shardsize"),
        ("diffusion", {"cfg_scale": "high"}, "cfg_scale"),
        ("train", {"seed": "forty-two"}, "seed"),
    ],
)
def test_a_bad_config_stops_before_any_job_naming_the_key(section, value, key, tmp_path):
    result = snakemake("-n", "--cores", "1", "--configfile", override(tmp_path, **{section: value}))
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "Error validating config" in message and f"'{key}'" in message
    assert "Job stats" not in message


def shard_jobs(planned: dict) -> dict[str, set[str]]:
    """Shard -> the rules of its planned jobs."""
    jobs = {}
    for rule, wildcards in planned:
        shard = re.search(r"shard=(\d{5})", wildcards)
        if shard:
            jobs.setdefault(shard.group(1), set()).add(rule)
    return jobs


def test_appended_rows_re_run_only_the_shards_they_land_in(tmp_path):
    """Real Snakemake writes the shard tables; appending rows re-writes the last shard and the
    new one and leaves the others as they were (times too), so none of their jobs runs again;
    editing a row of shard 0 then plans shard 0's table alone."""
    from workflow_run import planned_jobs, run_snakemake

    manifest = write_manifest(tmp_path / "manifest.csv", rows=5)
    config = default_config()
    config["data"].update(manifest=str(manifest), shard_size=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    layout = Layout(config)
    run_snakemake(tmp_path, *layout.shard_files("manifest"))
    tables = {shard: tmp_path / layout.shard_file("manifest", shard) for shard in layout.shards}
    written = {shard: path.stat().st_mtime_ns for shard, path in tables.items()}
    before = shard_jobs(planned_jobs(tmp_path))
    assert set(before) == {"00000", "00001", "00002"} and not any("shard" in rules for rules in before.values())

    manifest.write_text(manifest.read_text() + "data/raw/v5.mp4\ndata/raw/v6.mp4\n")
    after = shard_jobs(planned_jobs(tmp_path))
    assert after["00000"] == before["00000"] and after["00001"] == before["00001"]  # shard's own table kept
    assert "shard" in after["00002"] and "shard" in after["00003"]
    run_snakemake(tmp_path, *Layout(config).shard_files("manifest"))
    assert [tables[s].stat().st_mtime_ns == written[s] for s in layout.shards] == [True, True, False]

    manifest.write_text(manifest.read_text().replace("v1.mp4\n", "v1_edited.mp4\n"))
    planned = planned_jobs(tmp_path)
    assert {wildcards for rule, wildcards in planned if rule == "shard"} == {"shard=00000"}


@contextmanager
def edited(path: Path, text: str):
    """`path` holds `text` inside the block; its bytes and modification time come back after."""
    original, stat = path.read_bytes(), path.stat()
    try:
        path.write_text(text)
        yield
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
def test_a_finished_run_re_runs_only_the_shard_a_row_changes(finished_run, tmp_path):
    """The tiny run (3 shards of one video): a row appended plans the new shard's jobs and the
    steps over all shards, nothing for the shards before it; a row of shard 0 edited plans
    shard 0's jobs and those steps. Planned on a copy, whose config names the run's manifest:
    that file is edited for the plan and given back as it was."""
    from workflow_run import copy_run, planned_jobs

    workdir = copy_run(finished_run.workdir, tmp_path / "run")
    manifest = Path(yaml.safe_load((workdir / "config.yaml").read_text())["data"]["manifest"])
    original = manifest.read_text()
    assert planned_jobs(workdir) == {}, "the finished run is not up to date"
    whole = planned_jobs(workdir, forceall=True)
    chain = {rule for rule, wildcards in whole if "shard=00000" in wildcards}
    over_all = {job for job in whole if "shard=" not in job[1] and job[0] not in ("demo_videos", "models")}

    with edited(manifest, original + "data/demo/cuts_a.mp4,cuts_again,\n"):
        planned = planned_jobs(workdir)
    assert shard_jobs(planned) == {"00003": chain}
    assert {job for job in planned if "shard=" not in job[1]} == over_all

    with edited(manifest, original.replace("bikes,\n", "bikes,a caption\n")):
        planned = planned_jobs(workdir)
    assert shard_jobs(planned) == {"00000": chain}
    assert {job for job in planned if "shard=" not in job[1]} == over_all
    assert planned_jobs(workdir) == {}


def test_config_overrides_reach_the_stages_a_config_file_lists(tmp_path):
    """A config file that lists stages replaces the default ones; --config values still apply
    over them (they were dropped when the listed stages were restored). Snakemake's --config
    reads nested values as strings: a stage's init is one."""
    stages = default_config()["stages"]
    listed = override(tmp_path, stages={"late": stages["stage1"], "early": {**stages["stage2"], "init": "late"}})
    pixart = tmp_path / "pixart.pth"
    pixart.touch()
    result = snakemake("-n", "-p", "--forceall", "--cores", "1", "--configfile", listed,
                       "--config", f"stages={{early: {{init: {pixart}}}}}", "--", "results/checkpoints/early.safetensors")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert f"--init {pixart}" in result.stdout and "train_late" not in result.stdout, result.stdout[-3000:]


def test_pixel_pack_jobs_get_no_model_or_subfolder():
    """The demo's pixel_pack has no weights: its encode and sample jobs are not given vae.model or
    vae.subfolder (which the weighted autoencoders read), so changing them re-runs nothing."""
    result = snakemake("-n", "-p", "--forceall", "--cores", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    commands = vae_settings(result.stdout)
    assert commands
    for vae in commands:
        assert [v["kind"] for v in vae if "kind" in v] == ["pixel_pack"], vae
        assert all("model" not in v and "subfolder" not in v for v in vae), vae
