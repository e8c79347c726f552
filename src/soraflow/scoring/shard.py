"""The score steps: a shard's clips get the scores the stage filters compare.

`score_shard` (motion, aesthetics, text area, perceptual hashes) is its own job after the split,
and `match_shard` (caption-video match, which needs the caption) one after captioning; their
tables join the captioned clips when a stage's index is built, so a scorer change never re-cuts
or re-captions a clip, and a caption change re-scores only the match. Each scored clip is kept
as a part beside the output table (core.resume): a killed job's retry scores only the rest.
"""

from __future__ import annotations

from pathlib import Path

import av

from soraflow.core.progress import progress
from soraflow.core.resume import JobProgress, file_digest, input_signature, progress_folder
from soraflow.data import table, video
from soraflow.scoring.motion import motion_score
from soraflow.scoring.phash import clip_phash
from soraflow.scoring.text_area import text_area

SCORE_STEP_COLUMNS = ["motion", "aes", "text_area", "phash"]


def _scores(row, scorer, params: dict) -> dict:
    """A clip's scores, or the reason it has none: its file does not decode."""
    num_frames = int(row.num_frames)
    try:
        return {"motion": motion_score(row.path) if num_frames > 1 else 0.0,
                "aes": scorer.score_clip(row.path, num_frames) if scorer is not None else None,
                "text_area": text_area(row.path, num_frames, **params["text_area"]),
                "phash": clip_phash(row.path, num_frames, **params["phash"])}  # fmt: skip
    except (ValueError, av.FFmpegError) as error:
        if not video.is_video_fault(error):
            raise  # the machine's fault (a clip file gone, an I/O error): fail, reject nothing
        return {"reason": f"cannot score: {error}"}


def score_shard(table_path: str | Path, out_table: str | Path, params: dict, rejects_path: str | Path | None = None) -> None:
    """A clip table with motion (mean optical flow; 0 for one-frame clips), aes (null
    without score.aesthetic_model), text_area (OCR) and phash filled for every clip of
    `table_path` that decodes; a clip
    that does not is left out, and named in the rejects table (with rejects_path; without one
    it is an error)."""
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
        job.add(row.id, _scores(row, scorer, params))
    done = job.parts()  # read back, as a retry reads them: the table is the same either way
    parts = [done[clip_id] for clip_id in clips["id"]]
    rejects = [{"id": clip_id, "url": url, "stage": "score", "reason": part["reason"]}
               for clip_id, url, part in zip(clips["id"], clips["url"], parts) if "reason" in part]  # fmt: skip
    if rejects and rejects_path is None:
        raise ValueError(f"{table_path}: clips that do not decode: {rejects[:3]}")
    decoded = [part for part in parts if "reason" not in part]
    kept = clips[["reason" not in part for part in parts]]
    table.write(kept.assign(**{column: [part[column] for part in decoded] for column in SCORE_STEP_COLUMNS}), out_table)
    if rejects_path is not None:
        table.write_rejects(rejects, rejects_path)
    job.remove()


def match_shard(table_path: str | Path, out_table: str | Path, params: dict) -> None:
    """The clips of a captioned table `table_path` with their caption-video match (id, match):
    null without score.match.model, and for a clip whose file no longer decodes (the stage
    filter min_match rejects a clip without a value)."""
    model_ref, frames = params["match"]["model"], params["match"]["frames"]
    clips = table.read(table_path)
    model = input_signature(model_ref) if model_ref else None
    job = JobProgress(progress_folder(out_table), {"match": params, "model": model, "table": file_digest(table_path)})
    done = job.parts()
    todo = clips[~clips["id"].isin(list(done))]
    scorer = None
    if model_ref:
        from soraflow.scoring.match import load_scorer

        scorer = load_scorer(model_ref)
    for row in progress(todo.itertuples(), desc="match", total=len(clips), initial=len(clips) - len(todo)):
        value = None
        if scorer is not None:
            try:
                value = scorer.score_clip(row.path, int(row.num_frames), str(row.text), frames)
            except (ValueError, av.FFmpegError) as error:
                if not video.is_video_fault(error):
                    raise  # the machine's fault: fail
        job.add(row.id, {"match": value})
    done = job.parts()
    table.write(clips[["id"]].assign(match=[done[clip_id]["match"] for clip_id in clips["id"]]), out_table)
    job.remove()
