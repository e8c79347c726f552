"""Held-out validation while a stage trains: the diffusion loss on the stage's validation clips,
sample grids over steps, and the over-fitting warning.

The validation loss of given weights is one number: every validation clip is noised at the
same `timesteps` steps, evenly spread over the schedule, with noise drawn from a generator of
its own (seeded by the run's seed, the clip id and the timestep), and no caption is dropped.
So the same weights always give the same loss, and an exact resume logs the numbers an
uninterrupted run does. The items are shared out over the data-parallel ranks (the ranks of a
sequence-parallel group evaluate the same items, each its share of the tokens); a batch holds
items of one bucket (one latent shape), and every rank runs the same number of batches (padding
items weigh nothing), since a sharded model's forward is a collective, and one all-reduce sums
the losses.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
from pathlib import Path

import torch

from soraflow.data.cache import LatentDataset

LOG_COLUMNS = ["step", "loss", "ema_loss", "seconds"]


def fixed_timesteps(objective, count: int) -> list:
    """`count` timesteps evenly spread over the objective's range, each the middle of its share:
    IDDPM's steps in [0, num_timesteps), flow matching's u in [0, 1)."""
    quantiles = [(k + 0.5) / count for k in range(count)]
    steps = getattr(objective, "num_timesteps", None)
    return [int(q * steps) for q in quantiles] if steps else quantiles


def item_noise(seed: int, clip_id: str, timestep: int, shape) -> torch.Tensor:
    digest = hashlib.sha256(f"validation/{seed}/{clip_id}/{timestep}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))


class ValidationSet:
    """This rank's share of the validation items (clip, timestep), as fixed batches on the CPU."""

    def __init__(self, data: LatentDataset, settings: dict, seed: int, objective, batch_size: int,
                 dp_rank: int, dp_size: int):
        clips = min(len(data), settings["max_clips"])
        timesteps = fixed_timesteps(objective, settings["timesteps"])
        items = [(row, t) for row in range(clips) for t in timesteps]
        per_rank = math.ceil(len(items) / dp_size)
        shares = [rank_batches(items[rank * per_rank : (rank + 1) * per_rank], data.buckets, batch_size)
                  for rank in range(dp_size)]  # fmt: skip
        # every rank runs the same number of batches: pad with weightless copies of the first item
        mine = shares[dp_rank] + [[(items[0], 0.0)] * batch_size] * (max(map(len, shares)) - len(shares[dp_rank]))
        self.batches = []
        for batch in mine:
            x, y, mask, noise = [], [], [], []
            for (row, t), _ in batch:
                latents, features, caption_mask = data[row]
                x.append(latents), y.append(features), mask.append(caption_mask)
                noise.append(item_noise(seed, str(data.index["id"].iloc[row]), t, latents.shape))
            self.batches.append({
                "x": torch.stack(x), "y": torch.stack(y), "mask": torch.stack(mask), "noise": torch.stack(noise),
                "t": torch.tensor([t for (_, t), _ in batch]),
                "weight": torch.tensor([weight for _, weight in batch], dtype=torch.float64),
            })  # fmt: skip
        self.size = len(items)

    def loss_sums(self, model_fn, objective, device, autocast) -> torch.Tensor:
        """[sum of this rank's weighted losses, their weight] (float64, on `device`)."""
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in self.batches:
                b = {k: v.to(device) for k, v in batch.items()}
                drop = torch.zeros(len(b["t"]), dtype=torch.long, device=device)
                with autocast:
                    losses = objective.training_losses(model_fn, b["x"], b["t"], noise=b["noise"],
                                                       model_kwargs={"y": b["y"], "mask": b["mask"], "force_drop_ids": drop})
                sums[0] += (losses["loss"].double() * b["weight"]).sum()
                sums[1] += b["weight"].sum()
        return sums


def rank_batches(items: list[tuple[int, object]], bucket: list[int], batch_size: int) -> list[list[tuple]]:
    """A rank's items (row, timestep) as batches of (item, weight), each of one bucket's rows: the
    items of each bucket in order, the last batch of each padded with weightless copies of its first."""
    batches = []
    for _, group in itertools.groupby(sorted(items, key=lambda item: bucket[item[0]]), key=lambda item: bucket[item[0]]):
        group = list(group)
        weighted = [(item, 1.0) for item in group] + [(group[0], 0.0)] * (-len(group) % batch_size)
        batches += [weighted[start : start + batch_size] for start in range(0, len(weighted), batch_size)]
    return batches


def append_row(path: Path, step: int, loss: float, ema_loss: float | None, seconds: float) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(LOG_COLUMNS)
        writer.writerow([step, f"{loss:.6f}", "" if ema_loss is None else f"{ema_loss:.6f}", f"{seconds:.3f}"])


def write_empty_log(path: Path) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerow(LOG_COLUMNS)


def overfitting(validation: list[tuple[int, float]], training: list[tuple[int, float]], evaluations: int) -> str | None:
    """A warning when the last `evaluations` validation losses each rose over the one before
    while the training loss fell over the same steps (its mean over the log rows since the
    previous evaluation, at the first and the last of them); None otherwise.
    validation, training: (step, loss) in step order."""
    if len(validation) <= evaluations:
        return None
    window = validation[-evaluations - 1 :]
    if not all(later[1] > earlier[1] for earlier, later in zip(window, window[1:])):
        return None

    def training_at(index: int) -> float | None:
        low = window[index - 1][0] if index > 0 else -1
        losses = [loss for step, loss in training if low < step <= window[index][0]]
        return sum(losses) / len(losses) if losses else None

    before, after = training_at(0), training_at(len(window) - 1)
    if before is None or after is None or after >= before:
        return None
    return (f"over-fitting? validation loss rose for {evaluations} evaluations in a row up to step {window[-1][0]} "
            f"({window[0][1]:.4f} at step {window[0][0]} -> {window[-1][1]:.4f}) while training loss fell "
            f"({before:.4f} -> {after:.4f})")


def read_log(path: Path, column: str = "loss") -> list[tuple[int, float]]:
    """(step, value) rows of a loss or validation log that have the column filled."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as f:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(f) if row.get(column)]
