"""The encode jobs: a shard's clips through the frame autoencoder, its captions through the text encoder."""

from __future__ import annotations

import torch

from soraflow.core.progress import progress
from soraflow.data import table, video
from soraflow.models.encoders import TextEncoder, load_autoencoder
from soraflow.training.cache import write_cache


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
