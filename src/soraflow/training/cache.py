"""The cache of pre-encoded training inputs: VAE latents and text features, one safetensors
file per shard (written by soraflow.training.encode, read row by row by training).

Open-Sora 1.0 ran the VAE and T5 on every training step; caching them once makes
training steps several times cheaper (their #393). Latents are keyed by the
autoencoder and the stage's frame sampling; text features by the text encoder and the
captions, so changing one re-encodes only its own cache (Snakemake sees the params).
Each file stores its clip ids and its cache key as metadata (`read_ids`, `read_key`), so
any cache file says which clips and which settings it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soraflow.core.atomic import atomic_path
from soraflow.data.manifest import shard_ids


def write_cache(tensors: dict[str, torch.Tensor], ids: list[str], key: dict, path: str | Path) -> None:
    metadata = {"ids": json.dumps(ids), "cache_key": json.dumps(key, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def shard_cache_paths(directory: str | Path, num_shards: int) -> list[Path]:
    """`{directory}/{shard}.safetensors` for every shard, as workflow.Layout names cache files."""
    return [Path(directory) / f"{shard}.safetensors" for shard in shard_ids(num_shards)]


def read_ids(path: str | Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ids"])


def read_key(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["cache_key"])


class CachedRows:
    """Random access to rows of shard cache files, without loading whole shards."""

    def __init__(self):
        self._handles: dict[str, object] = {}

    def get(self, path: str, name: str, index: int) -> torch.Tensor:
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_slice(name)[index]
