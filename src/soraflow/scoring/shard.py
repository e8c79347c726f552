"""The score step: a shard's clips get the scores the stage filters compare (motion, aesthetics).

It is its own job after the split, and its table joins the captioned clips when a stage's
index is built, so a scorer change never re-cuts or re-captions a clip. Each scored clip is
kept as a part beside the output table (core.resume): a killed job's retry scores only the rest.
"""

from __future__ import annotations

from pathlib import Path

from soraflow.core.progress import progress
from soraflow.core.resume import JobProgress, file_digest, input_signature, progress_folder
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
    model = input_signature(params["aesthetic_model"]) if params["aesthetic_model"] else None
    job = JobProgress(progress_folder(out_table), {"score": params, "model": model, "table": file_digest(table_path)})
    done = job.parts()
    todo = clips[~clips["id"].isin(list(done))]
    for row in progress(todo.itertuples(), desc="score", total=len(clips), initial=len(clips) - len(todo)):
        job.add(row.id, {
            "motion": motion_score(row.path) if row.num_frames > 1 else 0.0,
            "aes": scorer.score_clip(row.path, int(row.num_frames)) if scorer is not None else None,
        })
    done = job.parts()  # read back, as a retry reads them: the table is the same either way
    scores = [done[clip_id] for clip_id in clips["id"]]
    table.write(clips.assign(motion=[s["motion"] for s in scores], aes=[s["aes"] for s in scores]), out_table)
    job.remove()
