"""`snakemake -n` on generated manifests of 1M and 10M videos: wall time and peak memory.

    .venv/bin/python benchmarks/bench_dryrun.py [--videos 1000000 10000000] [--shard-size 1000]

Each run is a fresh `python -m snakemake -n` in a temp working directory with an override
config naming the generated manifest (the rest is workflow_config.yaml). Peak memory is the
child's max RSS (resource.getrusage(RUSAGE_CHILDREN), one child per run). Goals (issue 3):
1M < 10 s and < 1 GiB; 10M < 30 s.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from tables import print_table

REPO = Path(__file__).resolve().parents[1]
GOALS = {1_000_000: (10.0, 1.0), 10_000_000: (30.0, None)}


def write_manifest(path: Path, videos: int) -> Path:
    """url,id rows written in 1M-row blocks (a 10M manifest is ~0.5 GB)."""
    block = 1_000_000
    with open(path, "w") as handle:
        handle.write("url,id\n")
        for first in range(0, videos, block):
            rows = range(first, min(first + block, videos))
            handle.write("".join(f"https://videos.example.com/v{i:08d}.mp4,v{i:08d}\n" for i in rows))
    return path


def dry_run(workdir: Path, manifest: Path, shard_size: int) -> dict:
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    override = {"data": {**config["data"], "manifest": str(manifest), "shard_size": shard_size}}
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "override.yaml"), "-n", "--quiet", "rules", "--cores", "1"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise SystemExit(f"snakemake -n failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    total = re.search(r"^total\s+(\d+)\s*$", result.stdout, re.M)
    jobs = int(total.group(1)) if total else 0
    # RUSAGE_CHILDREN is the max over all children so far: it only rises, so runs go small to large
    return {"wall_s": wall, "peak_gib": max(peak_kib, before) / 2**20, "jobs": jobs, "peak_is_max_so_far": peak_kib == before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--shard-size", type=int, nargs="+", default=[1000])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_dryrun_") as tmp:
        tmp = Path(tmp)
        for videos in sorted(args.videos):
            started = time.perf_counter()
            manifest = write_manifest(tmp / f"manifest_{videos}.csv", videos)
            made = time.perf_counter() - started
            for shard_size in args.shard_size:
                workdir = tmp / f"run_{videos}_{shard_size}"
                workdir.mkdir()
                r = dry_run(workdir, manifest, shard_size)
                wall_goal, mem_goal = GOALS.get(videos, (None, None))
                ok = (wall_goal is None or r["wall_s"] < wall_goal) and (mem_goal is None or r["peak_gib"] < mem_goal)
                rows.append((videos, shard_size, -(-videos // shard_size), r["jobs"], r["wall_s"], r["peak_gib"],
                             f"{manifest.stat().st_size / 2**20:.0f} MiB in {made:.1f} s", "yes" if ok else "NO"))  # fmt: skip
                print(f"  {videos:,} videos / shard {shard_size}: {r['wall_s']:.1f} s, {r['peak_gib']:.2f} GiB", flush=True)
    print()
    header = ("videos", "shard_size", "shards", "jobs", "wall_s", "peak_GiB", "manifest", "goal met")
    print_table(header, [(f"{v:,}", s, f"{n:,}", f"{j:,}", f"{w:.1f}", f"{m:.2f}", made, ok)
                         for v, s, n, j, w, m, made, ok in rows])
    print(f"\n(goals: 1M < 10 s and < 1 GiB; 10M < 30 s; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
