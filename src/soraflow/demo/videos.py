"""Synthetic demo videos with hard cuts at known frames, made from ffmpeg's test sources.

Each video is one scene per lavfi source (testsrc2, mandelbrot, smptebars, ...), every
scene exactly `round(scene_seconds * fps)` frames long, so the scene detector's output
can be checked against the frames where the sources switch.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from soraflow.core.atomic import atomic_path


def scene_frames(spec: dict) -> int:
    """Frames in each scene of a demo video spec."""
    frames = round(spec["scene_seconds"] * spec["fps"])
    if frames < 1:
        raise ValueError(f"demo video {spec['name']!r}: scene_seconds * fps must be at least one frame")
    return frames


# sources that fill their first frame at random: seeded, so two runs make the same bytes
SEEDED_SOURCES = {"life", "cellauto"}


def demo_cut_frames(spec: dict) -> list[int]:
    """Frame indices where a new scene starts (the hard cuts), first scene excluded."""
    frames = scene_frames(spec)
    return [k * frames for k in range(1, len(spec["sources"]))]


def _concat_command(spec: dict, out_path: Path) -> list[str]:
    size, fps, frames = spec["size"], spec["fps"], scene_frames(spec)
    inputs, chains = [], []
    for k, source in enumerate(spec["sources"]):
        seed = ":seed=0" if source in SEEDED_SOURCES else ""
        inputs += ["-f", "lavfi", "-i", f"{source}=size={size}x{size}:rate={fps}{seed}"]
        # trim by frame count (not seconds) so each cut lands on an exact frame
        chains.append(f"[{k}:v]trim=end_frame={frames},setpts=PTS-STARTPTS,format=yuv420p,setsar=1[v{k}]")
    labels = "".join(f"[v{k}]" for k in range(len(spec["sources"])))
    graph = ";".join(chains) + f";{labels}concat=n={len(spec['sources'])}:v=1:a=0[out]"
    return [
        "ffmpeg", "-nostdin", "-v", "error", "-y", *inputs,
        "-filter_complex", graph, "-map", "[out]",
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-r", str(fps),
        "-f", "mp4", str(out_path),
    ]  # fmt: skip


def make_demo_videos(out_dir: str | Path, videos: list[dict]) -> list[Path]:
    """Write `{out_dir}/{name}.mp4` for each spec (H.264 yuv420p); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in videos:
        if not spec.get("sources"):
            raise ValueError(f"demo video {spec.get('name')!r}: needs at least one source")
        path = out_dir / f"{spec['name']}.mp4"
        with atomic_path(path, keep_suffix=True) as tmp:
            result = subprocess.run(_concat_command(spec, tmp), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"ffmpeg failed making demo video {path}: {result.stderr.strip()}")
        paths.append(path)
    return paths
