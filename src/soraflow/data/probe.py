"""Probe a video file with ffprobe (through ffmpeg-python): size, rate, length, rotation."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import ffmpeg


class ProbeError(Exception):
    """The file is not a usable video; the message names the file and the reason."""


def _ffprobe(path: Path) -> dict:
    if not path.is_file():
        raise ProbeError(f"{path}: file not found")
    try:
        return ffmpeg.probe(str(path), v="error")
    except ffmpeg.Error as error:
        # ffprobe prefixes its lines with "[demuxer @ 0x...]" or the path; keep just the messages
        lines = (error.stderr or b"").decode(errors="replace").strip().splitlines()
        messages = [line.split("] ", 1)[-1].removeprefix(f"{path}: ") for line in lines if line.strip()]
        raise ProbeError(f"{path}: ffprobe cannot read it: {'; '.join(messages) or 'unknown error'}") from None


def _video_stream(info: dict, path: Path) -> dict:
    # cover art in audio files shows up as a one-picture video stream: not a video
    streams = [
        s
        for s in info.get("streams", [])
        if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
    ]
    if not streams:
        kinds = sorted({s.get("codec_type", "?") for s in info.get("streams", [])})
        raise ProbeError(f"{path}: no video stream (streams: {', '.join(kinds) or 'none'})")
    return streams[0]


def _rate(text: str | None) -> float:
    """'30000/1001' -> 29.97; '0/0', '', None -> 0.0."""
    try:
        return float(Fraction(text))
    except (TypeError, ValueError, ZeroDivisionError):
        return 0.0


def _rotation(stream: dict) -> int:
    """Clockwise degrees a player turns the picture, in {0, 90, 180, 270}."""
    for side_data in stream.get("side_data_list", []):
        if "rotation" in side_data:
            # the display matrix angle is counter-clockwise
            return round(-float(side_data["rotation"])) % 360
    return round(float(stream.get("tags", {}).get("rotate", 0))) % 360


def _count_decodable_frames(path: Path, limit: int | None = None) -> int:
    """Frames the decoder yields, stopping at `limit`; a decoder failure is a ProbeError."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
                if limit is not None and count >= limit:
                    break
    except av.FFmpegError as error:
        if count == 0:
            raise ProbeError(f"{path}: undecodable video: {error}") from None
    return count


def probe(path: str | Path) -> dict:
    """duration_s, fps, num_frames, width, height (as displayed), codec, rotation of a video.

    num_frames is the container's frame count when it has one, else counted by decoding;
    the first frame is always decoded, so a file whose frames cannot be decoded raises.
    """
    path = Path(path)
    info = _ffprobe(path)
    stream = _video_stream(info, path)
    rotation = _rotation(stream)
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if rotation in (90, 270):
        width, height = height, width
    duration_s = _rate(stream.get("duration")) or _rate(info.get("format", {}).get("duration"))
    declared_frames = int(stream.get("nb_frames") or 0)
    if declared_frames > 0:
        num_frames = declared_frames if _count_decodable_frames(path, limit=1) else 0
    else:
        num_frames = _count_decodable_frames(path)
    fps = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    if not fps and duration_s > 0:
        fps = num_frames / duration_s
    return {
        "duration_s": duration_s,
        "fps": fps,
        "num_frames": num_frames,
        "width": width,
        "height": height,
        "codec": stream.get("codec_name"),
        "rotation": rotation,
    }
