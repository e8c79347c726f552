"""The cache of pre-encoded training inputs: VAE latents per stage and text features, and
LatentDataset, which reads a stage's rows back.

A file format, so it sits in the data layer: training's encode jobs write it and the trainer
reads it, and sampling reads its training clips' latents from it without importing training.

Open-Sora 1.0 ran the VAE and T5 on every training step; caching them once makes
training steps several times cheaper (their #393). A shard's cache is

    {name}.json        the index (the encode rule's output): the cache key (settings), and
                       for every clip its id, per-clip key, chunk file and row (and, for
                       latents, its bucket: soraflow.data.buckets)
    {name}/*.safetensors  chunk files of whole batches, written once they hold CHUNK_BYTES

so an encode job holds one chunk in memory, never the shard. A chunk's rows are of one shape
(a stage's buckets give latents of several: a chunk ends where the shape changes). Each chunk names its
settings key, clip ids and per-clip keys in its metadata. A per-clip key is the hash of
the settings and of what the clip's row is made from (its frames, or its caption): a
job reuses every row of an earlier chunk whose key it still wants and encodes only the
clips it is missing, so a filter change, a retried job or new captions for a few clips
re-encode only those clips. Chunks of other settings are removed when a job finishes;
chunks of the same settings stay (a filter loosened again finds its clips there).

The chunk files are an encode job's progress too: Snakemake deletes only the index before a
retry, and a killed job's retry encodes the clips after its last chunk. A chunk holds whole
batches, so the retry's batches start where the killed job's did and hold the same clips:
an encoder's output can depend on what shares its batch, and the cache a retry finishes is
the one an uninterrupted job writes, byte for byte.

Latents and text features are stored in `cache.dtype` (bf16 by default, half of fp32;
LatentDataset reads them back as float32); the text mask is stored as each caption's
token count (`lengths`), as tokenizers pad on the right.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from soraflow.core.atomic import atomic_path
from soraflow.data import table
from soraflow.data.manifest import shard_ids

# rows buffered before a chunk file is written (then one batch more at most): what an encode job
# holds, whatever the shard's size (16 MiB: 32 latent rows at 16 x 512 px; a batch of T5-XXL
# captions is 64 MiB)
CHUNK_BYTES = 16 * 2**20
OPEN_CHUNKS = 64  # chunk files a reader keeps open (memory maps), least recently used closed first
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def write_cache(tensors: dict[str, torch.Tensor], ids: list[str], key: dict, path: str | Path,
                clip_keys: list[str] | None = None) -> None:
    """One chunk file: row i of every tensor belongs to clip ids[i]. Its metadata is one entry
    (safetensors writes several in a random order, so equal chunks would differ in bytes)."""
    metadata = {"chunk": json.dumps({"ids": ids, "cache_key": key, "clip_keys": clip_keys or []}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def chunk_metadata(path: str | Path) -> dict:
    """A chunk file's ids, cache_key (the settings its rows were encoded with) and clip_keys."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["chunk"])


