"""ingest.keep_raw false under real Snakemake: a shard's raw files go once it is split, nothing
re-runs for their absence, and a split that must run again fetches them again first."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from soraflow.data import table

pytestmark = pytest.mark.slow  # three Snakemake runs: 40-70 s on the busy 2-core development machine

REPO = Path(__file__).resolve().parents[1]
CLIPS = "data/shards/00000/clips.parquet"


def snakemake(workdir: Path, config: dict, *args: str) -> str:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args, CLIPS]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def planned_rules(plan: str) -> list[str]:
    return sorted(line.split()[1].rstrip(":") for line in plan.splitlines() if line.startswith(("rule ", "localrule ")))


def test_raw_files_go_once_split_and_come_back_only_for_a_new_split(tmp_path, synthetic_cut_video, vfr_video):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, video in (("cuts", synthetic_cut_video), ("vfr", vfr_video)):
        shutil.copyfile(video["path"], corpus / f"{name}.mp4")
    (tmp_path / "manifest.csv").write_text(f"url\n{corpus / 'cuts.mp4'}\nfile://{corpus / 'vfr.mp4'}\n")
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["data"].update(manifest=str(tmp_path / "manifest.csv"), shard_size=2)
    config["demo"]["videos"] = []
    config["ingest"].update(keep_raw=False, local_sources="copy")
    config["split"].update(detector="content", threshold=27.0)  # the cheaper detector: no torch in the split job

    snakemake(tmp_path, config)
    clips = table.read(tmp_path / CLIPS)
    assert clips["video_id"].unique().tolist() == ["cuts", "vfr"]
    assert list((tmp_path / "data" / "raw").iterdir()) == []  # the copies are gone ...
    assert not (tmp_path / "data" / "shards" / "00000" / "videos.parquet").exists()  # ... and the temp() table
    assert (corpus / "cuts.mp4").read_bytes() == synthetic_cut_video["path"].read_bytes()  # sources untouched

    # operational settings, keep_raw included, re-run nothing, though the raw files are gone
    quiet = {**config, "ingest": {**config["ingest"], "concurrency": 3, "keep_raw": True},
             "split": {**config["split"], "threads": 1}}
    assert "Nothing to be done" in snakemake(tmp_path, quiet, "-n")
    # a split setting re-runs the split, and its ingest first: the raw files must come back
    resplit = {**config, "split": {**config["split"], "min_seconds": 0.75}}
    assert planned_rules(snakemake(tmp_path, resplit, "-n")) == ["ingest", "split"]
