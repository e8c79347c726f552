"""Clip filters (duration, resolution, aspect ratio, motion, aesthetics) and the motion score.

Open-Sora scores motion with UniMatch optical flow; on CPU we use OpenCV's Farneback flow
on a few downscaled frame pairs, which ranks static, slow and fast clips the same way.
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd

MOTION_WIDTH = 128  # flow is measured at this width, so scores compare across resolutions

# threshold key -> (column, comparison); a clip is kept when `value <op> threshold`
FILTERS = {
    "min_seconds": ("duration_s", ">="),
    "max_seconds": ("duration_s", "<="),
    "min_resolution": ("resolution", ">="),
    "min_aspect_ratio": ("aspect_ratio", ">="),
    "max_aspect_ratio": ("aspect_ratio", "<="),
    "min_motion": ("motion", ">="),
    "min_aes": ("aes", ">="),
}


def _gray_frames(path: Path) -> list[np.ndarray]:
    """Every frame as small grayscale images, MOTION_WIDTH wide."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"  # frame + slice threads
        for frame in container.decode(stream):
            height = max(2, round(frame.height * MOTION_WIDTH / frame.width))
            frames.append(frame.to_ndarray(format="gray", width=MOTION_WIDTH, height=height))
    return frames


def motion_score(path: str | Path, num_samples: int = 4) -> float:
    """Mean optical-flow magnitude (pixels per frame at 128 px width) over `num_samples`
    pairs of consecutive frames spread evenly over the clip."""
    frames = _gray_frames(Path(path))
    if len(frames) < 2:
        raise ValueError(f"{path}: motion needs at least 2 frames, got {len(frames)}")
    starts = sorted(set(np.linspace(0, len(frames) - 2, num_samples).round().astype(int).tolist()))
    magnitudes = []
    for i in starts:
        flow = cv2.calcOpticalFlowFarneback(frames[i], frames[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()))
    return float(np.mean(magnitudes))


def apply_filters(df: pd.DataFrame, thresholds: dict) -> tuple[pd.DataFrame, list[dict]]:
    """Keep the clips that pass every threshold; the others become rejects rows (stage 'filter').

    A threshold of None is no filter. A threshold whose column nobody filled (every value
    null) is an error naming the key, so a missing scoring step is never a silent no-op;
    a clip whose own value is missing is rejected.
    """
    unknown = sorted(set(thresholds) - set(FILTERS))
    if unknown:
        raise ValueError(f"unknown filter keys {unknown}; known: {sorted(FILTERS)}")
    failures = pd.Series([[] for _ in range(len(df))], index=df.index, dtype=object)
    for key, threshold in thresholds.items():
        if threshold is None:
            continue
        column, op = FILTERS[key]
        values = df[column] if column in df.columns else pd.Series(np.nan, index=df.index)
        if len(df) and values.isna().all():
            raise ValueError(f"filter {key!r} needs column {column!r}, which has no values in this table")
        passed = values >= threshold if op == ">=" else values <= threshold
        for index in df.index[~passed.fillna(False).astype(bool)]:
            value = values[index]
            failures[index].append(
                f"{column} missing" if pd.isna(value) else f"{column} {value:g} {'<' if op == '>=' else '>'} {key} {threshold:g}"
            )
    failed = failures.map(bool)
    rejects = [
        {"id": row["id"], "url": row.get("url"), "stage": "filter", "reason": "; ".join(failures[index])}
        for index, row in df[failed].iterrows()
    ]
    return df[~failed].reset_index(drop=True), rejects
