"""What training reads: each step's rows as seeded before, each sample's own draws, any process count."""

from __future__ import annotations

import torch
from test_train import NUM_CLIPS, latent_index  # noqa: F401  (the fixture is shared)
from torch.utils.data import DataLoader

from soraflow.data.cache import LatentDataset
from soraflow.models.diffusion import IDDPM
from soraflow.training.dataset import StepBatches, TrainingSamples, step_rows

SEED, BATCH = 7, 4
ONE_BUCKET = [list(range(NUM_CLIPS))]


def test_each_step_draws_the_rows_it_drew_before_the_dataloader():
    # the trainer's draw before samples had their own generators: rows first, from (seed, step)
    for step in (0, 1, 57):
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        assert step_rows(SEED, step, ONE_BUCKET, BATCH) == torch.randint(NUM_CLIPS, (BATCH,), generator=g).tolist()


def batches(index, world: int, rank: int, start: int, stop: int, workers: int) -> list[dict]:
    samples = TrainingSamples(LatentDataset(index), SEED, IDDPM(1000).draw_timestep, uncond_prob=0.5)
    steps = StepBatches(ONE_BUCKET, SEED, BATCH, rank, world, start, stop)
    return list(DataLoader(samples, batch_sampler=steps, num_workers=workers, prefetch_factor=2 if workers else None))


def test_ranks_draw_their_own_share_of_the_same_global_batch(latent_index):  # noqa: F811
    one = batches(latent_index, world=1, rank=0, start=0, stop=3, workers=2)
    two = [batches(latent_index, world=2, rank=r, start=0, stop=3, workers=0) for r in (0, 1)]
    assert len(one) == 3
    for step, whole in enumerate(one):
        assert whole["row"].tolist() == step_rows(SEED, step, ONE_BUCKET, BATCH)
        for key, value in whole.items():
            halves = torch.cat([two[0][step][key], two[1][step][key]])
            assert torch.equal(value, halves), (step, key)
    # every sample draws its own noise and timestep, drops its caption at p = 0.5 on its own
    noise = torch.cat([b["noise"] for b in one])
    assert len({tuple(n.flatten()[:4].tolist()) for n in noise}) == len(noise)
    assert not torch.equal(one[0]["t"], one[1]["t"])


def test_a_resumed_run_reads_the_same_batches(latent_index):  # noqa: F811
    whole = batches(latent_index, world=1, rank=0, start=0, stop=5, workers=0)
    resumed = batches(latent_index, world=1, rank=0, start=3, stop=5, workers=1)
    for before, after in zip(whole[3:], resumed):
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_samples_read_the_cached_rows_as_float32(latent_index):  # noqa: F811
    data = LatentDataset(latent_index)
    latents, y, mask = data[2]
    assert latents.dtype == y.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.tolist() == [True] * 5 + [False] * 27  # the fixture's captions have 5 tokens
