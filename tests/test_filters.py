import numpy as np
import pandas as pd
import pytest
from conftest import encode_source

from soraflow.scoring.filters import apply_filters
from soraflow.scoring.motion import motion_score


def clips(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"id": [f"c{i}" for i in range(n)], "url": [f"u{i}" for i in range(n)], **columns})


def test_each_threshold_keeps_and_rejects_with_a_reason():
    df = clips(
        duration_s=[0.4, 2.0, 6.0, 2.0],
        resolution=[4096, 65536, 65536, 65536],
        aspect_ratio=[1.0, 0.5625, 0.5625, 3.0],
        motion=[0.5, 0.5, 0.5, 0.5],
        aes=[5.0, 5.0, 5.0, 5.0],
    )
    kept, rejects = apply_filters(
        df,
        {"min_seconds": 0.5, "max_seconds": 5.0, "min_resolution": 9216, "min_aspect_ratio": 0.25,
         "max_aspect_ratio": 2.0, "min_motion": 0.1, "min_aes": 4.5},
    )  # fmt: skip
    assert kept["id"].tolist() == ["c1"]
    assert kept.index.tolist() == [0]
    assert rejects == [
        {"id": "c0", "url": "u0", "stage": "filter", "reason": "duration_s 0.4 < min_seconds 0.5; resolution 4096 < min_resolution 9216"},
        {"id": "c2", "url": "u2", "stage": "filter", "reason": "duration_s 6 > max_seconds 5"},
        {"id": "c3", "url": "u3", "stage": "filter", "reason": "aspect_ratio 3 > max_aspect_ratio 2"},
    ]


def test_boundaries_are_inclusive_and_none_means_no_filter():
    df = clips(duration_s=[0.5, 5.0], motion=[np.nan, np.nan])
    kept, rejects = apply_filters(df, {"min_seconds": 0.5, "max_seconds": 5.0, "min_motion": None})
    assert kept["id"].tolist() == ["c0", "c1"] and rejects == []


def test_a_threshold_on_an_unfilled_column_is_an_error_naming_the_key():
    df = clips(duration_s=[1.0, 2.0], aes=[None, None])
    with pytest.raises(ValueError, match="filter 'min_aes' needs column 'aes'"):
        apply_filters(df, {"min_aes": 4.5})
    with pytest.raises(ValueError, match="filter 'min_motion' needs column 'motion'"):
        apply_filters(df, {"min_motion": 0.1})  # column absent altogether
    with pytest.raises(ValueError, match=r"unknown filter keys \['min_sharpness'\]"):
        apply_filters(df, {"min_sharpness": 1})


def test_a_clip_missing_a_value_is_rejected():
    kept, rejects = apply_filters(clips(aes=[5.0, None]), {"min_aes": 4.5})
    assert kept["id"].tolist() == ["c0"]
    assert rejects[0]["reason"] == "aes missing for min_aes"


def test_empty_table_passes_through():
    kept, rejects = apply_filters(clips(duration_s=[]), {"min_seconds": 1.0, "min_aes": 4.5})
    assert kept.empty and rejects == []


def test_motion_ranks_static_slow_and_fast(tmp_path):
    static = encode_source(tmp_path / "static.mp4", "smptebars=size=128x96:rate=12", 12)
    # a pattern scrolling sideways 1 and 4 pixels per frame
    pattern = "testsrc=size=256x96:rate=12"
    slow = encode_source(tmp_path / "slow.mp4", pattern, 12, "-vf", "crop=128:96:n:0")
    fast = encode_source(tmp_path / "fast.mp4", pattern, 12, "-vf", "crop=128:96:4*n:0")
    scores = [motion_score(p) for p in (static, slow, fast)]
    assert scores[0] < 0.05
    assert 0.5 < scores[1] < 2.5  # about 1 pixel per frame at 128 px width (plus testsrc's own animation)
    assert scores[2] > 2 * scores[1]


def test_motion_needs_two_frames(bad_videos):
    with pytest.raises(ValueError, match="one_frame.mp4: motion needs at least 2 frames, got 1"):
        motion_score(bad_videos["one_frame"])


def test_a_shard_without_clips_filters_to_an_empty_table_with_its_columns():
    """A shard whose only video was a reject has an empty clip table; its stages still run."""
    from soraflow.data import table

    kept, rejects = apply_filters(table.empty(), {"min_seconds": 0.5})
    assert kept.empty and list(kept.columns) == list(table.empty().columns) and rejects == []


def test_scores_join_by_clip_id_and_an_empty_shard_joins_to_nothing(tmp_path):
    from soraflow.data import table
    from soraflow.scoring.filters import join_scores

    table.write(pd.DataFrame({"id": ["a", "b"], "duration_s": [1.0, 2.0]}), tmp_path / "clips.parquet")
    table.write(pd.DataFrame({"id": ["b", "a"], "motion": [0.5, 0.25], "aes": [6.0, 4.0]}), tmp_path / "scored.parquet")
    joined = join_scores(table.read(tmp_path / "clips.parquet"), table.read(tmp_path / "scored.parquet"))
    assert joined["motion"].tolist() == [0.25, 0.5] and joined["aes"].tolist() == [4.0, 6.0]
    table.write(table.empty(), tmp_path / "none.parquet")  # a shard whose only video was a reject
    assert join_scores(table.read(tmp_path / "none.parquet"), table.read(tmp_path / "none.parquet")).empty
