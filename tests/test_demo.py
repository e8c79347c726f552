import numpy as np
import pytest

from soraflow.data.probe import probe
from soraflow.data.video import read_frames
from soraflow.demo.videos import demo_cut_frames, make_demo_videos


def frame_differences(path) -> np.ndarray:
    """Mean absolute difference between each frame and the one before it (index = later frame)."""
    frames = read_frames(path).numpy().astype(np.int16)
    diffs = np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3))
    return np.concatenate([[0.0], diffs])


def test_cuts_fall_exactly_on_the_announced_frames(synthetic_cut_video):
    diffs = frame_differences(synthetic_cut_video["path"])
    assert len(diffs) == synthetic_cut_video["num_frames"] == 72
    cuts = synthetic_cut_video["cut_frames"]
    assert cuts == [24, 48]
    # the biggest frame-to-frame changes are exactly the cuts, well above anything inside a scene
    strongest = sorted(np.argsort(diffs)[-len(cuts) :].tolist())
    assert strongest == cuts
    within_scenes = np.delete(diffs, cuts)
    assert diffs[cuts].min() > 3 * within_scenes.max()


def test_output_is_h264_yuv420p_with_the_spec_size_and_rate(synthetic_cut_video):
    info = probe(synthetic_cut_video["path"])
    assert info["codec"] == "h264"
    assert (info["width"], info["height"]) == (128, 128)
    assert info["fps"] == pytest.approx(24.0)
    assert info["duration_s"] == pytest.approx(3.0, abs=0.05)


def test_fractional_scene_length_rounds_to_whole_frames(tmp_path):
    spec = {"name": "b", "sources": ["life", "testsrc", "rgbtestsrc"], "scene_seconds": 1.5, "size": 64, "fps": 25}
    assert demo_cut_frames(spec) == [38, 76]  # 37.5 frames rounds to 38
    (path,) = make_demo_videos(tmp_path / "out", [spec])
    assert path == tmp_path / "out" / "b.mp4"
    assert len(frame_differences(path)) == 3 * 38
    # no temp file is left beside the result
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.mp4"]


def test_unknown_source_is_an_error_naming_the_file(tmp_path):
    spec = {"name": "bad", "sources": ["nosuchsource"], "scene_seconds": 1.0, "size": 64, "fps": 24}
    with pytest.raises(RuntimeError, match="bad.mp4"):
        make_demo_videos(tmp_path, [spec])
    assert not list(tmp_path.iterdir())


def test_random_sources_make_the_same_bytes_every_run(tmp_path):
    """ffmpeg's `life` fills its grid at random unless seeded: a re-made demo video once
    differed by up to 35 levels, so a clean re-run could not reproduce a clean run."""
    spec = {"name": "life", "sources": ["life", "cellauto"], "scene_seconds": 0.5, "size": 32, "fps": 8}
    first, second = (make_demo_videos(tmp_path / run, [spec])[0] for run in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()
