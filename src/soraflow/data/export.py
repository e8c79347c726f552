"""Export: every shard's captioned clips as one table, Open-Sora's CSV beside it, and
every shard's rejects in one place.

`results/clips.parquet` is our full clip table; `results/clips.csv` carries Open-Sora's
columns (path,text,num_frames,width,height,aspect_ratio,fps,resolution) so its training
scripts read our clips as they are; `results/rejects.parquet` collects what ingest, split
and captioning rejected, with the stage and the reason, so nothing is lost silently.

Shards are streamed one at a time (a 10-million-video run never sits in memory at once),
and each output is written under a temp name and renamed, so a present file is complete.
Shard tables are found from the shard folder and the shard count rather than a list of
paths on the command line, which would pass the kernel's argument limit at 10k shards.
The rule's inputs are the captioned tables only: each shard's rejects tables come from the
jobs that made its captioned table, so they exist whenever it does, and leaving them out
keeps 3 DAG edges per shard out of Snakemake's dry run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from soraflow.core.atomic import atomic_paths
from soraflow.data import table
from soraflow.data.manifest import shard_ids, shard_table_paths

OPENSORA_COLUMNS = ["path", "text", "num_frames", "width", "height", "aspect_ratio", "fps", "resolution"]
REJECT_STAGES = ("ingest", "split", "caption")


def _read(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"export: shard table not found: {path}")
    data = pq.read_table(path)
    if data.schema.equals(schema, check_metadata=False):
        return data
    # an older writer or a hand-made table: align the columns through the schema
    return table.conform(data.to_pandas(), schema)


def opensora_rows(clips: pa.Table) -> pa.Table:
    """Open-Sora's CSV columns; paths made absolute so the CSV works from any folder."""
    paths = [None if p is None else os.path.abspath(p) for p in clips.column("path").to_pylist()]
    columns = {"path": pa.array(paths, pa.string())}
    for name in OPENSORA_COLUMNS[1:]:
        columns[name] = clips.column(name)
    return pa.table(columns)


def export_tables(
    clip_tables: Sequence[str | Path],
    reject_tables: Iterable[str | Path],
    out_parquet: str | Path,
    out_csv: str | Path,
    out_rejects: str | Path,
) -> dict:
    """Concatenate clip tables into out_parquet and out_csv (Open-Sora columns), and reject
    tables into out_rejects. Clips without a caption or a path are an error: the caption
    step never writes them, so one here means a table from somewhere else.
    Returns counts: clips, rejects, rejects per stage."""
    counts = {"clips": 0, "rejects": 0, "rejects_by_stage": {}}
    with atomic_paths(out_parquet, out_csv, out_rejects) as (tmp_parquet, tmp_csv, tmp_rejects):
        with pq.ParquetWriter(tmp_parquet, table.CLIP_SCHEMA) as parquet, open(tmp_csv, "wb") as csv_file:
            csv_options = pacsv.WriteOptions(include_header=True, quoting_style="needed")
            csv = pacsv.CSVWriter(csv_file, opensora_rows(table.CLIP_SCHEMA.empty_table()).schema, write_options=csv_options)
            for path in clip_tables:
                clips = _read(Path(path), table.CLIP_SCHEMA)
                for column in ("path", "text"):
                    missing = clips.column(column).null_count
                    if missing:
                        raise ValueError(f"export: {path} has {missing} clips without {column!r}")
                parquet.write_table(clips)
                csv.write_table(opensora_rows(clips))
                counts["clips"] += clips.num_rows
            csv.close()
        with pq.ParquetWriter(tmp_rejects, table.REJECT_SCHEMA) as rejects:
            for path in reject_tables:
                rows = _read(Path(path), table.REJECT_SCHEMA)
                rejects.write_table(rows)
                counts["rejects"] += rows.num_rows
                by_stage = counts["rejects_by_stage"]
                for item in pc.value_counts(rows.column("stage")).to_pylist():
                    by_stage[item["values"]] = by_stage.get(item["values"], 0) + item["counts"]
    return counts


def export_shards(shards_dir: str | Path, num_shards: int, out_parquet, out_csv, out_rejects) -> dict:
    """export_tables over a workflow's shard folder: captioned tables, then the rejects of
    every stage (ingest, split, caption), shard by shard."""
    clip_tables = shard_table_paths(shards_dir, num_shards, "captioned")
    reject_tables = [
        path
        for shard in shard_ids(num_shards)
        for path in (Path(shards_dir) / shard / f"rejects_{stage}.parquet" for stage in REJECT_STAGES)
    ]
    return export_tables(clip_tables, reject_tables, out_parquet, out_csv, out_rejects)

