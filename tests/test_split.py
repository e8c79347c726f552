import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import section

from soraflow.data import table
from soraflow.data.ingest import ingest_shard
from soraflow.data.probe import probe
from soraflow.data.split import detect_scenes, output_size, plan_clips, split_shard, transnet_cuts
from soraflow.data.video import count_frames, read_frames
from soraflow.scoring.shard import score_shard

PARAMS = {
    "detector": "content",
    "threshold": 27.0,
    "min_scene_frames": 15,
    "min_seconds": 0.5,
    "max_seconds": 5.0,
    "fps": None,
    "shorter_side": None,
    "threads": 1,
}


def ingest(tmp_path, videos: dict) -> "Path":
    """Ingest {id: path} into an ingest table (the split's real input)."""
    shard = tmp_path / "shard.parquet"
    ids = list(videos)
    table.write(pd.DataFrame({"id": ids, "video_id": ids, "url": [str(p) for p in videos.values()]}), shard)
    out = tmp_path / "videos.parquet"
    ingest_shard(shard, tmp_path / "raw", out, tmp_path / "ingest_rejects.parquet", section("ingest", retries=0))
    assert table.read(tmp_path / "ingest_rejects.parquet").empty
    return out


def run_split(tmp_path, videos: dict, **overrides):
    out, rejects = tmp_path / "clips.parquet", tmp_path / "split_rejects.parquet"
    split_shard(ingest(tmp_path, videos), tmp_path / "clips", out, rejects, {**PARAMS, **overrides})
    return table.read(out), table.read(rejects)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_clips_decode_as_tabled(clips: pd.DataFrame):
    for clip in clips.itertuples():
        assert count_frames(clip.path) == clip.num_frames, clip.id


def test_clips_start_exactly_at_the_known_cuts(tmp_path, synthetic_cut_video):
    clips, rejects = run_split(tmp_path, {"cuts": synthetic_cut_video["path"]}, detector="adaptive", threshold=3.0)
    assert rejects.empty
    n = synthetic_cut_video["num_frames"]
    bounds = [0, *synthetic_cut_video["cut_frames"], n]
    assert list(zip(clips["start_frame"], clips["end_frame"])) == list(zip(bounds[:-1], bounds[1:]))
    assert clips["id"].tolist() == ["cuts_scene-000", "cuts_scene-001", "cuts_scene-002"]
    assert clips["path"].tolist() == [str(tmp_path / "clips" / f"{i}.mp4") for i in clips["id"]]
    assert clips["num_frames"].tolist() == [24, 24, 24]
    assert clips["start_s"].tolist() == [0.0, 1.0, 2.0] and clips["end_s"].tolist() == [1.0, 2.0, 3.0]
    assert (clips["video_id"] == "cuts").all() and (clips["raw_path"] == str(tmp_path / "raw" / "cuts.mp4")).all()
    assert_clips_decode_as_tabled(clips)

    # each clip holds exactly its source frames: frame by frame it matches them, and its first
    # and last frames match them better than the frames just across the cut (another scene)
    source = read_frames(synthetic_cut_video["path"]).float()
    for clip in clips.itertuples():
        frames = read_frames(clip.path).float()
        assert (frames - source[clip.start_frame : clip.end_frame]).abs().mean() < 4.0, clip.id
        if clip.start_frame > 0:
            own, across = (frames[0] - source[clip.start_frame]).abs().mean(), (frames[0] - source[clip.start_frame - 1]).abs().mean()
            assert own * 5 < across, clip.id
        if clip.end_frame < n:
            own, across = (frames[-1] - source[clip.end_frame - 1]).abs().mean(), (frames[-1] - source[clip.end_frame]).abs().mean()
            assert own * 5 < across, clip.id

    # the score step's motion column comes from optical flow: the bars scene is static, testsrc2 moves
    score_shard(tmp_path / "clips.parquet", tmp_path / "scored.parquet", section("score", aesthetic_model=None))
    scored = table.read(tmp_path / "scored.parquet")
    scores = ["motion", "text_area", "phash"]
    assert scored.drop(columns=scores).equals(clips.drop(columns=scores))  # scores added, nothing else
    motion = dict(zip(scored["id"], scored["motion"]))
    assert motion["cuts_scene-002"] < 0.05 < motion["cuts_scene-000"]
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == [f"{i}.mp4" for i in clips["id"]]


