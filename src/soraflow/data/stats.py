"""What a workflow run holds so far: clips, durations, sizes, captions and rejects by reason."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from soraflow.data import table


def latest_tables(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(clips, rejects) across shards, each shard at its furthest stage (captioned, else split)."""
    clips, rejects = [], []
    for shard in sorted(Path(root).glob("shards/*")):
        for name in ("captioned", "clips"):
            if (shard / f"{name}.parquet").exists():
                clips.append(table.read(shard / f"{name}.parquet"))
                break
        rejects += [table.read(p) for p in sorted(shard.glob("rejects_*.parquet"))]
    as_frame = lambda frames, empty: pd.concat(frames, ignore_index=True) if frames else empty  # noqa: E731
    return as_frame(clips, table.empty()), as_frame(rejects, table.empty(table.REJECT_SCHEMA))


def summary(clips: pd.DataFrame, rejects: pd.DataFrame) -> dict:
    durations = clips["duration_s"].dropna()
    return {
        "videos": int(clips["video_id"].nunique()),
        "clips": len(clips),
        "hours": float(durations.sum() / 3600),
        "duration_s": durations.describe().round(2).to_dict() if len(durations) else {},
        "resolutions": clips.apply(lambda r: f"{r.width}x{r.height}", axis=1).value_counts().to_dict() if len(clips) else {},
        "captioned": int(clips["text"].notna().sum()),
        "rejects": rejects.groupby(["stage", "reason"]).size().sort_values(ascending=False).to_dict(),
    }


def inspect_tables(root: str | Path) -> str:
    """A plain-text summary for `soraflow inspect`."""
    if not Path(root, "shards").is_dir():
        raise SystemExit(f"{root}/shards not found: run the workflow first, or pass --root (the config's data.root)")
    facts = summary(*latest_tables(root))
    lines = [
        f"videos: {facts['videos']}   clips: {facts['clips']}   captioned: {facts['captioned']}   "
        f"footage: {facts['hours'] * 60:.1f} min",
        "clip seconds: " + "  ".join(f"{k} {v}" for k, v in facts["duration_s"].items() if k != "count"),
        "sizes: " + ", ".join(f"{size} ({count})" for size, count in facts["resolutions"].items()),
        f"rejects: {sum(facts['rejects'].values())}",
    ]
    lines += [f"  {count:5d}  {stage}: {reason}" for (stage, reason), count in facts["rejects"].items()]
    return "\n".join(lines)
