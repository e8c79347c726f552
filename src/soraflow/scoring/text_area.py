"""Text area: how much of a clip's frames is text (subtitles, slides, watermarks), by OCR.

Open-Sora 1.2 and Cosmos-Curator drop clips full of text. The detector and recogniser are
PP-OCRv4's, as ONNX models that the rapidocr-onnxruntime wheel ships. Each frame is read at its
own size (limit_type "max": rapidocr's default upscales the shorter side to 736 px, 10x the
time at 256 px), and only boxes the recogniser reads with a score of at least `min_text_score`
count: detection alone marks blurry or textured frames as text, up to the whole frame. Of those,
only boxes whose reading holds a letter or digit (of any script) count: the recogniser also reads
shapes as signs alone, confidently (a bus-roof vent in the demo's footage as "■" at 0.64, drawn
"###" at 0.98), and a clip is dropped for words and numbers, not for a grille.
A clip's score is the largest fraction of a frame that confirmed boxes cover, over a few frames.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np

from soraflow.data import video


@cache
def _engine(min_text_score: float):
    from rapidocr_onnxruntime import RapidOCR

    # 960 is rapidocr's smallest "max" limit: frames below it are read at their own size
    # (rounded to a multiple of 32); one ONNX thread per session, as every CPU step here
    return RapidOCR(det_limit_type="max", text_score=min_text_score, intra_op_num_threads=1, inter_op_num_threads=1)


def frame_text_area(frame: np.ndarray, min_text_score: float = 0.5) -> float:
    """The fraction of an RGB frame [H,W,3] uint8 covered by text boxes the recogniser
    confirms and reads as text (their union, so overlapping boxes count once)."""
    height, width = frame.shape[:2]
    result, _ = _engine(min_text_score)(np.ascontiguousarray(frame[..., ::-1]))  # rapidocr reads BGR
    if not result:
        return 0.0
    mask = np.zeros((height, width), np.uint8)
    for box, reading, _score in result:  # rapidocr keeps only boxes read at >= text_score
        if any(char.isalnum() for char in reading):  # a letter or digit, not signs alone
            cv2.fillPoly(mask, [np.round(np.asarray(box)).astype(np.int32)], 1)
    return float(mask.mean())


def text_area(path: str | Path, num_frames: int, frames: int = 3, min_text_score: float = 0.5) -> float:
    """Max over `frames` frames spread over the clip of the confirmed text's area fraction."""
    indices = sorted(set(video.at_positions(num_frames, video.spread_positions(frames))))
    return max(frame_text_area(frame.numpy(), min_text_score) for frame in video.read_frames(path, indices))
