"""Samples drawn from training captions, set beside the clips they were trained on."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import torch

from soraflow.core.figures import save_figure
from soraflow.data import video

FRAMES_SHOWN = 4  # per clip


def plot_comparison(clips: list[torch.Tensor], samples: list[torch.Tensor], rows: pd.DataFrame, out_png) -> None:
    """One row per clip ([T, 3, H, W] in [-1, 1]): its frames as trained on, then the frames
    sampled from its caption. rows: clip_id, caption and mse_own of each."""
    frames = video.evenly_spaced(clips[0].shape[0], min(FRAMES_SHOWN, clips[0].shape[0]))

    def strip(pixels: torch.Tensor):  # [T, 3, H, W] -> [H, shown frames * W, 3]
        return torch.cat(list(video.to_uint8(pixels[frames])), dim=1)

    fig, axes = plt.subplots(
        len(clips), 2, figsize=(max(8.0, 3.2 * len(frames)), 0.6 + 2.4 * len(clips)), squeeze=False
    )
    for k, row in enumerate(rows.itertuples()):
        for column, (pixels, title) in enumerate(
            [(clips[k], f"{row.clip_id}\n{row.caption[:40]}"), (samples[k], f"sample\npixel MSE {row.mse_own:.3f}")]
        ):
            axes[k, column].imshow(strip(pixels).numpy(), interpolation="nearest")
            axes[k, column].set_title(title, fontsize=8)
            axes[k, column].axis("off")
    fig.suptitle("samples from training captions, beside the clips they were trained on")
    save_figure(fig, out_png)
