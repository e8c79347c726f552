"""The score step: a shard's clips get the scores the stage filters compare (motion, aesthetics).

It is its own job after the split, and its table joins the captioned clips when a stage's
index is built, so a scorer change never re-cuts or re-captions a clip.
"""

from __future__ import annotations

from pathlib import Path

from soraflow.core.progress import progress
from soraflow.data import table
from soraflow.scoring.motion import motion_score


def score_shard(table_path: str | Path, out_table: str | Path, params: dict) -> None:
    """A clip table with motion (mean optical flow; 0 for one-frame clips) and aes (null
    without score.aesthetic_model) filled for every clip of `table_path`."""
    scorer = None
    if params["aesthetic_model"]:
        from soraflow.scoring.aesthetic import load_scorer

        scorer = load_scorer(params["aesthetic_model"])
    clips = table.read(table_path)
    motion, aes = [], []
    for row in progress(clips.itertuples(), desc="score", total=len(clips)):
        motion.append(motion_score(row.path) if row.num_frames > 1 else 0.0)
        aes.append(scorer.score_clip(row.path, int(row.num_frames)) if scorer is not None else None)
    table.write(clips.assign(motion=motion, aes=aes), out_table)
