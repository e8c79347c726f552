"""The dedup step's search over synthetic pHashes: time at 10k, 100k and 1M clips (issue 24).

    .venv/bin/python benchmarks/bench_dedup.py [--sizes 10000 100000 1000000] [--thresholds 2 4 6 8 12]
                                               [--workers 1 2] [--budget-s 120]

Each clip has 4 random 64-bit frame hashes (a different shot differs in about 32 bits a frame);
10% are re-encodes of an earlier clip (0 to 6 bits flipped a frame, chains included) and 1% exact
copies. Timed: soraflow.scoring.dedup.near_duplicates on the clip table (id, phash strings,
duration, aes), from parsing the strings to the dropped clips, wall and CPU seconds, with
--workers threads over the bands. At each size the thresholds run from the smallest; once a run
takes longer than --budget-s the larger thresholds (slower still: bands of about 64 / threshold
bits meet by chance more often) are skipped. Goal: under a minute at 1M on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from tables import print_table

from soraflow.scoring.dedup import near_duplicates

FRAMES = 4


def synthetic_clips(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=(n, FRAMES), dtype=np.uint64)
    copies = rng.choice(np.arange(1, n), size=n // 10, replace=False)
    sources = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier clip, maybe a copy itself
    for frame in range(FRAMES):
        flips = np.zeros(len(copies), dtype=np.uint64)
        for _ in range(6):  # up to 6 bits a frame (a bit may flip back)
            bit = rng.integers(0, 64, size=len(copies)).astype(np.uint64)
            flips ^= np.where(rng.random(len(copies)) < 0.5, np.uint64(1) << bit, np.uint64(0))
        for copy, source, flip in zip(copies, sources, flips):
            hashes[copy, frame] = hashes[source, frame] ^ flip
    exact = rng.choice(n, size=n // 100, replace=False)
    hashes[exact] = hashes[rng.integers(0, n, size=len(exact))]
    strings = [" ".join(f"{int(h):016x}" for h in row) for row in hashes]
    return pd.DataFrame({"id": [f"clip{k:07d}" for k in range(n)], "phash": strings,
                         "duration_s": rng.choice([2.0, 4.0, 8.0], size=n), "aes": rng.random(n) * 10})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[2, 4, 6, 8, 12])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budget-s", type=float, default=120.0)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        clips = synthetic_clips(n)
        for workers in args.workers:
            over_budget = False
            for threshold in sorted(args.thresholds):
                if over_budget:
                    rows.append((f"{n:,}", f"{threshold:g}", workers, "skipped", "", ""))
                    continue
                wall, cpu = time.perf_counter(), time.process_time()
                dropped = near_duplicates(clips, threshold, workers=workers)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                rows.append((f"{n:,}", f"{threshold:g}", workers, f"{wall:.1f}", f"{cpu:.1f}", f"{len(dropped):,}"))
                print(*rows[-1], flush=True)
                over_budget = wall > args.budget_s
    print_table(("clips", "max_distance (mean bits)", "workers", "wall s", "CPU s", "dropped"), rows)


if __name__ == "__main__":
    main()
