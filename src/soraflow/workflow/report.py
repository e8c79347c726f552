"""Figures for `snakemake --report`: dataset statistics, a captioned clip gallery, loss curves.

Each figure is a file a rule writes and marks for the report; the sample videos and their
comparison with the training clips (soraflow.inference.comparison) are marked by the sample rules. The gallery embeds its thumbnails so the page is
self-contained.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from PIL import Image

from soraflow.core.figures import save_figure
from soraflow.data import table, video


def plot_dataset(clips_path, rejects_path, out_png) -> None:
    """Clip durations, sizes, clips per source video, and rejects by stage and reason."""
    clips, rejects = table.read(clips_path), table.read(rejects_path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0, 0].hist(clips["duration_s"].dropna(), bins=20, color="tab:blue")
    axes[0, 0].set(title=f"clip durations ({len(clips)} clips)", xlabel="seconds", ylabel="clips")
    sizes = (clips["width"].astype(str) + "x" + clips["height"].astype(str)).value_counts()
    axes[0, 1].barh(sizes.index[:12], sizes.values[:12], color="tab:green")
    axes[0, 1].set(title="clip sizes (width x height)", xlabel="clips")
    per_video = clips.groupby("video_id").size().sort_values()
    axes[1, 0].barh(per_video.index[-12:], per_video.values[-12:], color="tab:purple")
    axes[1, 0].set(title=f"clips per video ({clips['video_id'].nunique()} videos)", xlabel="clips")
    if len(rejects):
        # numbers differ item by item; without them, reasons group into kinds
        kinds = rejects["reason"].str.replace(r"\d+(\.\d+)?", "N", regex=True).str.slice(0, 36)
        reasons = (rejects["stage"] + ": " + kinds).value_counts()
        axes[1, 1].barh(reasons.index[:10], reasons.values[:10], color="tab:red")
        axes[1, 1].tick_params(axis="y", labelsize=7)
    else:
        axes[1, 1].text(0.5, 0.5, "no rejects", ha="center", va="center")
    axes[1, 1].set(title=f"rejects ({len(rejects)})", xlabel="items")
    save_figure(fig, out_png)


def _thumbnail(frame, height: int = 96) -> str:
    image = Image.fromarray(frame.numpy())
    image.thumbnail((height * 4, height))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode()


def gallery_html(clips_path, out_html, max_clips: int = 24, positions=(0.2, 0.5, 0.8)) -> None:
    """Three frames of each clip beside its caption, as one self-contained page."""
    clips = table.read(clips_path).head(max_clips)
    rows = []
    for clip in clips.itertuples():
        frames = video.read_frames(clip.path, video.at_positions(clip.num_frames, positions))
        images = "".join(f'<img src="data:image/jpeg;base64,{_thumbnail(f)}">' for f in frames)
        rows.append(
            f"<tr><td>{images}</td><td><b>{html.escape(clip.id)}</b> · {clip.num_frames} frames · "
            f"{clip.width}x{clip.height}<br>{html.escape(str(clip.text))}</td></tr>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>clips</title><style>"
        "body{font-family:sans-serif} td{vertical-align:top;padding:4px;overflow-wrap:anywhere}"
        "td:first-child{white-space:nowrap} img{margin-right:2px}"
        "</style></head><body><table>" + "".join(rows) + "</table></body></html>"
    )
    Path(out_html).write_text(page)


def plot_losses(loss_csvs: dict[str, str | Path], out_png) -> None:
    """Training loss against step, one curve per stage."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for stage, path in loss_csvs.items():
        log = pd.read_csv(path)
        ax.plot(log["step"], log["loss"], label=stage)
    ax.set(xlabel="step", ylabel="loss (MSE + VLB)", title="training loss", yscale="log")
    ax.legend()
    save_figure(fig, out_png)


def make_figures(clips_path, rejects_path, loss_csvs: dict, out_dir) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_dataset(clips_path, rejects_path, out_dir / "dataset.png")
    gallery_html(clips_path, out_dir / "gallery.html")
    plot_losses(loss_csvs, out_dir / "losses.png")
