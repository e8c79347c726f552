"""A stage's training set: captioned clips that pass the stage's filters and have cached inputs.

The index is the clip table itself, with each row pointing at its latent and text
feature rows in the shard caches. Filters are applied here, not at detection time, so
changing a threshold rebuilds only this index and the training after it.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import Dataset

from soraflow.data import table
from soraflow.scoring.filters import apply_filters, join_scores
from soraflow.training import cache


def build_stage_index(captioned_tables, scored_tables, latent_files, text_files, filters: dict, out_path,
                      rejects_path) -> None:
    """Join shards' captioned clips with their scores and caches (matched by shard order), then filter."""
    if not (len(captioned_tables) == len(scored_tables) == len(latent_files) == len(text_files)):
        raise ValueError("build_stage_index: one captioned table, scored table, latent cache and text cache per shard")
    frames = []
    for table_path, scored_path, latent_path, text_path in zip(captioned_tables, scored_tables, latent_files, text_files):
        clips = join_scores(table.read(table_path), table.read(scored_path))
        latent_rows = {clip_id: i for i, clip_id in enumerate(cache.read_ids(latent_path))}
        text_rows = {clip_id: i for i, clip_id in enumerate(cache.read_ids(text_path))}
        # a clip rejected by the captioner has text features but no row here, and vice versa
        clips = clips[clips["id"].isin(latent_rows) & clips["id"].isin(text_rows)].copy()
        clips["latent_path"] = str(latent_path)
        clips["latent_index"] = clips["id"].map(latent_rows)
        clips["text_emb_path"] = str(text_path)
        clips["text_emb_index"] = clips["id"].map(text_rows)
        frames.append(clips)
    clips = pd.concat(frames, ignore_index=True) if frames else table.empty()
    kept, rejects = apply_filters(clips, filters)
    if kept.empty:
        raise ValueError(f"{out_path}: no clip passes the stage filters {filters} ({len(clips)} candidates)")
    table.write(kept, out_path)
    table.write_rejects(rejects, rejects_path)


class LatentDataset(Dataset):
    """(latents [C,T,h,w], text features [L,C], text mask [L]) for each row of a stage index."""

    def __init__(self, index_path):
        self.index = table.read(index_path)
        self.rows = cache.CachedRows()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        row = self.index.iloc[i]
        latents = self.rows.get(row.latent_path, "latents", int(row.latent_index))
        y = self.rows.get(row.text_emb_path, "y", int(row.text_emb_index))
        mask = self.rows.get(row.text_emb_path, "mask", int(row.text_emb_index))
        return latents, y, mask

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents, y, mask = zip(*(self[i] for i in indices))
        return torch.stack(latents), torch.stack(y), torch.stack(mask)
