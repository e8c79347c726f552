"""Faults of the machine fail a shard job naming their cause and leave no output; faults of a
video (or a clip) reject it with its reason and the job goes on. The machine's faults here are
real: a full tmpfs, a file-size limit, ffmpeg killed by the kernel, no ffmpeg, a read-only
folder, a clip file gone, a model that is not there."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import bare_section, section
from conftest_caption import make_clip_table, tiny_models  # noqa: F401  (session fixture)
from test_cache import MINILM
from test_split import PARAMS, ingest

from soraflow.data import cache, table, video
from soraflow.data.split import split_shard
from soraflow.scoring.caption import caption_shard
from soraflow.scoring.shard import score_shard
from soraflow.training.dataset import build_stage_index
from soraflow.training.encode import clip_frame_indices, encode_text_shard, encode_video_shard


def split(tmp_path: Path, videos: Path, clip_dir: Path) -> tuple[Path, Path]:
    out, rejects = tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet"
    split_shard(videos, clip_dir, out, rejects, PARAMS)
    return out, rejects


def assert_nothing_written(tmp_path: Path, *outputs: Path) -> None:
    assert not [path for path in outputs if path.exists()]
    assert not list(tmp_path.rglob("*.tmp.mp4")), "a clip half-written"


@pytest.fixture
def videos(tmp_path, synthetic_cut_video) -> Path:
    """An ingest table of one 3-scene video (3 clips to cut)."""
    return ingest(tmp_path, {"cuts": synthetic_cut_video["path"]})


def ffmpeg_under(tmp_path: Path, monkeypatch, *shell: str) -> None:
    """`ffmpeg` on PATH is the real one, started under the shell lines given (a machine's limits)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "ffmpeg").write_text("#!/bin/sh\n" + "\n".join(shell) + f'\nexec {shutil.which("ffmpeg")} "$@"\n')
    (folder / "ffmpeg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only; skips the test where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_fails_the_split(tmp_path, videos):
    # ffmpeg 5.1 reports the full disk and exits 0: its output was the clip's reject before
    with tmpfs(tmp_path / "disk", "size=16k") as disk:
        with pytest.raises(OSError, match="No space left on device") as failure:
            split(tmp_path, videos, disk / "clips")
        assert failure.value.errno == errno.ENOSPC, failure.value
        assert_nothing_written(tmp_path, tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet")


def test_a_file_size_limit_fails_the_split(tmp_path, videos, monkeypatch):
    ffmpeg_under(tmp_path, monkeypatch, "trap '' XFSZ", "ulimit -f 16")  # writes past 16 blocks: EFBIG
    with pytest.raises(OSError, match="File too large") as failure:
        split(tmp_path, videos, tmp_path / "clips")
    assert failure.value.errno == errno.EFBIG
    assert_nothing_written(tmp_path, tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet")


def test_ffmpeg_killed_by_a_signal_fails_the_split(tmp_path, videos, monkeypatch):
    ffmpeg_under(tmp_path, monkeypatch, "ulimit -f 16")  # the kernel kills it with SIGXFSZ
    with pytest.raises(ChildProcessError, match="killed by SIGXFSZ"):
        split(tmp_path, videos, tmp_path / "clips")
    assert_nothing_written(tmp_path, tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet")


def test_without_ffmpeg_the_split_fails_saying_so(tmp_path, videos, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="ffmpeg, which cuts the clips, is not on PATH"):
        split(tmp_path, videos, tmp_path / "clips")
    assert_nothing_written(tmp_path, tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet")


@contextmanager
def read_only_folder(path: Path):
    """A folder holding an empty `clips` folder that no write reaches: a read-only tmpfs for root
    (who writes through permissions), permissions otherwise. Yields the errno a write gets."""
    if os.geteuid() == 0:
        with tmpfs(path, "size=1m"):
            (path / "clips").mkdir()
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
            yield errno.EROFS
        return
    (path / "clips").mkdir(parents=True)
    for folder in (path / "clips", path):
        folder.chmod(0o555)
    try:
        yield errno.EACCES
    finally:
        for folder in (path, path / "clips"):
            folder.chmod(0o755)  # for pytest's clean-up


def test_an_unwritable_clip_folder_fails_the_split(tmp_path, videos):
    with read_only_folder(tmp_path / "readonly") as expected:
        with pytest.raises(OSError) as failure:
            split(tmp_path, videos, tmp_path / "readonly" / "clips")
        assert failure.value.errno == expected and os.strerror(expected) in str(failure.value)
        assert_nothing_written(tmp_path, tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet")


def test_a_clip_file_gone_fails_the_caption_job(tiny_models, tmp_path):
    clips = make_clip_table(tmp_path, 2)
    (tmp_path / "clip1.mp4").unlink()
    params = section("caption", max_new_tokens=6, model=str(tiny_models["tiny-llava"]))
    out, rejects = tmp_path / "captioned.parquet", tmp_path / "rejects.parquet"
    with pytest.raises(FileNotFoundError, match="clip1.mp4"):
        caption_shard(clips, out, rejects, params)
    assert_nothing_written(tmp_path, out, rejects)


def test_a_missing_model_fails_the_caption_job_naming_it(tmp_path):
    clips = make_clip_table(tmp_path, 2)
    params = section("caption", max_new_tokens=6, model=str(tmp_path / "no-such-model"))
    out, rejects = tmp_path / "captioned.parquet", tmp_path / "rejects.parquet"
    with pytest.raises(OSError, match="no-such-model"):
        caption_shard(clips, out, rejects, params)
    assert_nothing_written(tmp_path, out, rejects)


# --- one unreadable or too short clip rejects that clip, never the shard -------------------------
STAGE = {"num_frames": 4, "frame_interval": 2, "resolution": 32, "filters": {}}  # spans 7 source frames


@pytest.fixture
def clips_one_unreadable_one_short(tmp_path) -> Path:
    """clip0 decodes (10 frames), clip1's file is not a video, clip2 has 6 frames: one short of
    STAGE's span."""
    clips = make_clip_table(tmp_path, 3)
    (tmp_path / "clip1.mp4").write_bytes(b"not a video")
    rows = table.read(clips)
    video.write_video(tmp_path / "clip2.mp4", video.read_frames(tmp_path / "clip2.mp4")[:6], fps=8)
    table.write(rows.assign(num_frames=[10, 10, 6], duration_s=[1.25, 1.25, 0.75]), clips)
    return clips


def test_an_unreadable_clip_is_a_score_reject_and_the_rest_are_scored(tmp_path, clips_one_unreadable_one_short):
    out, rejects = tmp_path / "scored.parquet", tmp_path / "rejects_score.parquet"
    score_shard(clips_one_unreadable_one_short, out, section("score", aesthetic_model=None), rejects)
    assert table.read(out)["id"].tolist() == ["clip0", "clip2"] and table.read(out)["motion"].notna().all()
    reject = table.read(rejects).iloc[0]
    assert len(table.read(rejects)) == 1 and (reject["id"], reject["stage"]) == ("clip1", "score")
    assert "clip1.mp4" in reject["reason"] and "Invalid data" in reject["reason"]


def test_unreadable_and_too_short_clips_are_encode_rejects_left_out_of_the_stage(tmp_path, clips_one_unreadable_one_short):
    clips = clips_one_unreadable_one_short
    latents, texts, rejects = tmp_path / "latents.json", tmp_path / "text.json", tmp_path / "rejects_encode.parquet"
    table.write(table.read(clips).assign(text="a red car"), clips)
    encode_video_shard(clips, latents, bare_section("vae", kind="pixel_pack", factor=4), STAGE, rejects)
    encode_text_shard(clips, texts, MINILM)
    assert cache.read_ids(latents) == ["clip0"]
    reasons = table.read(rejects).set_index("id")["reason"]
    assert reasons.index.tolist() == ["clip2", "clip1"] and (table.read(rejects)["stage"] == "encode_video").all()
    assert reasons["clip2"] == "6 frames, fewer than the 7 that 4 frames 2 apart span"
    assert reasons["clip1"].startswith("cannot decode frames") and "clip1.mp4" in reasons["clip1"]

    index, stage_rejects = tmp_path / "index.parquet", tmp_path / "stage_rejects.parquet"
    build_stage_index([clips], [clips], [latents], [texts], {}, index, stage_rejects, [rejects])
    assert table.read(index)["id"].tolist() == ["clip0"]
    assert table.read(stage_rejects).set_index("id").loc[["clip2", "clip1"]].equals(table.read(rejects).set_index("id"))
    with pytest.raises(ValueError, match="clips without latents"):  # no rejects table: nowhere to put them
        encode_video_shard(clips, tmp_path / "other.json", bare_section("vae", kind="pixel_pack", factor=4), STAGE)


def test_a_stage_never_squeezes_a_clip_in_time():
    assert clip_frame_indices(7, STAGE) == [0, 2, 4, 6] and clip_frame_indices(10, STAGE) == [1, 3, 5, 7]
    with pytest.raises(ValueError, match="4 frames 2 apart span 7 frames; the clip has 6"):
        clip_frame_indices(6, STAGE)
