"""Export: shards' captioned tables into one parquet + Open-Sora's CSVs, rejects into one table."""

from __future__ import annotations

import csv
import os

import pandas as pd
import pytest

from soraflow.cli import main
from soraflow.data import table
from soraflow.data.export import OPENSORA_COLUMNS, export_shards, export_tables
from soraflow.data.manifest import shard_table_paths
from soraflow.workflow.layout import Layout

OUTPUTS = ("clips.parquet", "clips_opensora-v1.0.csv", "clips_opensora-v1.1.csv", "rejects.parquet")


def clip_rows(shard: int, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [f"v{shard}_scene-{k:03d}" for k in range(n)],
            "video_id": f"v{shard}",
            "url": f"https://example.com/v{shard}.mp4",
            "path": [f"data/clips/{shard:05d}/v{shard}_scene-{k:03d}.mp4" for k in range(n)],
            "text": [f'A dog, "quoted", runs\nacross field {k}' for k in range(n)],
            "num_frames": [24 + k for k in range(n)],
            "width": 256,
            "height": 144,
            "aspect_ratio": 144 / 256,
            "fps": 24.0,
            "resolution": 256 * 144,
            "aes": [4.5 + k for k in range(n)],
        }
    )


@pytest.fixture
def shards(tmp_path):
    """Three shards as the workflow leaves them; the middle one lost every clip."""
    shards_dir = tmp_path / "shards"
    layout_like = {0: 2, 1: 0, 2: 3}
    for shard, n in layout_like.items():
        folder = shards_dir / f"{shard:05d}"
        table.write(clip_rows(shard, n) if n else table.empty(), folder / "captioned.parquet")
        table.write_rejects([{"id": f"bad{shard}", "url": "x.mp4", "stage": "ingest", "reason": "zero-byte file"}],
                            folder / "rejects_ingest.parquet")
        table.write_rejects([{"id": f"v{shard}_scene-009", "url": "x", "stage": "split", "reason": "scene 0.2 s shorter than min_seconds 0.5"}] * (shard == 1),
                            folder / "rejects_split.parquet")  # fmt: skip
        table.write_rejects([{"id": f"v{shard}_scene-008", "url": "x", "stage": "score", "reason": "unreadable clip"}] * (shard == 2),
                            folder / "rejects_score.parquet")  # fmt: skip
        table.write_rejects([], folder / "rejects_caption.parquet")
    return shards_dir


def test_export_concatenates_shards_and_writes_opensora_csv(tmp_path, shards):
    out = tmp_path / "results"
    counts = export_shards(shards, 3, *(out / name for name in OUTPUTS))
    assert counts == {"clips": 5, "rejects": 5, "rejects_by_stage": {"ingest": 3, "split": 1, "score": 1}}

    clips = table.read(out / "clips.parquet")
    expected = pd.concat([clip_rows(0, 2), clip_rows(2, 3)], ignore_index=True)
    assert clips["id"].tolist() == expected["id"].tolist()
    assert clips["aes"].tolist() == expected["aes"].tolist()  # every column survives, not only the CSV's
    assert list(clips.columns) == table.CLIP_SCHEMA.names

    v1_1 = pd.read_csv(out / "clips_opensora-v1.1.csv", keep_default_na=False)
    assert list(v1_1.columns) == OPENSORA_COLUMNS
    assert v1_1["path"].tolist() == [os.path.abspath(p) for p in expected["path"]]
    assert v1_1["text"].tolist() == expected["text"].tolist()  # commas, quotes and newlines round-trip
    assert v1_1["num_frames"].tolist() == expected["num_frames"].tolist()
    assert v1_1["aspect_ratio"].tolist() == pytest.approx(expected["aspect_ratio"].tolist())
    assert (v1_1[["width", "height", "resolution"]].values == [256, 144, 256 * 144]).all()
    assert (v1_1["fps"] == 24.0).all()

    # Open-Sora 1.0's DatasetFromCSV: open(path, "r"), csv.reader, every row a clip (no header)
    with open(out / "clips_opensora-v1.0.csv", "r") as f:
        v1_0 = list(csv.reader(f))
    assert v1_0 == [
        [os.path.abspath(path), text, str(frames)]
        for path, text, frames in zip(expected["path"], expected["text"], expected["num_frames"])
    ]

    rejects = table.read(out / "rejects.parquet")
    assert list(rejects.columns) == table.REJECT_SCHEMA.names
    assert rejects["id"].tolist() == ["bad0", "bad1", "v1_scene-009", "bad2", "v2_scene-008"]
    assert not list(out.glob("*.tmp"))


def test_export_cli_matches_the_function(tmp_path, shards):
    out = tmp_path / "cli"
    main(["export", "--shards-dir", str(shards), "--num-shards", "3", "--out", str(out / "c.parquet"),
          "--opensora-v1.0-csv", str(out / "c1.0.csv"), "--opensora-v1.1-csv", str(out / "c1.1.csv"),
          "--rejects", str(out / "r.parquet")])  # fmt: skip
    assert len(table.read(out / "c.parquet")) == 5 and len(table.read(out / "r.parquet")) == 5
    with open(out / "c1.0.csv") as f:
        assert len(pd.read_csv(out / "c1.1.csv")) == 5 and len(list(csv.reader(f))) == 5


def test_a_missing_shard_is_an_error_and_leaves_no_output(tmp_path, shards):
    out = tmp_path / "results"
    with pytest.raises(FileNotFoundError, match="00003"):
        export_shards(shards, 4, *(out / name for name in OUTPUTS))
    assert not out.exists() or not list(out.iterdir())


def test_a_clip_without_text_is_refused(tmp_path):
    bad = tmp_path / "captioned.parquet"
    table.write(clip_rows(0, 2).assign(text=[None, "ok"]), bad)
    with pytest.raises(ValueError, match="without 'text'"):
        export_tables([bad], [], *(tmp_path / name for name in OUTPUTS))
    assert not list(tmp_path.glob("clips*")) and not (tmp_path / "rejects.parquet").exists()


def test_paths_follow_the_workflow_layout(tmp_path):
    config = {
        "data": {"manifest": str(tmp_path / "m.csv"), "shard_size": 2, "root": "data"},
        "stages": {}, "local_models": {"out_dir": "models"},
    }  # fmt: skip
    (tmp_path / "m.csv").write_text("url\na.mp4\nb.mp4\nc.mp4\n")
    layout = Layout(config)
    assert [str(p) for p in shard_table_paths("data/shards", 2, "captioned")] == layout.shard_files("captioned")
    assert list(layout.exports().values()) == [f"results/{name}" for name in OUTPUTS]
