"""Motion score: mean optical-flow magnitude of a clip.

Open-Sora scores motion with UniMatch optical flow; on CPU we use OpenCV's Farneback flow
on a few downscaled frame pairs, which ranks static, slow and fast clips the same way.
"""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np

MOTION_WIDTH = 128  # flow is measured at this width, so scores compare across resolutions


def _gray_frames(path: Path) -> list[np.ndarray]:
    """Every frame as small grayscale images, MOTION_WIDTH wide."""
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"  # frame + slice threads
        for frame in container.decode(stream):
            height = max(2, round(frame.height * MOTION_WIDTH / frame.width))
            frames.append(frame.to_ndarray(format="gray", width=MOTION_WIDTH, height=height))
    return frames


def motion_score(path: str | Path, num_samples: int = 4) -> float:
    """Mean optical-flow magnitude (pixels per frame at 128 px width) over `num_samples`
    pairs of consecutive frames spread evenly over the clip."""
    frames = _gray_frames(Path(path))
    if len(frames) < 2:
        raise ValueError(f"{path}: motion needs at least 2 frames, got {len(frames)}")
    starts = sorted(set(np.linspace(0, len(frames) - 2, num_samples).round().astype(int).tolist()))
    magnitudes = []
    for i in starts:
        flow = cv2.calcOpticalFlowFarneback(frames[i], frames[i + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=2).mean()))
    return float(np.mean(magnitudes))
