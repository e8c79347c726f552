"""A stage's training set: captioned clips that pass the stage's filters and have cached inputs,
and the samples training draws from it.

The index is the clip table itself, with each row pointing at its latent and text
feature rows in the shard caches. Filters are applied when the stage's latents are
encoded (only kept clips are encoded) and again here, where the rejects are recorded;
never at detection time, so changing a threshold re-runs no scoring. Clips held out for
validation (`held_out`: a hash of the clip id alone) go to the stage's validation index
instead, encoded like its training clips; no stage ever trains on them.

Training reads through a DataLoader: `StepBatches` yields, step by step, this rank's
share of the step's global batch, all of one bucket (soraflow.data.buckets: the step's
bucket is drawn from (seed, step), weighted by the clips each holds, then its rows), and `TrainingSamples` reads each sample and draws its
noise, timestep and caption drop from a generator seeded by (seed, step, position in the
global batch). The step number is thus the whole data position: a resumed run, or a run
on another number of processes, sees exactly the same samples, and each rank draws only
its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from soraflow.data import cache, table
from soraflow.data.cache import LatentDataset
from soraflow.scoring.filters import apply_filters, join_scores


def held_out(clip_id: str, fraction: float) -> bool:
    """Whether a clip belongs to the validation set: its id's hash, as a number in [0, 1), falls
    below `fraction`. It depends on the id alone, so a clip is held out in every stage and every
    re-run, and appending clips never moves one between the sets."""
    value = int.from_bytes(hashlib.sha256(f"validation/{clip_id}".encode()).digest()[:8], "big") / 2**64
    return value < fraction


def build_stage_index(captioned_tables, scored_tables, latent_files, text_files, filters: dict, out_path,
                      rejects_path, step_rejects=(), validation_fraction: float = 0.0, validation_path=None,
                      matched_tables=None) -> None:
    """Join shards' captioned clips with their scores (the score step's tables, and the match
    step's `matched_tables` when given) and cache indexes (matched by shard order), then filter. The clips named in `step_rejects` (the rejects tables of the score and encode
    jobs: clips that do not decode, or too short for the stage) are left out and recorded in the
    stage's rejects. Every kept clip must have cached latents and text features: the encode jobs
    applied the same filters to the same clips, so a missing row means a cache from other settings.
    Kept clips `held_out` at `validation_fraction` go to `validation_path` (written, perhaps empty,
    whenever it is given), not to the training index."""
    if not (len(captioned_tables) == len(scored_tables) == len(latent_files) == len(text_files)):
        raise ValueError("build_stage_index: one captioned table, scored table, latent cache and text cache per shard")
    dropped = {row["id"]: row for path in step_rejects for row in table.read(path).to_dict("records")}
    kept_frames, rejects = [], []
    matched_tables = matched_tables or [None] * len(captioned_tables)
    if len(matched_tables) != len(captioned_tables):
        raise ValueError("build_stage_index: one matched table per shard")
    for table_path, scored_path, matched_path, latent_path, text_path in zip(
            captioned_tables, scored_tables, matched_tables, latent_files, text_files):  # fmt: skip
        captioned = table.read(table_path)
        left_out = captioned["id"].isin(list(dropped))
        rejects += [dropped[clip_id] for clip_id in captioned.loc[left_out, "id"]]
        matched = table.read(matched_path) if matched_path is not None else None
        kept, shard_rejects = apply_filters(join_scores(captioned[~left_out], table.read(scored_path), matched), filters)
        rejects += shard_rejects
        for cache_path, path_column, row_column in ((latent_path, "latent_path", "latent_index"),
                                                    (text_path, "text_emb_path", "text_emb_index")):
            where = cache.locate(cache_path)
            absent = sorted(set(kept["id"]) - set(where))
            if absent:
                raise ValueError(f"{cache_path}: no cached rows for {len(absent)} clips that pass the stage filters "
                                 f"(first: {absent[:3]}); it was built from other clips or filters: re-run its encode step")
            kept[path_column] = kept["id"].map(lambda i: where[i][0])
            kept[row_column] = kept["id"].map(lambda i: where[i][1])
        kept["bucket"] = kept["id"].map(cache.clip_values(latent_path, "bucket"))
        kept_frames.append(kept)
    kept = pd.concat(kept_frames, ignore_index=True) if kept_frames else table.empty()
    validation = kept["id"].map(lambda clip_id: held_out(clip_id, validation_fraction)).astype(bool)
    if validation_path is not None:
        table.write(kept[validation].reset_index(drop=True), validation_path)
    kept = kept[~validation].reset_index(drop=True)
    if kept.empty:
        raise ValueError(f"{out_path}: no clip passes the stage filters {filters} ({len(rejects)} candidates)")
    table.write(kept, out_path)
    table.write_rejects(rejects, rejects_path)


def step_rows(seed: int, step: int, bucket_rows: list[list[int]], batch_size: int) -> list[int]:
    """The rows of step `step`'s global batch, all from one bucket (`bucket_rows`: the rows of
    each): the bucket drawn with probability its share of the rows, from a generator of its own
    seeded by (seed, step), then the rows uniformly within it from a generator seeded by (seed,
    step) (so a stage of one bucket draws the rows it drew before buckets)."""
    digest = hashlib.sha256(f"bucket/{seed}/{step}".encode()).digest()
    sizes = torch.tensor([len(rows) for rows in bucket_rows], dtype=torch.float64)
    g_bucket = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    rows = bucket_rows[int(torch.multinomial(sizes, 1, generator=g_bucket))]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=g).tolist()]


class StepBatches(Sampler):
    """For each step in [start, stop): this rank's share of the step's global batch, as
    (step, position in the global batch, row) triples (a DataLoader batch_sampler)."""

    def __init__(self, bucket_rows: list[list[int]], seed: int, batch_size: int, rank: int, world: int, start: int,
                 stop: int):
        self.bucket_rows, self.seed, self.batch_size = bucket_rows, seed, batch_size
        per_rank = batch_size // world
        self.mine = range(rank * per_rank, (rank + 1) * per_rank)
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step in range(self.start, self.stop):
            rows = step_rows(self.seed, step, self.bucket_rows, self.batch_size)
            yield [(step, position, rows[position]) for position in self.mine]


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """A generator of its own for one sample of one step (hashed, so no two samples share a seed)."""
    digest = hashlib.sha256(f"{seed}/{step}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class TrainingSamples(Dataset):
    """One training sample per (step, position, row): the row's cached inputs, with its
    timestep, noise and caption drop drawn for that position of that step."""

    def __init__(self, data: LatentDataset, seed: int, draw_timestep, uncond_prob: float):
        """draw_timestep(generator): the objective's draw of a sample's timestep."""
        self.data, self.seed, self.draw_timestep, self.uncond_prob = data, seed, draw_timestep, uncond_prob

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        step, position, row = key
        latents, y, mask = self.data[row]
        g = sample_generator(self.seed, step, position)
        t = self.draw_timestep(g)
        noise = torch.randn(latents.shape, generator=g)
        drop = torch.rand((), generator=g) < self.uncond_prob
        return {"x": latents, "y": y, "mask": mask, "t": t, "noise": noise, "drop": drop, "row": torch.tensor(row)}
