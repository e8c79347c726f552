"""Captions per second: batched (batch 8) vs one by one, tiny local LLaVA, same clips, one run.

    .venv/bin/python benchmarks/bench_caption.py [--clips 32] [--max-new-tokens 24] [--threads 1]

Both passes go through `caption_shard` (frame decode, processor, generate, cleaning, parts
on disk) on the same clip table, with the default config's caption settings; only
batch_size differs. The model is loaded and warmed up once before timing. Goal (issue 4):
batched >= 3x one by one.

On a shared 2-core machine, 2 torch threads can be 10x slower than 1: OpenMP workers wait
on each other while other processes hold the cores. Compare like with like (--threads).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from soraflow.data import table
from soraflow.data.video import write_video
from soraflow.demo.models import build_tiny_llava
from soraflow.scoring.caption import caption_shard, load_captioner
from soraflow.workflow.settings import with_defaults

REPO = Path(__file__).resolve().parents[1]


def make_clips(folder: Path, count: int, frames: int = 24, size: int = 96) -> Path:
    """`count` short clips of moving colour gradients (different per clip) and their table."""
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    rows = []
    for k in range(count):
        clip = torch.stack(
            [torch.stack([(xs * (k + 1) + 5 * t) % 256, (ys * 3 + 7 * k + 3 * t) % 256, (xs + ys + 11 * k) % 256], -1)
             for t in range(frames)]  # fmt: skip
        ).to(torch.uint8)
        path = folder / f"clip{k:03d}.mp4"
        write_video(path, clip, fps=24)
        rows.append({"id": f"clip{k:03d}", "video_id": f"v{k}", "url": str(path), "path": str(path), "num_frames": frames})
    table_path = folder / "clips.parquet"
    table.write(pd.DataFrame(rows), table_path)
    return table_path


def timed_pass(table_path: Path, out_dir: Path, params: dict) -> tuple[float, pd.DataFrame]:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    caption_shard(table_path, out_dir / "captioned.parquet", out_dir / "rejects.parquet", params)
    return time.perf_counter() - started, table.read(out_dir / "captioned.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's caption.max_new_tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = with_defaults(yaml.safe_load((REPO / "workflow_config.yaml").read_text()))["caption"]
    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        tmp = Path(tmp)
        model = str(build_tiny_llava(tmp / "tiny-llava"))
        params = {**config, "model": model}
        if args.max_new_tokens:
            params["max_new_tokens"] = args.max_new_tokens
        table_path = make_clips(tmp / "clips", args.clips)
        load_captioner(model)
        timed_pass(make_clips(tmp / "warmup", 8), tmp / "warm", {**params, "batch_size": 8})  # warm-up, untimed
        results = {}
        for batch_size in (1, 8):  # same clips, same process, one after the other
            seconds, captioned = timed_pass(table_path, tmp / f"b{batch_size}", {**params, "batch_size": batch_size})
            results[batch_size] = (seconds, captioned)
            print(f"  batch {batch_size}: {args.clips / seconds:.2f} captions/s", flush=True)
    one_s, one = results[1]
    batch_s, batched = results[8]
    same = int((one.set_index("id")["text"] == batched.set_index("id")["text"]).sum())
    print()
    print("| mode | clips | seconds | captions/s | speedup |")
    print("|---|---|---|---|---|")
    print(f"| one by one (batch 1) | {len(one)} | {one_s:.2f} | {len(one) / one_s:.2f} | 1.00x |")
    print(f"| batched (batch 8) | {len(batched)} | {batch_s:.2f} | {len(batched) / batch_s:.2f} | {one_s / batch_s:.2f}x |")
    print(f"\n(goal: >= 3x; {params['max_new_tokens']} new tokens per caption, greedy; identical captions "
          f"batched vs one by one: {same}/{len(one)}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
