"""Perceptual hashes of a clip's frames, for finding near-duplicates across the corpus.

imagehash's pHash (the DCT of a 32x32 grey image, its 8x8 lowest frequencies against their
median: 64 bits) of `frames` frames at the centres of equal parts of the clip. A re-encode (another
CRF, size, frame rate or brightness) stays within about 1 to 12 bits on average; a different
shot is 26 and up. The clip table holds them as one string: the 64-bit hashes as 16 hex digits,
in frame order, joined by single spaces (the format the dedup step reads).
"""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from soraflow.data import video


def clip_phash(path: str | Path, num_frames: int, frames: int = 4) -> str:
    """The clip's hashes: `frames` 16-hex-digit pHashes joined by spaces (a clip with fewer
    frames repeats some, so every clip has the same count)."""
    indices = video.at_positions(num_frames, video.spread_positions(frames))
    decoded = dict(zip(sorted(set(indices)), video.read_frames(path, sorted(set(indices)))))
    return " ".join(str(imagehash.phash(Image.fromarray(decoded[i].numpy()))) for i in indices)


def mean_distance(a: str, b: str) -> float:
    """Mean Hamming distance (bits) between two clips' hash strings, frame by frame."""
    pairs = list(zip(a.split(), b.split(), strict=True))
    return float(np.mean([bin(int(x, 16) ^ int(y, 16)).count("1") for x, y in pairs]))
