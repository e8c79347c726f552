"""The encode jobs: a shard's clips through the frame autoencoder, its captions through the
text encoder, streamed into the chunked cache (soraflow.data.cache).

A latent job encodes only the clips its stage's filters keep, each at the size of its bucket
(soraflow.data.buckets), and of those only the ones no chunk of the same settings holds yet (matched by per-clip key), so a filter change
or a retried job encodes just what is missing; with nothing missing no model is loaded.
Frames of several clips go through the autoencoder together (`vae.micro_batch` frames),
decoded on a background thread while the previous batch encodes. Memory holds a few
batches and one chunk, whatever the shard's size.
"""

from __future__ import annotations

import os

import av
import pandas as pd
import torch

from soraflow.core.background import prefetch
from soraflow.core.progress import progress
from soraflow.data import buckets, table, video
from soraflow.data.cache import DTYPES, ChunkStore, digest, text_tensors
from soraflow.models.encoders import TextEncoder, load_autoencoder
from soraflow.scoring.filters import apply_filters

OPERATIONAL = ("micro_batch",)  # encoder settings that never change a cached value (schemas/affects.yaml)
TEXT_BATCH = 64  # captions per text-encoder forward
FRAME_KEYS = ("num_frames", "frame_interval", "resolution")


def clip_frame_indices(num_frames_in_clip: int, stage: dict) -> list[int]:
    """The stage's frames of a clip (or its bucket's): num_frames, frame_interval apart, from its middle."""
    return video.evenly_spaced(num_frames_in_clip, stage["num_frames"], stage["frame_interval"])


def _reject(row, reason: str) -> dict:
    return {"id": row.id, "url": row.url, "stage": "encode_video", "reason": reason}


def video_clip_key(settings_digest: str, row) -> str:
    """What a clip's latents are made of: the settings, and the clip file as the split wrote it
    (a re-cut clip has a new file, so a new key)."""
    stat = os.stat(row.path)
    return digest([settings_digest, row.id, row.path, row.start_frame, row.end_frame, row.num_frames,
                   stat.st_size, stat.st_mtime_ns])


