"""Aesthetic scorer: CLIP vision model + MLP head, loaded by path; fills aes in the score step."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from conftest import section

from soraflow.data import table
from soraflow.data.ingest import ingest_shard
from soraflow.data.split import split_shard
from soraflow.demo.models import build_tiny_aesthetic
from soraflow.scoring import aesthetic
from soraflow.scoring.aesthetic import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    OPENSORA_HIDDEN,
    AestheticHead,
    AestheticScorer,
    write_head_config,
)
from soraflow.scoring.filters import apply_filters
from soraflow.scoring.shard import score_shard

SPLIT = {"detector": "content", "threshold": 27.0, "min_scene_frames": 15, "min_seconds": 0.5, "max_seconds": 5.0,
         "fps": None, "shorter_side": None, "threads": 1}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_aes(tmp_path_factory):
    return build_tiny_aesthetic(tmp_path_factory.mktemp("models") / "tiny-aesthetic")


def images(seed: int, n: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (n, 48, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_tiny_model_loads_by_path_and_scores_images(tiny_aes):
    assert {p.name for p in tiny_aes.iterdir()} >= {"config.json", "model.safetensors", HEAD_WEIGHTS, HEAD_CONFIG}
    scorer = AestheticScorer.from_pretrained(str(tiny_aes))
    scores = scorer.score_images(images(0))
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert 1.0 < float(scores.mean()) < 10.0  # the predictor's range
    assert torch.equal(scores, scorer.score_images(images(0)))  # eval mode: dropout off
    assert not torch.equal(scores, scorer.score_images(images(1)))
    # a score depends on its own image only (batched like one by one)
    one = torch.stack([scorer.score_images(images(0)[k : k + 1])[0] for k in range(4)])
    assert torch.allclose(one, scores, atol=1e-5)


def test_head_keys_match_the_laion_predictor():
    head = AestheticHead(768, OPENSORA_HIDDEN)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }  # fmt: skip


def test_a_full_clip_model_checkpoint_loads_its_vision_half(tmp_path, tiny_aes):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    vision = json.loads((tiny_aes / "config.json").read_text())
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16).to_dict(),
        vision_config=CLIPVisionConfig(**{k: vision[k] for k in ("image_size", "patch_size", "hidden_size",
                                          "intermediate_size", "num_hidden_layers", "num_attention_heads")}).to_dict(),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(tmp_path)
    shutil.copy(tiny_aes / "preprocessor_config.json", tmp_path)
    head = AestheticHead(24, [8])
    save_file(head.state_dict(), str(tmp_path / HEAD_WEIGHTS))
    write_head_config(tmp_path, [8], 24)
    scorer = AestheticScorer.from_pretrained(str(tmp_path))
    full = CLIPModel.from_pretrained(tmp_path).eval()
    pixels = scorer.processor(images=list(images(2).numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = full.get_image_features(pixel_values=pixels)
        embeds = getattr(embeds, "pooler_output", embeds)
        expected = head.eval()(embeds / embeds.norm(dim=-1, keepdim=True))
    assert torch.allclose(scorer.score_images(images(2)), expected, atol=1e-5)


def test_a_folder_without_the_head_or_with_the_wrong_width_is_a_clear_error(tmp_path, tiny_aes):
    no_head = tmp_path / "no_head"
    shutil.copytree(tiny_aes, no_head)
    (no_head / HEAD_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="aesthetic_head.safetensors"):
        AestheticScorer.from_pretrained(str(no_head))
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_aes, wrong)
    write_head_config(wrong, [16, 8], 768)
    with pytest.raises(ValueError, match="768-d"):
        AestheticScorer.from_pretrained(str(wrong))


def test_a_clip_score_is_the_mean_of_three_frames(tiny_aes, synthetic_cut_video, monkeypatch):
    scorer = AestheticScorer.from_pretrained(str(tiny_aes))
    read = []
    real_read = aesthetic.video.read_frames
    monkeypatch.setattr(aesthetic.video, "read_frames", lambda path, idx: read.append(idx) or real_read(path, idx))
    score = scorer.score_clip(synthetic_cut_video["path"], 72)
    assert read == [[7, 36, 64]]  # 10%, 50%, 90% of 72 frames
    frames = real_read(synthetic_cut_video["path"], [7, 36, 64])
    assert score == pytest.approx(float(scorer.score_images(frames).mean()), abs=1e-6)


def test_score_fills_aes_and_min_aes_filters_on_it(tmp_path, tiny_aes, synthetic_cut_video):
    shard = tmp_path / "shard.parquet"
    table.write(pd.DataFrame({"id": ["cuts"], "video_id": ["cuts"], "url": [str(synthetic_cut_video["path"])]}), shard)
    ingest_shard(shard, tmp_path / "raw", tmp_path / "videos.parquet", tmp_path / "ir.parquet",
                 section("ingest", retries=0))  # fmt: skip
    split_shard(tmp_path / "videos.parquet", tmp_path / "clips", tmp_path / "clips.parquet", tmp_path / "sr.parquet", SPLIT)
    out = tmp_path / "scored.parquet"
    score_shard(tmp_path / "clips.parquet", out, section("score", aesthetic_model=str(tiny_aes)))
    clips = table.read(out)
    assert len(clips) == 3 and clips["aes"].notna().all()
    scorer = AestheticScorer.from_pretrained(str(tiny_aes))
    assert clips["aes"].tolist() == pytest.approx([scorer.score_clip(p) for p in clips["path"]], abs=1e-5)
    assert clips["aes"].nunique() == 3  # three different scenes, three different scores
    bar = float(clips["aes"].median())
    kept, rejects = apply_filters(clips, {"min_aes": bar})
    assert len(kept) == 2 and len(rejects) == 1 and "min_aes" in rejects[0]["reason"]

    # without a model the column stays empty, and filtering on it is an error, not a no-op
    score_shard(tmp_path / "clips.parquet", tmp_path / "s2.parquet", section("score", aesthetic_model=None))
    plain = table.read(tmp_path / "s2.parquet")
    assert plain["aes"].isna().all()
    with pytest.raises(ValueError, match="min_aes"):
        apply_filters(plain, {"min_aes": 5.0})


def test_build_all_builds_the_aesthetic_model(tmp_path, monkeypatch):
    from soraflow.demo import models as tiny_models

    built = []
    for name in ("tiny-llava", "tiny-vae", "tiny-t5"):
        (tmp_path / name).mkdir()  # present dirs are kept, so only the scorer is built here
    monkeypatch.setattr(tiny_models, "BUILDERS", {**tiny_models.BUILDERS})
    paths = tiny_models.build_all(tmp_path, {"tiny-aesthetic": {"projection_dim": 16}})
    built = json.loads((paths["tiny-aesthetic"] / HEAD_CONFIG).read_text())
    assert built["input_size"] == 16
    assert AestheticScorer.from_pretrained(str(paths["tiny-aesthetic"])).score_images(images(3)).shape == (4,)
