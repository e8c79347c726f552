"""Helpers for the captioner and tiny-model tests (imported by those test modules)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from soraflow.data import table, video
from soraflow.demo.models import build_all


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """tiny-llava, tiny-vae and tiny-t5, built once per session (build_all skips existing dirs)."""
    return build_all(tmp_path_factory.getbasetemp() / "tiny-models")


def patterned_frames(seed: int, num_frames: int = 10, height: int = 48, width: int = 64) -> torch.Tensor:
    """[T,H,W,3] uint8: a random colour field per clip with a bar that moves frame to frame."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (1, height, width, 3), generator=generator, dtype=torch.uint8)
    frames = base.repeat(num_frames, 1, 1, 1)
    for t in range(num_frames):
        left = (t * 5) % (width - 8)
        frames[t, :, left : left + 8] = 255
    return frames


def make_clip_table(folder: Path, num_clips: int, manifest_text: dict[int, str] | None = None) -> Path:
    """Tiny mp4 clips and their clip table (id, url, path, num_frames, width, height, text_manifest)."""
    rows = []
    for i in range(num_clips):
        path = folder / f"clip{i}.mp4"
        frames = patterned_frames(seed=i)
        video.write_video(path, frames, fps=8)
        text = (manifest_text or {}).get(i)
        rows.append(
            {
                "id": f"clip{i}",
                "url": f"file://{path}",
                "path": str(path),
                "num_frames": len(frames),
                "width": frames.shape[2],
                "height": frames.shape[1],
                "text_manifest": text,
            }
        )
    table_path = folder / "clips.parquet"
    table.write(pd.DataFrame(rows), table_path)
    return table_path