def decoded_batches(clips: pd.DataFrame, stage: dict, micro_batch: int):
    """(ids, pixels [n, T, 3, H, W] in [-1, 1], rejects) for every batch of clips of one bucket (the
    `bucket` column, a position in the stage's buckets): as many clips as hold `micro_batch` frames,
    bucket by bucket, in order; a clip whose file does not decode is a reject row instead (n may be 0)."""
    sizes = buckets.stage_buckets(stage)
    for bucket, group in clips.groupby("bucket", sort=True):
        frames, height, width = sizes[bucket]
        clips_per_batch = max(1, micro_batch // frames)
        for start in range(0, len(group), clips_per_batch):
            ids, pixels, rejects = [], [], []
            for row in group.iloc[start : start + clips_per_batch].itertuples():
                try:
                    indices = clip_frame_indices(int(row.num_frames), {**stage, "num_frames": frames})
                    decoded = video.read_frames(row.path, indices)
                except (ValueError, av.FFmpegError) as error:
                    if not video.is_video_fault(error):
                        raise  # the machine's fault (a clip file gone, an I/O error): fail, reject nothing
                    rejects.append(_reject(row, f"cannot decode frames: {error}"))
                    continue
                ids.append(row.id)
                pixels.append(video.resize_center_crop(decoded, (height, width)))
            yield ids, torch.stack(pixels) if pixels else None, rejects


def encode_video_shard(table_path, out_path, vae_params: dict, stage: dict, rejects_path=None) -> None:
    """Latents [C, T, h, w] of every clip of a shard that passes stage["filters"], at the frames
    and size of its bucket; `out_path` is the cache index, which records each clip's bucket. A clip
    shorter than every bucket's frame span, or whose file does not decode, has none: it goes to the
    rejects table (with rejects_path; without one it is an error)."""
    clips = table.read(table_path)
    kept, _ = apply_filters(clips, stage["filters"])
    sizes = buckets.stage_buckets(stage)
    kept = kept.assign(bucket=[buckets.assign(int(row.num_frames), int(row.height), int(row.width), sizes,
                                              stage["frame_interval"]) for row in kept.itertuples()])  # fmt: skip
    short = kept["bucket"].isna()
    fewest = min(frames for frames, _, _ in sizes)
    span = buckets.frame_span(fewest, stage["frame_interval"])
    rejects = [_reject(row, f"{row.num_frames} frames, fewer than the {span} that {fewest} frames "
                            f"{stage['frame_interval']} apart span") for row in kept[short].itertuples()]  # fmt: skip
    # bucket by bucket, so that a batch of clips (and a cache chunk) holds one size
    kept = kept[~short].astype({"bucket": int}).sort_values("bucket", kind="stable").reset_index(drop=True)
    settings = {"vae": {k: v for k, v in vae_params.items() if k not in OPERATIONAL},
                "frames": {k: stage.get(k) for k in FRAME_KEYS}}
    if stage.get("buckets"):  # without, the settings (so the clip keys) are those of caches made before buckets
        settings["buckets"] = [list(bucket) for bucket in sizes]
    store = ChunkStore(out_path, settings)
    settings_digest = digest(settings)
    keys = [video_clip_key(settings_digest, row) for row in kept.itertuples()]
    missing = store.missing(keys)
    print(f"{len(kept)} of {len(clips)} clips pass the stage filters; {len(missing)} to encode", flush=True)
    if missing:
        autoencoder = load_autoencoder(vae_params)
        todo = kept.iloc[missing]
        key_of = dict(zip(kept["id"], keys))
        batches = prefetch(decoded_batches(todo, stage, vae_params["micro_batch"]), depth=2)
        with progress(total=len(todo), desc="encode video") as bar:
            for ids, pixels, unreadable in batches:
                rejects += unreadable
                bar.update(len(unreadable))
                if pixels is None:
                    continue
                n = len(pixels)
                latents = autoencoder.encode_clips(pixels)  # [n, C, T', h, w]
                store.add(ids, [key_of[i] for i in ids], {"latents": latents.to(DTYPES[vae_params["cache_dtype"]])})
                bar.update(n)
    if rejects and rejects_path is None:
        raise ValueError(f"{table_path}: clips without latents: {rejects[:3]}")
    encoded = ~kept["id"].isin([reject["id"] for reject in rejects])
    store.finish(kept["id"][encoded].tolist(), [key for key, keep in zip(keys, encoded) if keep],
                 bucket=kept["bucket"][encoded].tolist())
    if rejects_path is not None:
        table.write_rejects(rejects, rejects_path)


def encode_text_shard(table_path, out_path, text_params: dict) -> None:
    """Text features [L, C] and token counts of every captioned clip of a shard; clips whose
    captions are equal share one row."""
    clips = table.read(table_path)
    texts = clips["text"].fillna("").tolist()
    settings = {"text_encoder": {k: v for k, v in text_params.items() if k not in OPERATIONAL}}
    store = ChunkStore(out_path, settings)
    settings_digest = digest(settings)
    keys = [digest([settings_digest, text]) for text in texts]
    first_of = {}  # one clip per distinct missing caption
    for position in store.missing(keys):
        first_of.setdefault(keys[position], position)
    todo = list(first_of.values())
    print(f"{len(clips)} captioned clips; {len(todo)} distinct captions to encode", flush=True)
    if todo:
        encoder = TextEncoder(text_params)
        for start in progress(range(0, len(todo), TEXT_BATCH), desc="encode text"):
            batch = todo[start : start + TEXT_BATCH]
            features, mask = encoder.encode_batch([texts[i] for i in batch])
            store.add([clips["id"].iloc[i] for i in batch], [keys[i] for i in batch],
                      text_tensors(features, mask, DTYPES[text_params["cache_dtype"]]))
    store.finish(clips["id"].tolist(), keys)
