"""The `soraflow` command as a person uses it, outside Snakemake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from soraflow.cli import build_parser
from soraflow.data import table

REPO = Path(__file__).resolve().parents[1]
USER_COMMANDS = ["split", "caption", "sample", "inspect"]


def soraflow(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soraflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", USER_COMMANDS)
def test_every_user_command_has_help(command):
    result = soraflow(command, "--help")
    assert result.returncode == 0 and "usage: soraflow " + command in result.stdout


def test_every_subcommand_is_listed():
    listed = soraflow("--help").stdout
    for name in build_parser()._subparsers._group_actions[0].choices:
        assert name in listed


def test_split_a_video_file(synthetic_cut_video, tmp_path):
    params = yaml.safe_load((REPO / "workflow_config.yaml").read_text())["split"]
    result = soraflow("split", str(synthetic_cut_video["path"]), "--out-dir", str(tmp_path / "out"),
                      "--params", json.dumps(params))
    assert result.returncode == 0, result.stderr
    clips = table.read(tmp_path / "out" / "clips.parquet")
    assert clips["start_frame"].tolist() == [0, *synthetic_cut_video["cut_frames"]]
    assert all(Path(p).exists() for p in clips["path"])


def test_split_takes_the_workflow_config_as_snakemake_does(synthetic_cut_video, tmp_path):
    """--configfile FILE over workflow_config.yaml, then --config KEY=VALUE over both: the 128 px
    video's clips come out at the file's frame rate and size, and its raw file is a copy (the
    default hard-links it)."""
    override = tmp_path / "override.yaml"
    override.write_text("split: {fps: 12.0, shorter_side: 64, detector: content, threshold: 27.0}\n"
                        "ingest: {local_sources: in_place}\n")
    result = soraflow("split", str(synthetic_cut_video["path"]), "--out-dir", str(tmp_path / "out"),
                      "--configfile", str(override), "--config", "ingest={local_sources: copy}")
    assert result.returncode == 0, result.stderr
    clips = table.read(tmp_path / "out" / "clips.parquet")
    assert set(clips["fps"]) == {12.0} and set(clips["width"]) == set(clips["height"]) == {64}
    (raw,) = (tmp_path / "out" / "raw").iterdir()
    assert not raw.samefile(synthetic_cut_video["path"])


def test_split_without_a_config_says_what_to_pass(synthetic_cut_video, tmp_path):
    result = soraflow("split", str(synthetic_cut_video["path"]), cwd=tmp_path)
    assert result.returncode != 0 and "workflow_config.yaml not found: pass the step's --params, or --configfile" in result.stderr


def test_inspect_summarises_clips_and_rejects(tmp_path):
    shard = tmp_path / "shards" / "00000"
    clips = pd.DataFrame({"id": ["a_scene-000", "a_scene-001"], "video_id": ["a", "a"], "duration_s": [1.5, 2.5],
                          "width": [64, 64], "height": [48, 48], "text": ["a cat", None]})
    table.write(clips, shard / "captioned.parquet")
    table.write_rejects([{"id": "b", "url": "b.mp4", "stage": "ingest", "reason": "no video stream"}],
                        shard / "rejects_ingest.parquet")
    result = soraflow("inspect", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "clips: 2" in result.stdout and "captioned: 1" in result.stdout and "64x48 (2)" in result.stdout
    assert "ingest: no video stream" in result.stdout


def test_inspect_before_a_run_names_the_folder(tmp_path):
    result = soraflow("inspect", "--root", str(tmp_path / "nothing"))
    assert result.returncode != 0 and "nothing/shards not found" in result.stderr
