"""Pre-encoded training inputs: VAE latents and text features, one safetensors file per shard.

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

from soraflow import table, video
from soraflow.atomic import atomic_path
from soraflow.encoders import TextEncoder, load_autoencoder
from soraflow.manifest import shard_ids
from soraflow.progress import progress


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


def clip_frame_indices(num_frames_in_clip: int, stage: dict) -> list[int]:
    return video.evenly_spaced(num_frames_in_clip, stage["num_frames"], stage["frame_interval"])


def encode_video_shard(table_path, out_path, vae_params: dict, stage: dict) -> None:
    """Latents [N, C, T, h, w] for every clip of a shard, at the stage's frames and size."""
    clips = table.read(table_path)
    autoencoder = load_autoencoder(vae_params)
    latents = []
    for row in progress(clips.itertuples(), desc="encode video", total=len(clips)):
        frames = video.read_frames(row.path, clip_frame_indices(int(row.num_frames), stage))
        pixels = video.resize_center_crop(frames, stage["resolution"])  # [T,3,H,W]
        latents.append(autoencoder.encode(pixels).transpose(0, 1))  # [C,T,h,w]
    size = stage["resolution"] // autoencoder.downsample
    empty = torch.zeros(0, autoencoder.latent_channels, stage["num_frames"], size, size)
    stacked = torch.stack(latents) if latents else empty
    key = {"vae": vae_params, "frames": {k: stage[k] for k in ("num_frames", "frame_interval", "resolution")}}
    write_cache({"latents": stacked}, clips["id"].tolist(), key, out_path)


def encode_text_shard(table_path, out_path, text_params: dict) -> None:
    """Text features [N, L, C] and masks [N, L] for every captioned clip of a shard."""
    clips = table.read(table_path)
    encoder = TextEncoder(text_params)
    features, mask = encoder.encode(clips["text"].fillna("").tolist())
    write_cache({"y": features, "mask": mask}, clips["id"].tolist(), {"text_encoder": text_params}, out_path)


class CachedRows:
    """Random access to rows of shard cache files, without loading whole shards."""

    def __init__(self):
        self._handles: dict[str, object] = {}

    def get(self, path: str, name: str, index: int) -> torch.Tensor:
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        return self._handles[path].get_slice(name)[index]
