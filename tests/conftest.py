"""Shared fixtures: small synthetic videos made with real ffmpeg."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest

# Tests never reach a model hub: a missing local model fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml
from workflow_run import run_snakemake, small_config

from soraflow.demo.videos import demo_cut_frames, make_demo_videos, scene_frames
from soraflow.workflow.layout import Layout
from soraflow.workflow.settings import with_defaults

REPO = Path(__file__).resolve().parents[1]
SLOW_TIMEOUT = 1800  # s: a slow test may build a whole tiny run or a Slurm cluster first


@pytest.hookimpl(tryfirst=True)  # the groups must be there when xdist reads them
def pytest_collection_modifyitems(items):
    """A hang fails with a stack (pytest-timeout) after the suite's timeout (pyproject.toml), or
    SLOW_TIMEOUT for the end-to-end tests marked slow and every test of the finished run (the
    first of them builds it), unless a test names its own.

    `make test` runs the suite on three workers for two cores (pytest-xdist, --dist loadgroup), a
    module's tests on one worker (its module fixtures are built once) and every test that reads
    the session's finished run on one (a session fixture is built once per worker). The two
    longest groups go first, one to each of two workers (--no-loadscope-reorder keeps this order):
    the Slurm test, most of its minutes waiting on Slurm, and the finished run's tests; a worker
    takes more only when its own are nearly done, so the third fills in the rest beside them."""
    for item in items:
        slow = item.get_closest_marker("slow") or group(item) == "finished_run"
        if slow and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=lambda item: {"test_slurm": 0, "finished_run": 1}.get(group(item), 2))  # stable


def group(item) -> str:
    return "finished_run" if "finished_run" in getattr(item, "fixturenames", ()) else item.module.__name__


def section(name: str, **values) -> dict:
    """A config section as a step receives it: `values` over the default config's section
    (workflow_config.yaml), the schema's defaults filled in by validation."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config[name] = {**config[name], **values}
    return with_defaults(config)[name]


def bare_section(name: str, **values) -> dict:
    """Only `values`, with the schema's defaults for every key they leave out."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config[name] = values
    return with_defaults(config)[name]

CUT_VIDEO_SPEC = {
    "name": "cuts",
    "sources": ["testsrc2", "mandelbrot", "smptebars"],
    "scene_seconds": 1.0,
    "size": 128,
    "fps": 24,
}


@pytest.fixture(scope="session")
def synthetic_cut_video(tmp_path_factory) -> dict:
    """A 3-scene 128x128 24 fps H.264 video with hard cuts at frames 24 and 48.

    Returns {path, cut_frames, num_frames, fps, width, height}.
    """
    (path,) = make_demo_videos(tmp_path_factory.mktemp("cut_video"), [CUT_VIDEO_SPEC])
    return {
        "path": path,
        "cut_frames": demo_cut_frames(CUT_VIDEO_SPEC),
        "num_frames": scene_frames(CUT_VIDEO_SPEC) * len(CUT_VIDEO_SPEC["sources"]),
        "fps": float(CUT_VIDEO_SPEC["fps"]),
        "width": CUT_VIDEO_SPEC["size"],
        "height": CUT_VIDEO_SPEC["size"],
    }


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; a failure shows its stderr."""
    result = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def encode_source(out: Path, source: str, frames: int, *extra: str) -> Path:
    """`frames` frames of a lavfi source as H.264 yuv420p mp4."""
    ffmpeg("-f", "lavfi", "-i", source, "-frames:v", str(frames), *extra, "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(out))
    return out


@pytest.fixture(scope="session")
def rotated_video(tmp_path_factory) -> dict:
    """A phone-style video: stored 96x64 landscape, displayed 64x96 (rotated 90 degrees clockwise).

    Left half of the stored picture is white, right half black, so upright output has white on top.
    Two scenes (the second all grey) with the cut at frame 24; 48 frames at 24 fps.
    Returns {path, cut_frames, num_frames, fps, stored_size, display_size}.
    """
    folder = tmp_path_factory.mktemp("rotated")
    plain = folder / "plain.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "color=white:size=48x64:rate=24,pad=96:64:0:0:black",
        "-f", "lavfi", "-i", "color=gray:size=96x64:rate=24",
        "-filter_complex", "[0:v]trim=end_frame=24[a];[1:v]trim=end_frame=24,setpts=PTS-STARTPTS[b];[a][b]concat=n=2:v=1[out]",
        "-map", "[out]", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(plain),
    )  # fmt: skip
    rotated = folder / "phone.mp4"
    # ffmpeg 5.1 stores rotate=270 as a display matrix that turns the picture 90 degrees clockwise
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=270", str(rotated))
    return {"path": rotated, "cut_frames": [24], "num_frames": 48, "fps": 24.0, "stored_size": (96, 64), "display_size": (64, 96)}


@pytest.fixture(scope="session")
def vfr_video(tmp_path_factory) -> dict:
    """Variable frame rate: 24 frames 1/24 s apart, then a hard cut and 24 frames 1/8 s apart.

    By decode order the cut is at frame 24; a time-based frame number (t * average fps)
    would put it elsewhere. Returns {path, cut_frames, num_frames, timestamps}.
    """
    folder = tmp_path_factory.mktemp("vfr")
    path = folder / "vfr.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=24",
        "-f", "lavfi", "-i", "smptebars=size=96x64:rate=24",
        "-filter_complex",
        "[0:v]trim=end_frame=24[a];[1:v]trim=end_frame=24,setpts=PTS-STARTPTS[b];[a][b]concat=n=2:v=1,"
        "setpts='if(lt(N,24),N/24,1+(N-24)/8)/TB'[out]",
        "-map", "[out]", "-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path),
    )  # fmt: skip
    timestamps = [n / 24 for n in range(24)] + [1 + n / 8 for n in range(24)]
    return {"path": path, "cut_frames": [24], "num_frames": 48, "timestamps": timestamps}


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory) -> dict[str, Path]:
    """Files ingest must reject, and one good video: name -> path."""
    folder = tmp_path_factory.mktemp("bad_videos")
    good = encode_source(folder / "good.mp4", "testsrc2=size=64x48:rate=12", 12)
    truncated = folder / "truncated.mp4"
    # the moov atom sits at the end of an ffmpeg mp4, so the first half is unreadable
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    zero = folder / "zero_byte.mp4"
    zero.write_bytes(b"")
    text = folder / "text.mp4"
    text.write_text("<html><body>404 not found</body></html>\n" * 20)
    audio = folder / "audio_only.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(audio))
    one_frame = encode_source(folder / "one_frame.mp4", "testsrc2=size=64x48:rate=12", 1)
    huge = encode_source(folder / "too_big.mp4", "color=blue:size=4112x16:rate=4", 2)
    return {
        "good": good, "truncated": truncated, "zero_byte": zero, "text": text,
        "audio_only": audio, "one_frame": one_frame, "too_big": huge,
    }  # fmt: skip


class FinishedRun(NamedTuple):
    workdir: Path
    layout: Layout
    seconds: float  # its wall time, one clean run of the whole tiny DAG


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> FinishedRun:
    """The whole tiny workflow (tests/workflow_run.py), run once for the session by real
    Snakemake. Tests only read it; a test that changes it works on a copy (copy_run)."""
    workdir = tmp_path_factory.mktemp("workflow")
    config = small_config(workdir)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    started = time.monotonic()
    run_snakemake(workdir)
    return FinishedRun(workdir, Layout(config), time.monotonic() - started)
