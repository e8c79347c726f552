"""Progress bars for every step that takes more than a few seconds.

Jobs write stderr to their log under logs/, so away from a terminal the bar redraws
only every few seconds instead of filling the log.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

# shard jobs: "split: 40% 4/10 videos [00:12 elapsed, ETA 00:18, 0.33 videos/s, 1.25 clips/s, 2.1MB/s]"
SHARD_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} videos [{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"


def progress(iterable=None, desc: str = "", total: int | None = None, **options) -> tqdm:
    interval = 0.5 if sys.stderr.isatty() else 10
    return tqdm(iterable, desc=desc, total=total, mininterval=interval, dynamic_ncols=True, **options)


class ShardProgress:
    """A shard job's progress line: videos done of the shard, videos/s, clips/s, bytes/s and an ETA.

    Videos/s and the ETA are tqdm's (smoothed); clips/s and bytes/s are averages since the start.
    Call `advance` once per finished video, in any order (workers finish out of order); `done`
    videos were finished by an earlier attempt of the job (they count, but not in the rates)."""

    def __init__(self, total: int, desc: str, done: int = 0):
        self.bar = progress(total=total, initial=done, desc=desc, unit=" videos", bar_format=SHARD_FORMAT)
        self.clips = 0
        self.bytes = 0

    def advance(self, clips: int = 0, nbytes: int = 0) -> None:
        self.clips += clips
        self.bytes += nbytes
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        rates = [f"{self.clips / elapsed:.2f} clips/s"] if self.clips else []  # ingest makes no clips
        rates.append(tqdm.format_sizeof(self.bytes / elapsed, "B/s"))
        self.bar.set_postfix_str(", ".join(rates), refresh=False)
        self.bar.update(1)

    def __enter__(self) -> ShardProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
