"""Buckets: the set sizes (frames, height, width) a stage trains at, as Open-Sora 1.1+ and the LoRA
trainers (diffusion-pipe, musubi-tuner) group clips of many lengths and aspect ratios.

A stage's `buckets` lists them; without it the stage has one, `num_frames` x `resolution`^2 (Open-Sora
1.0's square sample). Each clip goes to one bucket (`assign`): the nearest in aspect ratio (by
|log(clip aspect / bucket aspect)|) among those whose frames, `frame_interval` apart, fit in the clip;
ties go to more frames, then to the larger area. Its frames are resized to cover the bucket and
centre-cropped, so the crop removes at most `crop_bound` of one side: 1 - min(r, 1/r), r = clip
aspect / bucket aspect (plus up to half a pixel of rounding), and nothing of the other side. The
encode job caches each clip at its bucket's size, and every training batch is drawn from one bucket.
"""

from __future__ import annotations

import math

Bucket = tuple[int, int, int]  # (frames, height, width) in pixels


def stage_buckets(stage: dict) -> list[Bucket]:
    """The stage's buckets, in the order listed (the first is the size the stage samples at)."""
    listed = stage.get("buckets")
    if not listed:
        return [(stage["num_frames"], stage["resolution"], stage["resolution"])]
    return [tuple(bucket) for bucket in listed]


def bucket_key(stage_name: str, stage: dict, position: int) -> str:
    """The config key that sets the size at `position` of stage_buckets (for error messages)."""
    return f"stages.{stage_name}.buckets[{position}]" if stage.get("buckets") else f"stages.{stage_name}"


def check(stage_name: str, stage: dict) -> None:
    """Buckets the family-agnostic way: each listed once (a clip's bucket must be one size), and
    no num_frames or resolution beside them (they would set nothing, yet re-encode when changed)."""
    beside = [key for key in ("num_frames", "resolution") if stage.get("buckets") and stage.get(key) is not None]
    if beside:
        raise ValueError(f"stages.{stage_name}.{beside[0]}: the stage lists buckets, which set its sizes; "
                         f"leave out {' and '.join(beside)}")
    listed = stage_buckets(stage)
    for position, bucket in enumerate(listed):
        if bucket in listed[:position]:
            raise ValueError(f"{bucket_key(stage_name, stage, position)}: {list(bucket)} is listed twice")


def frame_span(frames: int, frame_interval: int) -> int:
    """The source frames `frames` frames `frame_interval` apart span; a shorter clip cannot give
    them without squeezing its frames closer in time (playing faster than it was filmed)."""
    return (frames - 1) * frame_interval + 1


def aspect_distance(clip_aspect: float, bucket: Bucket) -> float:
    """|log(clip aspect / bucket aspect)|, aspects as width / height."""
    return abs(math.log(clip_aspect * bucket[1] / bucket[2]))


def assign(num_frames: int, height: int, width: int, buckets: list[Bucket], frame_interval: int) -> int | None:
    """The position of the clip's bucket (see the module), or None when no bucket's frames fit in it."""
    fitting = [i for i, bucket in enumerate(buckets) if frame_span(bucket[0], frame_interval) <= num_frames]
    if not fitting:
        return None
    aspect = width / height
    # rounded so that aspects equal but for floating-point error tie
    return min(fitting, key=lambda i: (round(aspect_distance(aspect, buckets[i]), 9), -buckets[i][0],
                                       -buckets[i][1] * buckets[i][2]))


def crop_bound(height: int, width: int, bucket: Bucket) -> float:
    """The most a cover-resize and centre crop removes of a clip's side for the bucket (the fraction of
    its width for a clip wider than the bucket, of its height for a taller one): 1 - min(r, 1/r),
    r = clip aspect / bucket aspect."""
    r = math.exp(aspect_distance(width / height, bucket))
    return 1 - 1 / r


def largest(stage: dict) -> Bucket:
    """The stage's bucket of the most pixels (frames x height x width): what sizes its memory."""
    return max(stage_buckets(stage), key=lambda bucket: math.prod(bucket))
