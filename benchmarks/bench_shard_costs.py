"""Per-item costs of the CPU shard jobs, which size their Slurm runtime and memory (issue 23).

    .venv/bin/python benchmarks/bench_shard_costs.py [--seconds 60] [--skip-aesthetic]

- split: a 1280x720, 30 fps H.264 video of `--seconds` seconds (scenes of 4 s from ffmpeg's
  test sources) through `split_shard` with the Open-Sora 1.0 preset's split settings (5 s
  pieces, shorter side 512), by its detector (TransNetV2) and by Open-Sora 1.0's (content), one
  worker (`split.threads` 1): wall and CPU seconds per second of source video, and the peak RSS
  of the job and of its largest ffmpeg.
- score: the clips that split made, through `score_shard` with the preset's score settings
  (motion, OCR on 3 frames, pHash; no aesthetic model): wall seconds per clip.
- aesthetic: Open-Sora's aesthetic scorer at full size (CLIP ViT-L/14 at 224 px and the LAION
  MLP head, random weights, built by soraflow.demo.models' builder) on one clip: wall seconds per
  clip for its 3 frames, torch on one thread (a score job's one core).
- progress parts: 10,000 clip rows written as core.resume parts, read back and assembled into a
  clip table: seconds per part, and the memory a row costs the job (RSS growth per row).

The machine is shared: note the load average printed with the table.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from tables import print_table

from soraflow.core.resume import JobProgress
from soraflow.data import table
from soraflow.data.ingest import ingest_shard
from soraflow.data.split import split_shard
from soraflow.scoring.shard import score_shard
from soraflow.workflow.settings import stages_as_listed, with_defaults

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["testsrc2", "mandelbrot", "smptebars", "life", "testsrc", "rgbtestsrc", "cellauto"]
SCENE_S = 4


def preset() -> dict:
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    for key, value in yaml.safe_load((REPO / "presets" / "opensora-1.0.yaml").read_text()).items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    stages_as_listed(config, [REPO / "presets" / "opensora-1.0.yaml"])
    return with_defaults(config)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def hd_video(path: Path, seconds: int) -> Path:
    count = seconds // SCENE_S
    inputs = [arg for k in range(count) for arg in ("-f", "lavfi", "-i", f"{SOURCES[k % len(SOURCES)]}=size=1280x720:rate=30")]
    chains = [f"[{k}:v]trim=end_frame={30 * SCENE_S},setpts=PTS-STARTPTS,format=yuv420p,setsar=1[v{k}]" for k in range(count)]
    graph = ";".join(chains) + ";" + "".join(f"[v{k}]" for k in range(count)) + f"concat=n={count}:v=1:a=0[out]"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *inputs, "-filter_complex", graph, "-map", "[out]",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)], check=True)  # fmt: skip
    return path


def bench_split(work: Path, config: dict, seconds: int) -> tuple[list, Path]:
    source = hd_video(work / "hd.mp4", seconds)
    table.write(pd.DataFrame({"id": ["hd"], "video_id": ["hd"], "url": [str(source)]}), work / "manifest.parquet")
    ingest_shard(work / "manifest.parquet", work / "raw", work / "videos.parquet", work / "rejects_ingest.parquet",
                 config["ingest"])
    rows = []
    # the preset's detector, then Open-Sora 1.0's; the score bench takes the preset's clips
    for detector, threshold, out in (("transnetv2", 0.5, "clips"), ("content", 27.0, "clips_content")):
        params = {**config["split"], "detector": detector, "threshold": threshold, "threads": 1}
        wall, cpu = time.perf_counter(), cpu_seconds()
        split_shard(work / "videos.parquet", work / out, work / f"{out}.parquet", work / f"rejects_{out}.parquet", params)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        clips = len(table.read(work / f"{out}.parquet"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ffmpeg_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows.append((f"split, {detector} (1 worker)", f"{seconds} s of 1280x720 30 fps, {clips} clips", f"{wall:.1f}",
                     f"{cpu:.1f}", f"**{wall / seconds:.3f} s per video-second** ({cpu / seconds:.3f} CPU s)",
                     f"job {peak:.0f}, largest ffmpeg {ffmpeg_peak:.0f}"))  # fmt: skip
    return rows, work / "clips.parquet"


def bench_score(work: Path, config: dict, clips_table: Path) -> list:
    clips = len(table.read(clips_table))
    wall, cpu = time.perf_counter(), cpu_seconds()
    score_shard(clips_table, work / "scored.parquet", {**config["score"], "aesthetic_model": None})
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return [("score, the preset's (motion, OCR, pHash)", f"{clips} clips of <= 5 s at 512 px", f"{wall:.1f}",
             f"{cpu:.1f}", f"**{wall / clips:.3f} s per clip** ({cpu / clips:.3f} CPU s)", "")]


def bench_aesthetic(work: Path, clips_table: Path) -> list:
    import torch

    from soraflow.demo.models import build_tiny_aesthetic
    from soraflow.scoring.aesthetic import load_scorer

    torch.set_num_threads(1)
    # CLIP ViT-L/14 (openai/clip-vit-large-patch14's vision tower) and the LAION aesthetic MLP
    vit_l14 = {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "layers": 24, "heads": 16,
               "projection_dim": 768, "head_hidden": [1024, 128, 64, 16]}  # fmt: skip
    scorer = load_scorer(str(build_tiny_aesthetic(work / "vit-l14-aesthetic", vit_l14)))
    row = table.read(clips_table).iloc[0]
    scorer.score_clip(row.path, int(row.num_frames))  # warm-up
    repeats = 3
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(repeats):
        scorer.score_clip(row.path, int(row.num_frames))
    wall, cpu = (time.perf_counter() - wall) / repeats, (cpu_seconds() - cpu) / repeats
    return [("aesthetic, CLIP ViT-L/14 + MLP, 1 thread", "3 frames of one clip", f"{wall:.1f}", f"{cpu:.1f}",
             f"**{wall:.2f} s per clip**", "")]


def bench_parts(work: Path, rows: int = 10_000) -> list:
    clip = {"video_id": "v", "url": "https://example.org/v.mp4", "raw_path": "/data/raw/v.mp4", "codec": "h264",
            "rotation": 0, "start_frame": 0, "end_frame": 150, "start_s": 0.0, "end_s": 5.0, "num_frames": 150,
            "fps": 30.0, "width": 910, "height": 512, "aspect_ratio": 0.5626, "resolution": 465920,
            "duration_s": 5.0, "text_manifest": "a caption of about the length Open-Sora's manifests carry " * 2}  # fmt: skip
    before = rss_mib()
    progress = JobProgress(work / "parts.progress", {"bench": 1})
    wall = time.perf_counter()
    for k in range(rows):
        progress.add(f"c{k}", {"rows": [{**clip, "id": f"c{k}", "path": f"/data/clips/00000/c{k}.mp4"}], "rejects": []})
    per_part = (time.perf_counter() - wall) / rows
    finished = progress.parts()
    clips = pd.DataFrame([row for k in range(rows) for row in finished[f"c{k}"]["rows"]])
    table.write(clips, work / "assembled.parquet")
    grown = rss_mib() - before
    return [("progress parts", f"{rows:,} clip rows", "", "", f"{per_part * 1000:.2f} ms per part written",
             f"+{grown:.0f} MiB held: **{grown * 1024 / rows:.1f} KiB per row**")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="length of the split's source video")
    parser.add_argument("--skip-aesthetic", action="store_true", help="leave out the ViT-L/14 scorer (1.2 GB of weights)")
    args = parser.parse_args()
    config = preset()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = bench_parts(work)
        split_rows, clips = bench_split(work, config, args.seconds)
        rows += split_rows + bench_score(work, config, clips)
        if not args.skip_aesthetic:
            rows += bench_aesthetic(work, clips)
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    print_table(("job", "items", "wall s", "CPU s", "per item", "peak RSS MiB"), rows)


if __name__ == "__main__":
    main()