def test_variable_frame_rate_cut_is_found_by_frame_index(tmp_path, vfr_video):
    scenes, timestamps = detect_scenes(vfr_video["path"], PARAMS)
    assert scenes == [(0, 24), (24, 48)]
    assert timestamps == pytest.approx(vfr_video["timestamps"], abs=1e-3)

    clips, rejects = run_split(tmp_path, {"vfr": vfr_video["path"]})
    assert rejects.empty
    assert clips["start_frame"].tolist() == [0, 24] and clips["end_frame"].tolist() == [24, 48]
    assert clips["start_s"].tolist() == [0.0, 1.0] and clips["end_s"].tolist() == [1.0, 4.0]
    assert clips["duration_s"].tolist() == [1.0, 3.0]
    assert_clips_decode_as_tabled(clips)


def test_rotated_phone_video_comes_out_upright(tmp_path, rotated_video):
    clips, rejects = run_split(tmp_path, {"phone": rotated_video["path"]})
    assert rejects.empty
    assert clips["start_frame"].tolist() == [0, 24]
    first = clips.iloc[0]
    assert (first["width"], first["height"]) == rotated_video["display_size"] == (64, 96)
    info = probe(first["path"])
    assert (info["width"], info["height"], info["rotation"]) == (64, 96, 0)
    # stored left half was white: turned 90 degrees clockwise it is the top half
    frame = read_frames(first["path"], [0])[0].float().mean(dim=2)
    assert frame[:48].mean() > 200 and frame[48:].mean() < 50
    assert_clips_decode_as_tabled(clips)


def test_long_scenes_split_at_max_seconds_and_short_ones_dropped(tmp_path, synthetic_cut_video):
    # each 24-frame scene (1 s) is cut into 3 pieces of 8 frames with max_seconds 0.4
    clips, rejects = run_split(tmp_path, {"cuts": synthetic_cut_video["path"]}, max_seconds=0.4, min_seconds=0.3)
    assert rejects.empty
    assert list(zip(clips["start_frame"], clips["end_frame"])) == [(s, s + 8) for s in range(0, 72, 8)]
    assert clips["duration_s"].tolist() == [0.333] * 9
    assert_clips_decode_as_tabled(clips)

    # nothing reaches 1.5 s: every scene and the video are rejects, not an error
    clips, rejects = run_split(tmp_path / "again", {"cuts": synthetic_cut_video["path"]}, min_seconds=1.5)
    assert clips.empty
    assert rejects["id"].tolist() == [
        "cuts_frames-000000-000024", "cuts_frames-000024-000048", "cuts_frames-000048-000072", "cuts"
    ]
    assert (rejects["stage"] == "split").all()
    assert rejects["reason"][0] == "scene frames 0-24 lasts 1.000 s, shorter than min_seconds 1.5"
    assert rejects["reason"][3] == "no clip of at least 1.5 s among 3 scenes"


def test_short_scenes_are_rejects_with_a_reason_and_the_rest_are_kept(tmp_path, synthetic_cut_video):
    # max_seconds 0.7 cuts each 24-frame scene into 12 + 12 frames (0.5 s); min_seconds 0.6
    # drops all of them, so every piece must be accounted for in the rejects table
    clips, rejects = run_split(tmp_path, {"cuts": synthetic_cut_video["path"]}, max_seconds=0.7, min_seconds=0.6)
    assert clips.empty
    short = rejects[rejects["id"] != "cuts"]
    assert len(short) == 6 and short["reason"].str.contains("shorter than min_seconds 0.6").all()
    # with a bar a single piece clears, only the unmatched pieces are rejects: nothing vanishes
    times = [k / 10 for k in range(101)]
    dropped = []
    kept = plan_clips([(0, 4), (4, 100)], times, 0.5, None, dropped)
    assert kept == [(4, 100)] and dropped == [(0, 4)]


def test_target_fps_and_shorter_side(tmp_path, synthetic_cut_video):
    clips, rejects = run_split(tmp_path, {"cuts": synthetic_cut_video["path"]}, fps=12, shorter_side=64)
    assert rejects.empty
    assert clips["num_frames"].tolist() == [12, 12, 12]  # 1 s scenes at 12 fps
    assert (clips["fps"] == 12.0).all()
    assert (clips["width"] == 64).all() and (clips["height"] == 64).all()
    assert (clips["resolution"] == 4096).all() and (clips["aspect_ratio"] == 1.0).all()
    assert clips["start_frame"].tolist() == [0, 24, 48]  # still source frames
    assert_clips_decode_as_tabled(clips)
    assert probe(clips["path"][0])["fps"] == 12.0


