from concurrent.futures import ThreadPoolExecutor

import ffmpeg as ffmpeg_python
import pytest
from conftest import ffmpeg

from soraflow.data.probe import ProbeError, frame_rate, probe


def test_probe_synthetic_video(synthetic_cut_video):
    info = probe(synthetic_cut_video["path"])
    assert info == {
        "duration_s": pytest.approx(3.0, abs=0.05),
        "fps": 24.0,
        "num_frames": 72,
        "width": 128,
        "height": 128,
        "codec": "h264",
        "rotation": 0,
    }


def test_rotated_phone_video_reports_displayed_size(rotated_video):
    info = probe(rotated_video["path"])
    assert info["rotation"] == 90
    assert (info["width"], info["height"]) == rotated_video["display_size"]


def test_variable_frame_rate_uses_average_rate(vfr_video):
    info = probe(vfr_video["path"])
    assert info["num_frames"] == 48
    assert 3.7 <= info["duration_s"] <= 4.0  # last frame shown at 3.875 s
    assert info["fps"] == pytest.approx(48 / info["duration_s"], rel=0.01)


def test_container_without_frame_count_is_counted_by_decoding(bad_videos, tmp_path):
    mkv = tmp_path / "good.mkv"  # Matroska stores no per-stream frame count
    ffmpeg("-i", str(bad_videos["good"]), "-c", "copy", str(mkv))
    assert "nb_frames" not in ffmpeg_python.probe(str(mkv))["streams"][0]
    assert probe(mkv)["num_frames"] == 12


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero_byte", "cannot read it: empty file"),
        ("truncated", "cannot read it: moov atom not found"),
        ("text", "cannot read it"),
        ("audio_only", r"no video stream \(streams: audio\)"),
    ],
)
def test_unusable_files_raise_with_file_and_reason(bad_videos, name, reason):
    path = bad_videos[name]
    with pytest.raises(ProbeError, match=reason) as error:
        probe(path)
    assert str(path) in str(error.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ProbeError, match="file not found"):
        probe(tmp_path / "nope.mp4")


def test_one_frame_and_oversized_videos_probe_fine(bad_videos):
    # ingest decides these are unusable; the probe only reports them
    assert probe(bad_videos["one_frame"])["num_frames"] == 1
    assert probe(bad_videos["too_big"])["width"] == 4112


def test_rate_falls_back_to_the_base_rate_then_frames_over_duration():
    assert frame_rate(0.0, 30000 / 1001, 12, 2.0) == pytest.approx(29.97, abs=0.001)
    assert frame_rate(0.0, 0.0, 12, 2.0) == 6.0
    assert frame_rate(0.0, 0.0, 12, 0.0) == 0.0


def test_cover_art_alone_is_not_a_video(tmp_path):
    song = tmp_path / "song.mp3"  # an MP3 with its album cover: a one-picture "video" stream
    ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-f", "lavfi", "-i", "color=red:size=64x64:duration=1",
           "-frames:v", "1", "-map", "0", "-map", "1", "-c:a", "libmp3lame", "-c:v", "mjpeg",
           "-disposition:v:0", "attached_pic", str(song))  # fmt: skip
    with pytest.raises(ProbeError, match=r"no video stream \(streams: audio, video\)"):
        probe(song)


def test_each_probe_names_its_own_files_reason_in_any_thread(bad_videos):
    """ingest probes many files at once, and many fail alike: each error names its own file's
    reason, never another thread's, and a repeated reason is not swallowed."""
    expected = {"truncated": "moov atom not found", "zero_byte": "empty file", "text": "cannot read it", "good": "12"}
    names = list(expected) * 8
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(outcome, [bad_videos[name] for name in names]))
    for name, result in zip(names, outcomes):
        assert expected[name] in result and (name == "good" or str(bad_videos[name]) in result), (name, result)


def outcome(path) -> str:
    try:
        return str(probe(path)["num_frames"])
    except ProbeError as error:
        return str(error)


def test_a_split_stopped_early_after_probing_does_not_hang(bad_videos, synthetic_cut_video, monkeypatch):
    """Probing installs libav's Python log callback only while it reads; left installed, freeing
    split's frame-threaded decoder early (a detector error) deadlocked the process."""
    import av.logging

    import soraflow.data.split

    class Broken:
        def process_frame(self, *args):
            raise RuntimeError("detector broke")

    with pytest.raises(ProbeError):
        probe(bad_videos["truncated"])
    probe(synthetic_cut_video["path"])
    assert av.logging.get_level() is None
    monkeypatch.setattr(soraflow.data.split, "_detector", lambda params, threads: Broken())
    with pytest.raises(RuntimeError, match="detector broke"):
        soraflow.data.split.detect_scenes(synthetic_cut_video["path"], {})
