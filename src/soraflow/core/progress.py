"""Progress bars for every step that takes more than a few seconds.

Jobs write stderr to their log under logs/, so away from a terminal the bar redraws
only every few seconds instead of filling the log.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, desc: str = "", total: int | None = None, **options) -> tqdm:
    interval = 0.5 if sys.stderr.isatty() else 10
    return tqdm(iterable, desc=desc, total=total, mininterval=interval, dynamic_ncols=True, **options)
