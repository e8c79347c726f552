import ffmpeg as ffmpeg_python
import pytest
from conftest import ffmpeg

from soraflow.data.probe import ProbeError, probe


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
        ("zero_byte", "ffprobe cannot read it"),
        ("truncated", "ffprobe cannot read it: .*moov atom not found"),
        ("text", "ffprobe cannot read it"),
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


def fake_ffprobe(stream: dict, format_: dict | None = None):
    base = {"codec_type": "video", "codec_name": "h264", "width": 640, "height": 360}
    return lambda path, **options: {"streams": [{**base, **stream}], "format": format_ or {}}


def test_legacy_rotate_tag_and_unknown_average_rate(monkeypatch, bad_videos):
    monkeypatch.setattr(
        ffmpeg_python,
        "probe",
        fake_ffprobe({"tags": {"rotate": "-90"}, "avg_frame_rate": "0/0", "r_frame_rate": "30000/1001", "nb_frames": "12"}),
    )
    info = probe(bad_videos["good"])
    assert (info["rotation"], info["width"], info["height"]) == (270, 360, 640)
    assert info["fps"] == pytest.approx(29.97, abs=0.001)


def test_no_rate_at_all_falls_back_to_frames_over_duration(monkeypatch, bad_videos):
    monkeypatch.setattr(
        ffmpeg_python,
        "probe",
        fake_ffprobe({"avg_frame_rate": "0/0", "r_frame_rate": "0/0", "nb_frames": "12"}, {"duration": "2.0"}),
    )
    info = probe(bad_videos["good"])
    assert (info["fps"], info["duration_s"]) == (6.0, 2.0)


def test_cover_art_alone_is_not_a_video(monkeypatch, bad_videos):
    monkeypatch.setattr(ffmpeg_python, "probe", fake_ffprobe({"codec_name": "mjpeg", "disposition": {"attached_pic": 1}}))
    with pytest.raises(ProbeError, match="no video stream"):
        probe(bad_videos["good"])