def test_a_broken_video_is_rejected_and_the_rest_continue(tmp_path, synthetic_cut_video, bad_videos):
    videos = ingest(tmp_path, {"cuts": synthetic_cut_video["path"], "good": bad_videos["good"]})
    # the raw file of one video is replaced between ingest and split (replaced, not written
    # through: it is a hard link to the fixture's file)
    broken = tmp_path / "raw" / "good.mp4"
    broken.unlink()
    broken.write_bytes(b"not a video any more")
    out, rejects_path = tmp_path / "clips.parquet", tmp_path / "rejects.parquet"
    split_shard(videos, tmp_path / "clips", out, rejects_path, PARAMS)
    assert table.read(out)["video_id"].unique().tolist() == ["cuts"]
    rejects = table.read(rejects_path)
    assert rejects["id"].tolist() == ["good"]
    assert str(tmp_path / "raw" / "good.mp4") in rejects["reason"][0]


def test_a_clip_with_the_wrong_frame_count_is_rejected(tmp_path, synthetic_cut_video, monkeypatch):
    import soraflow.data.split

    real_count = soraflow.data.split.count_frames
    monkeypatch.setattr(soraflow.data.split, "count_frames", lambda path: real_count(path) - ("scene-001" in str(path)))
    clips, rejects = run_split(tmp_path, {"cuts": synthetic_cut_video["path"]})
    assert clips["id"].tolist() == ["cuts_scene-000", "cuts_scene-002"]
    assert rejects.to_dict("records") == [
        {"id": "cuts_scene-001", "url": str(synthetic_cut_video["path"]), "stage": "split", "reason": "clip decodes to 23 frames, expected 24"}
    ]
    assert not (tmp_path / "clips" / "cuts_scene-001.mp4").exists()
    assert not list((tmp_path / "clips").glob("*.tmp.mp4"))


def test_plan_clips_and_output_size_arithmetic():
    times = [k / 10 for k in range(101)]  # 100 frames at 10 fps, plus the end time
    assert plan_clips([(0, 100)], times, 0.5, 3.0) == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert plan_clips([(0, 4), (4, 100)], times, 0.5, None) == [(4, 100)]
    assert plan_clips([(0, 30)], times, 0.5, 3.0) == [(0, 30)]  # exactly max_seconds stays whole
    assert output_size(1280, 720, 256) == (456, 256)
    assert output_size(175, 145, 256) == (174, 144)  # never upscaled, made even
    assert output_size(720, 1280, None) == (720, 1280)
    with pytest.raises(ValueError, match="split.detector"):
        detect_scenes("x.mp4", {**PARAMS, "detector": "histogram"})
    assert np.isclose(sum(b - a for a, b in plan_clips([(0, 100)], times, 0.0, 0.7)), 100)


def test_a_detector_error_stops_the_decoding_thread(synthetic_cut_video, monkeypatch):
    import threading

    import soraflow.data.split

    class Broken:
        def process_frame(self, *args):
            raise RuntimeError("detector broke")

    monkeypatch.setattr(soraflow.data.split, "_detector", lambda params, threads: Broken())
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="detector broke"):
        detect_scenes(synthetic_cut_video["path"], PARAMS)
    assert threading.active_count() == before


def test_videos_split_at_once_give_the_table_and_clips_of_one_at_a_time(
    tmp_path, synthetic_cut_video, vfr_video, rotated_video, bad_videos, capfd
):
    sources = {"cuts": synthetic_cut_video["path"], "vfr": vfr_video["path"], "broken": bad_videos["good"],
               "phone": rotated_video["path"], "good": bad_videos["good"]}  # fmt: skip
    videos = ingest(tmp_path, sources)
    broken = tmp_path / "raw" / "broken.mp4"
    broken.unlink()  # a reject among them (replaced, not written through the fixture's hard link)
    broken.write_bytes(b"not a video any more")
    runs = {}
    # one worker on one thread; five workers (one per video) with two decoder threads each
    for threads in (1, 10):
        out = tmp_path / f"threads{threads}"
        split_shard(videos, out / "clips", out / "clips.parquet", out / "rejects.parquet", {**PARAMS, "threads": threads})
        runs[threads] = table.read(out / "clips.parquet"), table.read(out / "rejects.parquet")
    (one, one_rejects), (many, many_rejects) = runs[1], runs[10]
    assert one["video_id"].unique().tolist() == ["cuts", "vfr", "phone", "good"]
    assert one_rejects["id"].tolist() == ["broken"] and many_rejects.equals(one_rejects)
    assert many.drop(columns="path").equals(one.drop(columns="path"))
    # x264 runs on one thread whatever the job's threads: the clips are the same bytes
    assert [sha256(p) for p in many["path"]] == [sha256(p) for p in one["path"]]
    assert many["path"].tolist() == [str(tmp_path / "threads10" / "clips" / f"{i}.mp4") for i in one["id"]]
    # the job's progress line: videos, clips and bytes per second, and an ETA
    last = capfd.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("split: 100% 5/5 videos [") and "ETA 00:00" in last
    assert "videos/s" in last and "clips/s" in last and "B/s" in last


