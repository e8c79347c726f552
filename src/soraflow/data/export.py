"""Export: every shard's captioned clips as one table, Open-Sora's CSVs beside it, and
every shard's rejects in one place.

`results/clips.parquet` is our full clip table. Two CSVs carry it to Open-Sora, each named
for the version that reads it: `clips_opensora-v1.0.csv` is Open-Sora 1.0's headerless
`path,text,num_frames` (its DatasetFromCSV reads every line, a header too, as a clip), and
`clips_opensora-v1.1.csv` has a header and the columns of Open-Sora 1.1+'s VideoTextDataset
(path,text,num_frames,width,height,aspect_ratio,fps,resolution). `results/rejects.parquet`
collects what ingest, split, scoring and captioning rejected, and the near-duplicates the dedup step
drops from every stage, with the stage and the reason, so nothing is lost silently.

Shards are streamed one at a time (a 10-million-video run never sits in memory at once),
and each output is written under a temp name and renamed, so a present file is complete.
Shard tables are found from the shard folder and the shard count rather than a list of
paths on the command line, which would pass the kernel's argument limit at 10k shards.
The rule's inputs are the captioned tables and the dedup table: each shard's rejects tables
come from the jobs that made its captioned table or the scored tables the dedup step read, so
they exist whenever those do, and leaving them out keeps 4 DAG edges per shard out of
Snakemake's dry run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from soraflow.core.atomic import atomic_paths
from soraflow.data import table
from soraflow.data.manifest import shard_ids, shard_table_paths

# Open-Sora 1.1+ (VideoTextDataset, header line); Open-Sora 1.0 (DatasetFromCSV, no header)
OPENSORA_COLUMNS = ["path", "text", "num_frames", "width", "height", "aspect_ratio", "fps", "resolution"]
OPENSORA_V1_0_COLUMNS = ["path", "text", "num_frames"]
REJECT_STAGES = ("ingest", "split", "score", "caption")


def _read(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.exists():
        raise FileNotFoundError(f"export: shard table not found: {path}")
    data = pq.read_table(path)
    if data.schema.equals(schema, check_metadata=False):
        return data
    # an older writer or a hand-made table: align the columns through the schema
    return table.conform(data.to_pandas(), schema)


def opensora_rows(clips: pa.Table, columns: list[str]) -> pa.Table:
    """Open-Sora's CSV columns; paths made absolute so the CSV works from any folder."""
    paths = [None if p is None else os.path.abspath(p) for p in clips.column("path").to_pylist()]
    return pa.table({"path": pa.array(paths, pa.string()), **{name: clips.column(name) for name in columns[1:]}})


def export_tables(
    clip_tables: Sequence[str | Path],
    reject_tables: Iterable[str | Path],
    out_parquet: str | Path,
    out_csv_v1_0: str | Path,
    out_csv_v1_1: str | Path,
    out_rejects: str | Path,
) -> dict:
    """Concatenate clip tables into out_parquet and the two Open-Sora CSVs (1.0: headerless
    path,text,num_frames; 1.1+: header and more columns), and reject tables into out_rejects.
    Clips without a caption or a path are an error: the caption step never writes them, so
    one here means a table from somewhere else. Returns counts: clips, rejects, rejects per stage."""
    counts = {"clips": 0, "rejects": 0, "rejects_by_stage": {}}
    csv_layouts = [(OPENSORA_V1_0_COLUMNS, False), (OPENSORA_COLUMNS, True)]  # (columns, header line)
    with atomic_paths(out_parquet, out_csv_v1_0, out_csv_v1_1, out_rejects) as (tmp_parquet, *tmp_csvs, tmp_rejects):
        with ExitStack() as files:
            parquet = files.enter_context(pq.ParquetWriter(tmp_parquet, table.CLIP_SCHEMA))
            csvs = []  # (writer, its columns)
            for tmp, (columns, header) in zip(tmp_csvs, csv_layouts):
                options = pacsv.WriteOptions(include_header=header, quoting_style="needed")
                schema = opensora_rows(table.CLIP_SCHEMA.empty_table(), columns).schema
                csvs.append((files.enter_context(pacsv.CSVWriter(str(tmp), schema, write_options=options)), columns))
            for path in clip_tables:
                clips = _read(Path(path), table.CLIP_SCHEMA)
                for column in ("path", "text"):
                    missing = clips.column(column).null_count
                    if missing:
                        raise ValueError(f"export: {path} has {missing} clips without {column!r}")
                parquet.write_table(clips)
                for writer, columns in csvs:
                    writer.write_table(opensora_rows(clips, columns))
                counts["clips"] += clips.num_rows
        with pq.ParquetWriter(tmp_rejects, table.REJECT_SCHEMA) as rejects:
            for path in reject_tables:
                rows = _read(Path(path), table.REJECT_SCHEMA)
                rejects.write_table(rows)
                counts["rejects"] += rows.num_rows
                by_stage = counts["rejects_by_stage"]
                for item in pc.value_counts(rows.column("stage")).to_pylist():
                    by_stage[item["values"]] = by_stage.get(item["values"], 0) + item["counts"]
    return counts


def export_shards(
    shards_dir: str | Path,
    num_shards: int,
    out_parquet,
    out_csv_v1_0,
    out_csv_v1_1,
    out_rejects,
    dedup_rejects: str | Path | None = None,
) -> dict:
    """export_tables over a workflow's shard folder: captioned tables, then the rejects of
    every stage (ingest, split, score, caption), shard by shard, then the dedup step's near-duplicates
    (`dedup_rejects`, the whole corpus's) when given."""
    clip_tables = shard_table_paths(shards_dir, num_shards, "captioned")
    reject_tables = [
        path
        for shard in shard_ids(num_shards)
        for path in (Path(shards_dir) / shard / f"rejects_{stage}.parquet" for stage in REJECT_STAGES)
    ]
    if dedup_rejects is not None:
        reject_tables.append(Path(dedup_rejects))
    return export_tables(clip_tables, reject_tables, out_parquet, out_csv_v1_0, out_csv_v1_1, out_rejects)