def text_tensors(features: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Text features [N, L, C] and their right-padded mask [N, L] as cache rows: features in
    `dtype`, the mask as token counts [N] (int32)."""
    lengths = mask.sum(dim=1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1]) < lengths[:, None]):
        raise ValueError("the text encoder's tokenizer does not pad on the right: masks cannot be stored as lengths")
    return {"y": features.to(dtype), "lengths": lengths.to(torch.int32)}


def mask_from_length(length: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return torch.arange(num_tokens) < length


def shard_cache_paths(directory: str | Path, num_shards: int) -> list[Path]:
    """`{directory}/{shard}.json` for every shard, as workflow.Layout names cache indexes."""
    return [Path(directory) / f"{shard}.json" for shard in shard_ids(num_shards)]


def chunk_dir(index_path: str | Path) -> Path:
    """The folder beside an index that holds its chunk files."""
    path = Path(index_path)
    return path.with_name(path.name.removesuffix(".json"))


def read_index(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def read_ids(path: str | Path) -> list[str]:
    return read_index(path)["ids"]


def read_key(path: str | Path) -> dict:
    return read_index(path)["cache_key"]


def chunk_key(path: str | Path) -> dict:
    """The settings a chunk file's rows were encoded with."""
    return chunk_metadata(path)["cache_key"]


def clip_values(path: str | Path, column: str) -> dict:
    """clip id -> its value of a per-clip column of an index (ChunkStore.finish's `columns`)."""
    index = read_index(path)
    return dict(zip(index["ids"], index[column]))


def locate(path: str | Path) -> dict[str, tuple[str, int]]:
    """clip id -> (chunk file, row) of every clip an index holds."""
    index = read_index(path)
    folder = chunk_dir(path)
    return {i: (str(folder / chunk), row) for i, chunk, row in zip(index["ids"], index["chunks"], index["rows"])}


class ChunkStore:
    """Rows of one shard's cache, written chunk by chunk into the folder beside `index_path`.

        store = ChunkStore(index_path, settings)
        missing = store.missing(clip_keys)        # the keys no chunk of these settings holds
        store.add(ids, clip_keys, {"latents": ...})  # as batches are encoded
        store.finish(ids, clip_keys, bucket=[...])  # write the index (with per-clip columns);
                                                    # remove other settings' chunks
    """

    def __init__(self, index_path: str | Path, settings: dict):
        self.index_path = Path(index_path)
        self.folder = chunk_dir(index_path)
        self.settings = settings
        self.prefix = digest(settings)[:16]
        self.found: dict[str, tuple[str, int]] = {}  # clip key -> (chunk name, row)
        self.folder.mkdir(parents=True, exist_ok=True)
        for partial in self.folder.glob("*.tmp"):
            partial.unlink()  # a chunk a killed job was writing (one job per store runs at a time)
        for chunk in sorted(self.folder.glob(f"{self.prefix}-*.safetensors")):
            keys = chunk_metadata(chunk)["clip_keys"]
            self.found.update({key: (chunk.name, row) for row, key in enumerate(keys)})
        self.pending: list[tuple[list[str], list[str], dict[str, torch.Tensor]]] = []
        self.pending_rows = 0
        self.rows_per_chunk: int | None = None

    def missing(self, clip_keys: list[str]) -> list[int]:
        """Positions of the keys that no chunk holds yet."""
        return [i for i, key in enumerate(clip_keys) if key not in self.found]

    def add(self, ids: list[str], clip_keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Rows of a batch (tensors [n, ...], on the CPU); a chunk is written whenever enough are held,
        and before rows of another shape."""
        if self.pending and any(t.shape[1:] != self.pending[-1][2][n].shape[1:] for n, t in tensors.items()):
            self._write()
            self.rows_per_chunk = None
        if self.rows_per_chunk is None:
            row_bytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
            self.rows_per_chunk = max(1, CHUNK_BYTES // max(row_bytes, 1))
        self.pending.append((list(ids), list(clip_keys), tensors))
        self.pending_rows += len(ids)
        if self.pending_rows >= self.rows_per_chunk:
            self._write()

    def _write(self) -> None:
        """Write the pending batches as one chunk."""
        ids = [i for batch_ids, _, _ in self.pending for i in batch_ids]
        keys = [key for _, batch_keys, _ in self.pending for key in batch_keys]
        tensors = {n: torch.cat([batch[n] for _, _, batch in self.pending]) for n in self.pending[0][2]}
        self.pending, self.pending_rows = [], 0
        name = f"{self.prefix}-{digest(keys)[:16]}.safetensors"
        write_cache(tensors, ids, self.settings, self.folder / name, clip_keys=keys)
        self.found.update({key: (name, row) for row, key in enumerate(keys)})

    def finish(self, ids: list[str], clip_keys: list[str], **columns: list) -> None:
        """Write the last chunk and the index over `ids` (each must have been added or found), with
        `columns`: more values per clip, in the order of `ids`."""
        if self.pending_rows:
            self._write()
        absent = [i for i, key in zip(ids, clip_keys) if key not in self.found]
        if absent:
            raise RuntimeError(f"{self.index_path}: clips never encoded: {absent[:5]}")
        where = [self.found[key] for key in clip_keys]
        index = {"cache_key": self.settings, "ids": list(ids), "clip_keys": list(clip_keys),
                 "chunks": [chunk for chunk, _ in where], "rows": [row for _, row in where], **columns}
        with atomic_path(self.index_path) as tmp:
            tmp.write_text(json.dumps(index))
        for stale in self.folder.glob("*.safetensors"):
            if not stale.name.startswith(self.prefix + "-"):
                stale.unlink()  # other settings: never read by this index


class CachedRows:
    """Random access to rows of chunk files, without loading whole chunks. At most OPEN_CHUNKS
    files stay open (a stage's cache may span tens of thousands), and handles are opened per
    process, so DataLoader workers forked from a reader open their own."""

    def __init__(self):
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: str, name: str, index: int) -> torch.Tensor:
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        if path in self._handles:
            self._handles.move_to_end(path)
        else:
            self._handles[path] = safe_open(path, "pt")
            if len(self._handles) > OPEN_CHUNKS:
                self._handles.popitem(last=False)
        return self._handles[path].get_slice(name)[index]


class LatentDataset(Dataset):
    """(latents [C,T,h,w], text features [L,C], text mask [L] bool) for each row of a stage index
    (a clip table whose rows point at their latent and text feature rows in the shard caches),
    as float32 whatever the cache stores. Rows of one bucket have latents of one shape."""

    def __init__(self, index_path):
        self.index = table.read(index_path)
        self.rows = CachedRows()
        # each row's bucket; an index without the column (built by hand, of one size) has one bucket
        self.buckets = self.index["bucket"].fillna(0).astype(int).tolist()

    def __len__(self) -> int:
        return len(self.index)

    def bucket_rows(self) -> list[list[int]]:
        """The rows of each bucket that holds any, in bucket order (the first: the stage's first
        bucket with clips)."""
        rows: dict[int, list[int]] = {}
        for row, bucket in enumerate(self.buckets):
            rows.setdefault(bucket, []).append(row)
        return [rows[bucket] for bucket in sorted(rows)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        row = self.index.iloc[i]
        latents = self.rows.get(row.latent_path, "latents", int(row.latent_index))
        y = self.rows.get(row.text_emb_path, "y", int(row.text_emb_index))
        length = self.rows.get(row.text_emb_path, "lengths", int(row.text_emb_index))
        return latents.float(), y.float(), mask_from_length(length, y.shape[0])
