"""Decoding and encoding video frames with PyAV, and the frame transforms training uses.

Frames are uint8 tensors shaped [T, H, W, 3] (RGB). torchvision does not import beside
our torch build, so resizing and cropping are written with torch directly.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from soraflow.core.atomic import atomic_path


def is_video_fault(error: BaseException) -> bool:
    """Whether an error raised reading or decoding a video is the video's own (undecodable or
    truncated data, no video stream, too few frames: a reject) or the machine's (any OSError, a
    missing file, no permission, a full disk, an I/O error, or no memory: the job must fail, or
    every video after it would be rejected too). PyAV raises errno errors as OSErrors, bad data
    as ValueErrors."""
    return not isinstance(error, (OSError, MemoryError))


def count_frames(path: str | Path) -> int:
    """Frames a decoder actually yields (container metadata can be wrong)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def read_frames(path: str | Path, indices: list[int] | None = None) -> torch.Tensor:
    """Decode the frames at `indices` (all frames if None), in the order given.

    Decodes sequentially once; an index past the end is an error naming the file.
    """
    wanted = None if indices is None else sorted(set(indices))
    frames: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if wanted is None or i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if wanted is not None and i >= wanted[-1]:
                break
    order = list(range(len(frames))) if indices is None else list(indices)
    missing = [i for i in order if i not in frames]
    if missing or not order:
        raise ValueError(f"{path}: cannot decode frames {missing or 'any'} (video has {len(frames)} decodable frames)")
    return torch.from_numpy(np.stack([frames[i] for i in order]))


def at_positions(num_frames: int, positions) -> list[int]:
    """Frame numbers at fractional `positions` of a clip (Open-Sora: int(n * p)), the last
    frame at most. Captioning, aesthetic scores and the report gallery pick frames this way."""
    return [min(int(num_frames * p), num_frames - 1) for p in positions]


def spread_positions(count: int) -> list[float]:
    """`count` positions (fractions of a clip) at the centres of equal parts of it: the same
    moments of a clip whatever its length, frame rate or first and last frames."""
    return [(k + 0.5) / count for k in range(count)]


def evenly_spaced(num_available: int, num_wanted: int, stride: int = 1) -> list[int]:
    """`num_wanted` indices taken every `stride` frames from the middle of the clip. A clip
    shorter than they span is an error: spreading them closer would change its speed."""
    span = (num_wanted - 1) * stride + 1
    if span > num_available:
        raise ValueError(f"{num_wanted} frames {stride} apart span {span} frames; the clip has {num_available}")
    start = (num_available - span) // 2
    return [start + k * stride for k in range(num_wanted)]


def resize_center_crop(frames: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[T,H,W,3] uint8 -> [T,3,height,width] float in [-1, 1] (size: (height, width), or one side of a
    square): resized to cover that size, keeping the aspect ratio, then centre-cropped to it."""
    height, width = (size, size) if isinstance(size, int) else size
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    _, _, h, w = x.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, :, top : top + height, left : left + width].clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[T,3,H,W] in [-1, 1] -> [T,H,W,3] uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def write_video(path: str | Path, frames: torch.Tensor, fps: float) -> None:
    """Write [T,H,W,3] uint8 frames as H.264 mp4 (yuv420p, plays in any player)."""
    t, h, w, _ = frames.shape
    # yuv420p needs even sizes
    frames = frames[:, : h - h % 2, : w - w % 2]
    with atomic_path(path, keep_suffix=True) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for array in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