@pytest.mark.parametrize("local_sources", ["link", "copy", "in_place"])
def test_drop_raw_deletes_raw_files_once_split_never_a_source(tmp_path, synthetic_cut_video, local_sources):
    source = tmp_path / "corpus" / "cuts.mp4"
    source.parent.mkdir()
    shutil.copyfile(synthetic_cut_video["path"], source)
    shard = tmp_path / "shard.parquet"
    table.write(pd.DataFrame({"id": ["cuts"], "video_id": ["cuts"], "url": [str(source)]}), shard)
    videos, raw = tmp_path / "videos.parquet", tmp_path / "raw"
    params = section("ingest", retries=0, local_sources=local_sources)
    ingest_shard(shard, raw, videos, tmp_path / "ingest_rejects.parquet", params)
    out = tmp_path / "clips.parquet"
    split_shard(videos, tmp_path / "clips", out, tmp_path / "rejects.parquet", PARAMS, drop_raw_in=raw)
    assert len(table.read(out)) == 3 and all(Path(p).exists() for p in table.read(out)["path"])
    assert list(raw.iterdir()) == []
    assert source.read_bytes() == synthetic_cut_video["path"].read_bytes()
    if local_sources != "in_place":
        # splitting again without the raw file is an error naming why, not a reject
        with pytest.raises(FileNotFoundError, match="ingest.keep_raw false"):
            split_shard(videos, tmp_path / "clips", out, tmp_path / "rejects.parquet", PARAMS)


def test_transnetv2_cuts_at_the_frames_the_videos_were_cut_at(synthetic_cut_video, vfr_video):
    import torch

    params = {**PARAMS, "detector": "transnetv2", "threshold": 0.5}
    scenes, _ = detect_scenes(synthetic_cut_video["path"], params)
    n = synthetic_cut_video["num_frames"]
    bounds = [0, *synthetic_cut_video["cut_frames"], n]
    assert scenes == list(zip(bounds[:-1], bounds[1:]))
    torch_threads = torch.get_num_threads()
    scenes, _ = detect_scenes(vfr_video["path"], params, threads=1)  # by frame index, whatever the timestamps
    assert scenes == [(0, 24), (24, 48)]
    assert torch.get_num_threads() == torch_threads  # the network ran on one thread, the caller's count is back
    with pytest.raises(ValueError, match="transition probability"):
        detect_scenes(synthetic_cut_video["path"], {**params, "threshold": 27.0})


def test_transnetv2_cut_frames_follow_each_run_of_transition_frames():
    # a hard cut marks the old shot's last frame (2), a dissolve a run (9-11), noise one frame (13)
    probabilities = np.zeros(30)
    probabilities[[2, 9, 10, 11, 13, 29]] = [0.9, 0.6, 0.8, 0.7, 0.55, 0.9]
    assert transnet_cuts(probabilities, 0.5, min_scene_frames=1) == [3, 12, 14]  # none after the last frame
    assert transnet_cuts(probabilities, 0.5, min_scene_frames=4) == [12]  # 3 is 3 frames in, 14 is 2 after 12
    assert transnet_cuts(probabilities, 0.65, min_scene_frames=1) == [3, 12]  # the dissolve's run is 10-11


def test_loading_transnetv2_leaves_the_process_seeds_and_torch_flags_alone():
    import random

    import torch

    import soraflow.data.split

    soraflow.data.split._transnetv2_model.cache_clear()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    soraflow.data.split._transnetv2_model()
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    assert after == flags == (False, False, False)
    draws = (random.random(), np.random.random(), torch.rand(1).item())
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
    assert (random.random(), np.random.random(), torch.rand(1).item()) == draws  # not re-seeded with 42
