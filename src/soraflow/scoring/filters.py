"""Clip filters (duration, resolution, aspect ratio, motion, aesthetics, text area, caption
match) over a clip table.

Only pandas: the scores they compare were written by the score steps (soraflow.scoring.shard).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SCORE_COLUMNS = ["motion", "aes", "text_area", "phash"]  # written by the score step, joined here
MATCH_COLUMNS = ["match"]  # written by the match step, after captioning

# threshold key -> (column, comparison); a clip is kept when `value <op> threshold`
FILTERS = {
    "min_seconds": ("duration_s", ">="),
    "max_seconds": ("duration_s", "<="),
    "min_resolution": ("resolution", ">="),
    "min_aspect_ratio": ("aspect_ratio", ">="),
    "max_aspect_ratio": ("aspect_ratio", "<="),
    "min_motion": ("motion", ">="),
    "min_aes": ("aes", ">="),
    "max_text_area": ("text_area", "<="),
    "min_match": ("match", ">="),
}


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
                f"{column} missing for {key}" if pd.isna(value) else f"{column} {value:g} {'<' if op == '>=' else '>'} {key} {threshold:g}"
            )
    failed = failures.map(bool).astype(bool)  # stays a mask on an empty table (object dtype would select columns)
    rejects = [
        {"id": row["id"], "url": row.get("url"), "stage": "filter", "reason": "; ".join(failures[index])}
        for index, row in df[failed].iterrows()
    ]
    return df[~failed].reset_index(drop=True), rejects


def failed_filters(reason: str) -> list[str]:
    """The filter keys a 'filter' reject's reason names (apply_filters writes it)."""
    return [word for failure in reason.split("; ") for word in failure.split() if word in FILTERS]


def join_scores(clips: pd.DataFrame, scored: pd.DataFrame, matched: pd.DataFrame | None = None) -> pd.DataFrame:
    """`clips` with the score columns taken from `scored` and, when given, `matched` (by clip id)."""
    tables = [(scored, SCORE_COLUMNS)] + ([(matched, MATCH_COLUMNS)] if matched is not None else [])
    return clips.assign(**{column: clips["id"].map(scores.set_index("id")[column])
                           for scores, columns in tables for column in columns})  # fmt: skip
