"""The clip table: one parquet schema that every stage reads and extends.

A shard's table starts as manifest rows (one per source video), becomes one row per
scene clip after the split, and gains caption and cache columns later. Every stage
writes the full schema; columns it does not know yet stay null. Rejected items go to
a rejects table (id, url, stage, reason) so bad input never silently disappears.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from soraflow.core.atomic import atomic_path

CLIP_SCHEMA = pa.schema(
    [
        # identity and provenance
        pa.field("id", pa.string(), nullable=False),  # clip id, or video id before the split
        pa.field("video_id", pa.string()),
        pa.field("url", pa.string()),  # as written in the manifest
        pa.field("sha256", pa.string()),  # expected checksum from the manifest, if any
        pa.field("raw_path", pa.string()),  # downloaded source video
        # probe of the source video
        pa.field("codec", pa.string()),
        pa.field("rotation", pa.int32()),
        # the clip itself (after split; before it, the whole source video)
        pa.field("path", pa.string()),
        pa.field("start_frame", pa.int64()),  # inclusive, in source frames
        pa.field("end_frame", pa.int64()),  # exclusive
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("num_frames", pa.int64()),
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("aspect_ratio", pa.float64()),  # height / width, as Open-Sora
        pa.field("resolution", pa.int64()),  # height * width
        pa.field("duration_s", pa.float64()),
        # scores used by filters
        pa.field("motion", pa.float64()),
        pa.field("aes", pa.float64()),
        pa.field("text_area", pa.float64()),  # largest fraction of a frame OCR reads as text
        pa.field("match", pa.float64()),  # caption-video cosine similarity (CLIP)
        # pHashes of a few frames: 16 hex digits each, space-separated (near-duplicate search)
        pa.field("phash", pa.string()),
        # captions
        pa.field("text", pa.string()),  # the caption training uses
        pa.field("text_manifest", pa.string()),  # caption that came with the manifest
        pa.field("text_generated", pa.string()),  # caption the captioner wrote
        # pre-encoded training inputs (a stage's training index)
        pa.field("latent_path", pa.string()),
        pa.field("latent_index", pa.int64()),
        pa.field("bucket", pa.int64()),  # the position of its bucket in the stage's (soraflow.data.buckets)
        pa.field("text_emb_path", pa.string()),
        pa.field("text_emb_index", pa.int64()),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("url", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
    ]
)


def conform(df: pd.DataFrame, schema: pa.Schema = CLIP_SCHEMA) -> pa.Table:
    """Cast a frame to the schema: missing columns become null, unknown columns are an error."""
    unknown = sorted(set(df.columns) - set(schema.names))
    if unknown:
        kind = "rejects" if schema.equals(REJECT_SCHEMA) else "clip"
        raise ValueError(f"columns not in the {kind} table schema: {unknown}")
    columns = {}
    for field in schema:
        if field.name in df.columns:
            values = df[field.name].astype(object).where(df[field.name].notna(), None)
            columns[field.name] = pa.array(values.tolist(), type=field.type)
        else:
            columns[field.name] = pa.nulls(len(df), type=field.type)
    return pa.Table.from_pydict(columns, schema=schema)


def write(df: pd.DataFrame, path: str | Path, schema: pa.Schema = CLIP_SCHEMA) -> None:
    """Write a frame with the full schema, atomically (temp name, then rename)."""
    try:
        data = conform(df, schema)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    with atomic_path(path) as tmp:
        pq.write_table(data, tmp)


def read(path: str | Path) -> pd.DataFrame:
    """Read a clip (or rejects) table; a missing or foreign file is a clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clip table not found: {path}")
    return pq.read_table(path).to_pandas()


def empty(schema: pa.Schema = CLIP_SCHEMA) -> pd.DataFrame:
    return schema.empty_table().to_pandas()


def rejects(rows: list[dict]) -> pd.DataFrame:
    """A rejects frame from dicts with id, url, stage, reason."""
    return pd.DataFrame(rows, columns=REJECT_SCHEMA.names)


def write_rejects(rows: list[dict], path: str | Path) -> None:
    write(rejects(rows), path, REJECT_SCHEMA)


def concat(paths: list[str | Path]) -> pd.DataFrame:
    """All shards' tables as one frame (the schema keeps the columns aligned)."""
    frames = [read(p) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else empty()
