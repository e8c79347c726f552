"""What a run's checkpoints belong to: a resumed run must be the same run.

A run's identity covers everything its result depends on: its output-changing settings
(the train rule's params, declared in schemas/affects.yaml; `steps` left out, so raising it
extends a run), its training index (which clips, in which order), the index of every shard
cache the training index reads from (the encode job's output: its settings key and, for every
clip, the key of what its row was made from and the chunk file that holds it, so a VAE or text
encoder change, or a re-cut clip, changes it), and the digests of its initial weights and of a
LoRA's frozen base (which its checkpoints leave out).
Resources, engine, process count, grad checkpointing and logging or checkpoint pace are not
settings the run receives in its params, so changing them resumes the run.

Rank 0 works the identity out and shares it (soraflow.training.loop): the files are read by
one process, not by every rank. Their digests are remembered in the run folder by (size,
modification time, inode), as Snakemake and make judge a file unchanged, so the next link of a
chain reads none of them again (the initial weights are 6 GB for hq_512): a file rewritten in
place with its size and time kept by hand is the one change this does not see.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from soraflow.core.atomic import atomic_path
from soraflow.data import cache

# settings a run may change and still resume its checkpoints: it trains longer
RESUMABLE = {"stage": {"steps"}}
CACHE_COLUMNS = ("latent_path", "text_emb_path")


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(paths, memo_path: Path | None) -> dict[str, str]:
    """sha256 of each file, reusing those `memo_path` remembers for a file of the same size,
    modification time and inode; the memo is rewritten with the files digested now."""
    memo = json.loads(memo_path.read_text()) if memo_path is not None and memo_path.exists() else {}
    digests, remembered = {}, {}
    for path in map(str, paths):
        stat = os.stat(path)
        key = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        known = memo.get(path)
        digests[path] = known["sha256"] if known and known["stat"] == key else file_digest(path)
        remembered[path] = {"stat": key, "sha256": digests[path]}
    if memo_path is not None and remembered != memo:
        with atomic_path(memo_path) as tmp:
            tmp.write_text(json.dumps(remembered))
    return digests


def shard_index(chunk: str) -> Path:
    """The shard cache index that lists a chunk file (`{name}/chunk.safetensors` -> `{name}.json`),
    or the chunk itself where it lies outside a shard cache (a cache written by hand)."""
    folder = Path(chunk).parent
    index = folder.with_name(folder.name + ".json")
    return index if index.exists() and cache.chunk_dir(index) == folder else Path(chunk)


def identity_parts(output_settings: dict, index_path, init_path, memo_path: Path | None = None,
                   frozen_files=()) -> dict:
    """The identity's components, kept in each checkpoint so a mismatch can say what changed.
    memo_path: where file digests are remembered (see the module's docstring). frozen_files: the
    files of weights that do not train, which a resumed run reads again (a LoRA's base)."""
    settings = {
        section: {k: v for k, v in values.items() if k not in RESUMABLE.get(section, ())}
        for section, values in output_settings.items()
    }
    columns = pq.read_table(index_path, columns=list(CACHE_COLUMNS))
    chunks = {path for name in CACHE_COLUMNS for path in pc.unique(columns[name]).to_pylist()}
    caches = sorted({str(shard_index(chunk)) for chunk in chunks})
    digests = file_digests([index_path, *caches, *([init_path] if init_path else []), *frozen_files], memo_path)
    parts = {
        "settings": settings,
        "index": digests[str(index_path)],
        "caches": {path: digests[path] for path in caches},
        "init": init_path and digests[str(init_path)],
    }
    if frozen_files:  # only then: the identity of a run without them stays what it was
        parts["frozen"] = {str(path): digests[str(path)] for path in frozen_files}
    return parts


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def what_changed(old: dict, new: dict) -> list[str]:
    """Readable differences between two identities' parts (settings key by key)."""
    changes = []
    old_settings, new_settings = old.get("settings", {}), new["settings"]
    for section in sorted({*old_settings, *new_settings}):
        before, after = old_settings.get(section, {}), new_settings.get(section, {})
        for key in sorted({*before, *after}):
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    if old.get("index") != new["index"]:
        changes.append("the training index (which clips)")
    changed_caches = sorted(path for path in {*old.get("caches", {}), *new["caches"]}
                            if old.get("caches", {}).get(path) != new["caches"].get(path))  # fmt: skip
    if changed_caches:
        changes.append(f"{len(changed_caches)} cache files ({', '.join(changed_caches[:3])}{', ...' if len(changed_caches) > 3 else ''})")
    if old.get("init") != new["init"]:
        changes.append("the initial weights")
    if old.get("frozen") != new.get("frozen"):
        changes.append("the frozen base's files")
    return changes
