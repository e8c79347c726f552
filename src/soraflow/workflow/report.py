"""Figures for `snakemake --report`: dataset statistics, a captioned clip gallery, what each
stage's filters removed, loss curves,
and per stage its validation curves, over-fitting warnings and sample grids as a strip over steps.

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
from soraflow.scoring.filters import failed_filters
from soraflow.training.validation import overfitting, read_log


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


def write_page(out_html, title: str, style: str, body: str) -> None:
    """One self-contained HTML page of the report."""
    Path(out_html).write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>"
                              f"body{{font-family:sans-serif}} {style}</style></head><body>{body}</body></html>")


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
    write_page(out_html, "clips", "td{vertical-align:top;padding:4px;overflow-wrap:anywhere}"
               "td:first-child{white-space:nowrap} img{margin-right:2px}", "<table>" + "".join(rows) + "</table>")


def filters_html(clips_path, stage_rejects: dict[str, str | Path], out_html, examples: int = 4) -> None:
    """Per stage: how many clips each filter removed (a clip that fails two filters counts for
    both) with a few of them (id, middle frame, reason), and how many the stage's other steps
    left out (clips too short for its frames, or that do not decode). One self-contained page."""
    clips = table.read(clips_path).set_index("id")
    sections = []
    for stage, path in stage_rejects.items():
        rejects = table.read(path)
        removed: dict[str, list] = {}
        for reject in rejects[rejects["stage"] == "filter"].itertuples():
            for key in failed_filters(reject.reason):
                removed.setdefault(key, []).append(reject)
        rows = []
        for key, items in sorted(removed.items()):
            shown = []
            for reject in items[:examples]:
                image = ""
                if reject.id in clips.index:
                    clip = clips.loc[reject.id]
                    frame = video.read_frames(clip["path"], [int(clip["num_frames"]) // 2])[0]
                    image = f'<img src="data:image/jpeg;base64,{_thumbnail(frame, height=64)}"><br>'
                shown.append(f"<figure>{image}<b>{html.escape(reject.id)}</b><br>{html.escape(reject.reason)}</figure>")
            rows.append(f"<tr><td><b>{html.escape(key)}</b></td><td>{len(items)}</td><td>{''.join(shown)}</td></tr>")
        for step, count in rejects[rejects["stage"] != "filter"]["stage"].value_counts().sort_index().items():
            rows.append(f"<tr><td>{html.escape(step)} (not a filter)</td><td>{count}</td><td></td></tr>")
        body = "".join(rows) or "<tr><td colspan=3>no clip left out</td></tr>"
        sections.append(f"<h2>{html.escape(stage)}</h2><table><tr><th>filter</th><th>clips removed</th>"
                        f"<th>examples</th></tr>{body}</table>")
    write_page(out_html, "filters", "td,th{vertical-align:top;padding:4px;text-align:left}"
               "figure{display:inline-block;margin:4px;max-width:180px;font-size:small;overflow-wrap:anywhere}",
               "".join(sections))


def plot_losses(loss_csvs: dict[str, str | Path], out_png) -> None:
    """Training loss against step, one curve per stage."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for stage, path in loss_csvs.items():
        log = pd.read_csv(path)
        ax.plot(log["step"], log["loss"], label=stage)
    ax.set(xlabel="step", ylabel="loss (MSE + VLB)", title="training loss", yscale="log")
    ax.legend()
    save_figure(fig, out_png)


def overfitting_warnings(loss_csv, validation_csv, evaluations: int) -> list[str]:
    """The over-fitting warning at every evaluation of a stage's validation log where it held."""
    validation, training = read_log(validation_csv), read_log(loss_csv)
    return [f"step {validation[end - 1][0]}: {warning}" for end in range(1, len(validation) + 1)
            if (warning := overfitting(validation[:end], training, evaluations))]  # fmt: skip


def _png_base64(image: Image.Image, max_width: int = 640) -> str:
    image = image.convert("RGB")
    image.thumbnail((max_width, max_width * 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def validation_html(stages: dict[str, dict], out_html, evaluations: int) -> None:
    """Per stage: training and validation loss (raw and EMA weights) against step, the
    over-fitting warnings, and the run's sample grids (samples/step-N.png) as a strip over steps.
    stages: name -> {"loss": loss.csv, "validation": validation csv, "run_dir": run folder}."""
    sections = []
    for stage, files in stages.items():
        training, validation = pd.read_csv(files["loss"]), pd.read_csv(files["validation"])
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(training["step"], training["loss"], label="training", color="tab:blue", alpha=0.6)
        if len(validation):
            ax.plot(validation["step"], validation["loss"], "o-", label="validation (raw)", color="tab:red")
            if validation["ema_loss"].notna().any():
                ax.plot(validation["step"], validation["ema_loss"], "s--", label="validation (EMA)", color="tab:orange")
        ax.set(xlabel="step", ylabel="loss", title=f"{stage}: training and held-out loss", yscale="log")
        ax.legend()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        curve = base64.b64encode(buffer.getvalue()).decode()
        warnings = overfitting_warnings(files["loss"], files["validation"], evaluations)
        notes = "".join(f"<p class='warn'>{html.escape(stage)}, {html.escape(w)}</p>" for w in warnings)
        if not len(validation):
            notes += "<p>no validation clips (validation.fraction) or no evaluation</p>"
        grids = sorted(Path(files["run_dir"], "samples").glob("step-*.png"))
        strip = "".join(
            f"<figure><img src='data:image/png;base64,{_png_base64(Image.open(path))}'>"
            f"<figcaption>step {int(path.stem.removeprefix('step-'))}</figcaption></figure>" for path in grids)
        sections.append(f"<h2>{html.escape(stage)}</h2><img src='data:image/png;base64,{curve}'>{notes}"
                        f"<div class='strip'>{strip or '<p>no sample grids (validation.sample_every)</p>'}</div>")
    page_body = ("<p>Sample grids: a row per prompt, then per validation caption (its sample beside its held-out "
                 "clip).</p>" + "".join(sections))
    write_page(out_html, "validation", ".warn{color:#b00;font-weight:bold} .strip{display:flex;overflow-x:auto}"
               "figure{margin:4px} figcaption{text-align:center}", page_body)


def make_figures(clips_path, rejects_path, loss_csvs: dict, out_dir, validation: dict | None = None,
                 overfit_evaluations: int = 3, stage_rejects: dict | None = None) -> None:
    """validation: stage -> {"validation": its validation csv, "run_dir": its run folder};
    stage_rejects: stage -> its rejects table (filters.html)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_dataset(clips_path, rejects_path, out_dir / "dataset.png")
    gallery_html(clips_path, out_dir / "gallery.html")
    plot_losses(loss_csvs, out_dir / "losses.png")
    if stage_rejects is not None:
        filters_html(clips_path, stage_rejects, out_dir / "filters.html")
    if validation is not None:
        stages = {stage: {"loss": loss_csvs[stage], **validation[stage]} for stage in loss_csvs}
        validation_html(stages, out_dir / "validation.html", overfit_evaluations)
