"""Probe a video file in-process with PyAV (libavformat): size, rate, length, rotation.

In-process rather than an ffprobe subprocess: an ingest job probes every video of a shard, and
starting ffprobe cost about 70 ms of CPU per video, which bounded a concurrent ingest.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import av
import av.logging


class ProbeError(Exception):
    """The file is not a usable video; the message names the file and the reason."""


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise ProbeError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ProbeError(f"{path}: cannot read it: empty file")
    with _libav_messages() as logs:
        try:
            return av.open(str(path))
        except av.FFmpegError as error:
            details = [message.strip() for _, _, message in logs if message.strip()]
            raise ProbeError(f"{path}: cannot read it: {'; '.join(details or [error.strerror])}") from None


_capturing = 0
_capturing_lock = threading.Lock()


@contextmanager
def _libav_messages():
    """libav's messages to this thread while open (ingest probes in many threads). libav's own
    reasons ("moov atom not found") reach Python only while its log callback is installed, and
    every file's only when repeats are not skipped. The callback is removed again once no thread
    captures: left installed, freeing a frame-threaded decoder (split's) can deadlock on the GIL."""
    global _capturing
    with _capturing_lock:
        if _capturing == 0:
            av.logging.set_level(av.logging.ERROR)
            av.logging.set_skip_repeated(False)
        _capturing += 1
    try:
        with av.logging.Capture() as logs:
            yield logs
    finally:
        with _capturing_lock:
            _capturing -= 1
            if _capturing == 0:
                av.logging.set_level(None)


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    # cover art in audio files shows up as a one-picture video stream: not a video
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        raise ProbeError(f"{path}: no video stream (streams: {', '.join(kinds) or 'none'})")
    return streams[0]


def frame_rate(average: float, base: float, num_frames: int, duration_s: float) -> float:
    """The average rate; else the stream's base rate (a guess from its timestamps); else frames
    over duration; else 0.0."""
    return average or base or (num_frames / duration_s if duration_s > 0 else 0.0)


def probe(path: str | Path) -> dict:
    """duration_s, fps, num_frames, width, height (as displayed), codec, rotation of a video.

    num_frames is the container's frame count when it has one, else counted by decoding;
    the first frame is always decoded (it carries the rotation), so a file whose frames cannot
    be decoded raises.
    """
    path = Path(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        frames = container.decode(stream)
        try:
            first = next(frames)
        except (StopIteration, av.FFmpegError) as error:
            raise ProbeError(f"{path}: undecodable video: {error or 'no frames'}") from None
        num_frames = stream.frames
        if num_frames <= 0:  # Matroska and some streams declare no count
            num_frames = 1
            try:
                num_frames += sum(1 for _ in frames)
            except av.FFmpegError:
                pass  # a damaged tail: the frames before it count
        # the display matrix angle is counter-clockwise; players turn the picture clockwise
        rotation = round(-first.rotation) % 360
        width, height = stream.codec_context.width, stream.codec_context.height
        if rotation in (90, 270):
            width, height = height, width
        if stream.duration is not None:
            duration_s = float(stream.duration * stream.time_base)
        else:
            duration_s = (container.duration or 0) / av.time_base
        fps = frame_rate(float(stream.average_rate or 0), float(stream.base_rate or 0), num_frames, duration_s)
        return {
            "duration_s": duration_s,
            "fps": fps,
            "num_frames": num_frames,
            "width": width,
            "height": height,
            "codec": stream.codec_context.name,
            "rotation": rotation,
        }
