"""`snakemake -n` of the Open-Sora 1.0 preset, before and after a change: wall time and peak RSS (issue 21).

    .venv/bin/python benchmarks/bench_parse.py [--base REV] [--shards 100] [--repeats 3]

Every `snakemake -n` and every Slurm job step parses the workflow, which sizes each job from
the plan. "before" runs the command in a temporary `git worktree` of --base (its src/ on
PYTHONPATH, ahead of the venv's editable install of this tree), "after" in this working tree;
both with their own Snakefile, default config and preset, runs interleaved, medians reported.
The manifest holds --shards shards of the preset's data.shard_size videos; the preset's init
checkpoint is an empty file (nothing loads in a dry run). Peak memory is each run's own max
RSS, CPU its user + system time (os.wait4): on a shared machine CPU time is the steadier
figure. Each working directory is parsed twice: "first" reads and hashes the whole manifest
for the shard jobs' row digests, "again" (every later dry run, every Slurm job step) reads
the digests remembered in .snakemake/. Goal (issue 21): after < 3 s and < 300 MiB.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_dryrun import write_manifest
from tables import print_table

REPO = Path(__file__).resolve().parents[1]
PRESET = Path("presets/opensora-1.0.yaml")
BASE = "1c882bb3d161b238ac1c79049c8894928478d995"  # before issue 21: the plan built the STDiT with torch
GOAL_S, GOAL_MIB = 3.0, 300


def workdir(path: Path, manifest: Path) -> Path:
    """A run's directory: the preset's manifest and (empty) init checkpoint where it names them."""
    (path / "data").mkdir(parents=True)
    (path / "data" / "manifest.csv").symlink_to(manifest)
    (path / "pretrained_models").mkdir()
    (path / "pretrained_models" / "PixArt-XL-2-512x512.pth").write_bytes(b"")
    return path


def dry_run(tree: Path, directory: Path) -> dict:
    """One `snakemake -n` of the preset with `tree`'s workflow and package: wall and CPU s, peak MiB, jobs."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(tree / "Snakefile"), "--directory", str(directory),
           "--configfile", str(tree / PRESET), "-n", "--quiet", "rules", "--cores", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the max over all children
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if child.returncode != 0:
        raise SystemExit(f"snakemake -n failed in {tree}:\n{text[-3000:]}")
    total = re.search(r"^total\s+(\d+)\s*$", text, re.M)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
            "jobs": int(total.group(1)) if total else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the revision measured as 'before' (default: %(default).10s)")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    shard_size = yaml.safe_load((REPO / PRESET).read_text())["data"]["shard_size"]
    runs = {(variant, parse): [] for variant in ("before", "after") for parse in ("first", "again")}
    with tempfile.TemporaryDirectory(prefix="bench_parse_") as tmp:
        tmp = Path(tmp)
        manifest = write_manifest(tmp / "manifest.csv", args.shards * shard_size)
        worktree = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(worktree), base], cwd=REPO, check=True)
        try:
            trees = {"before": worktree, "after": REPO}
            for variant, tree in trees.items():  # untimed: byte-compiles each tree's sources
                dry_run(tree, workdir(tmp / f"warm_{variant}", manifest))
            for repeat in range(args.repeats):
                for variant, tree in trees.items():
                    directory = workdir(tmp / f"{variant}_{repeat}", manifest)
                    for parse in ("first", "again"):
                        r = dry_run(tree, directory)
                        runs[variant, parse].append(r)
                        print(f"  {variant}, {parse}: {r['wall_s']:.2f} s ({r['cpu_s']:.2f} s CPU), "
                              f"{r['peak_mib']:.0f} MiB, {r['jobs']} jobs", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=True)
    median = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    rows = []
    for parse in ("first", "again"):
        before, after = median["before", parse], median["after", parse]
        rows += [
            (f"wall s, {parse}", f"{before['wall_s']:.2f}", f"{after['wall_s']:.2f}",
             f"{after['wall_s'] / before['wall_s']:.2f}", f"< {GOAL_S:g} s: {'yes' if after['wall_s'] < GOAL_S else 'NO'}"),
            (f"CPU s, {parse}", f"{before['cpu_s']:.2f}", f"{after['cpu_s']:.2f}", f"{after['cpu_s'] / before['cpu_s']:.2f}", ""),
            (f"peak RSS MiB, {parse}", f"{before['peak_mib']:.0f}", f"{after['peak_mib']:.0f}",
             f"{after['peak_mib'] / before['peak_mib']:.2f}",
             f"< {GOAL_MIB} MiB: {'yes' if after['peak_mib'] < GOAL_MIB else 'NO'}"),
        ]  # fmt: skip
    rows.append(("jobs", f"{median['before', 'first']['jobs']:,.0f}", f"{median['after', 'first']['jobs']:,.0f}", "", ""))
    print()
    print_table(("measure (median)", f"before ({base})", "after (working tree)", "after / before", "goal"), rows)
    print(f"\n(presets/opensora-1.0.yaml, {args.shards} shards of {shard_size:,} videos, {args.repeats} runs each, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
