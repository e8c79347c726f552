"""STDiT: structure, parameter count, PixArt loading and the invariants Open-Sora relies on."""

import pytest
import torch

from soraflow.models.checkpoint import load_pretrained
from soraflow.models.stdit import STDiT, build_model, count_parameters

LATENT = (4, 8, 8)  # T, H, W: 4 frames of 4x4 tokens with patch (1, 2, 2)
CAPTION_LEN, CAPTION_DIM = 32, 384


def tiny(input_size=LATENT, **overrides) -> STDiT:
    torch.manual_seed(0)
    return build_model({"preset": "STDiT-tiny", **overrides}, input_size).eval()


def randomize_zero_init(model: STDiT, keep=lambda name: False) -> STDiT:
    """Give the zero-initialised layers (final, cross-attn and temporal projections) random
    weights, so a fresh model's output is not trivially zero; `keep` names ones to leave."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep(name) and not param.any():
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def inputs(batch=2, frames=LATENT[0], seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, *LATENT[1:], generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randn(batch, CAPTION_LEN, CAPTION_DIM, generator=generator)
    mask = torch.zeros(batch, CAPTION_LEN, dtype=torch.long)
    mask[0, :5], mask[1, :9] = 1, 1
    return x, t, y, mask


def test_xl_parameter_count_and_key_names():
    with torch.device("meta"):  # no memory, no init cost
        model = build_model({"preset": "STDiT-XL/2"}, (16, 32, 32))
    assert count_parameters(model) == 759_620_768
    assert round(759_620_768 / 2**20, 1) == 724.4
    buffers = dict(model.named_buffers())
    assert buffers["y_embedder.y_embedding"].shape == (120, 4096)  # null caption: not trained
    assert "y_embedder.y_embedding" not in dict(model.named_parameters())
    assert buffers["pos_embed"].shape == (1, 1, 256, 1152) and buffers["pos_embed_temporal"].shape == (1, 16, 1152)
    keys = set(model.state_dict())
    assert "pos_embed" not in keys  # recomputed for any grid, so checkpoints are size-free
    for key in [
        "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "t_block.1.weight",
        "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight", "y_embedder.y_embedding",
        "blocks.27.attn.qkv.weight", "blocks.27.attn.proj.weight", "blocks.27.attn_temp.qkv.weight",
        "blocks.27.attn_temp.proj.weight", "blocks.27.cross_attn.q_linear.weight",
        "blocks.27.cross_attn.kv_linear.weight", "blocks.27.cross_attn.proj.weight", "blocks.27.mlp.fc1.weight",
        "blocks.27.mlp.fc2.weight", "blocks.27.scale_shift_table", "final_layer.linear.weight",
        "final_layer.scale_shift_table",
    ]:
        assert key in keys, key
    assert model.x_embedder.proj.weight.shape == (1152, 4, 1, 2, 2)
    assert model.final_layer.linear.weight.shape == (8 * 4, 1152)  # learned sigma: 2 x 4 channels per patch


def test_build_model_config():
    model = build_model({"preset": "STDiT-tiny", "depth": 3, "space_scale": 0.5}, LATENT, caption_channels=384)
    assert len(model.blocks) == 3 and model.space_scale == 0.5
    assert build_model({"preset": "STDiT-demo"}, LATENT).hidden_size == 192
    with pytest.raises(ValueError, match="unknown STDiT config"):
        build_model({"preset": "STDiT-tiny", "hiden_size": 8}, LATENT)
    with pytest.raises(ValueError, match="caption_channels"):
        build_model({"preset": "STDiT-tiny", "caption_channels": 384}, LATENT, caption_channels=512)
    with pytest.raises(ValueError, match="preset"):
        build_model({"preset": "STDiT-XXL"}, LATENT)


def test_forward_shapes_and_caption_layouts():
    model = randomize_zero_init(tiny())
    x, t, y, mask = inputs()
    with torch.no_grad():
        out = model(x, t, y, mask)
        assert out.shape == (2, 8, *LATENT)
        assert torch.equal(out, model(x, t, y[:, None], mask[:, None, None]))  # Open-Sora's [B, 1, L, C]
        assert model(x[:, :, :2], t, y, mask).shape == (2, 8, 2, 8, 8)  # other sizes: pos-emb recomputed
        assert torch.isfinite(model(x, t, y, None)).all()


def test_block_order_and_token_layouts():
    """Spatial attention over (B T) x S, then temporal over (B S) x T, then cross-attention
    over all B x T*S tokens, then the MLP."""
    model = tiny()
    calls = []
    block = model.blocks[0]
    for name in ["attn", "attn_temp", "cross_attn", "mlp"]:
        getattr(block, name).register_forward_hook(
            lambda module, args, output, name=name: calls.append((name, tuple(args[0].shape)))
        )
    x, t, y, mask = inputs()
    with torch.no_grad():
        model(x, t, y, mask)
    B, T, S, D = 2, 4, 16, 64
    assert calls == [
        ("attn", (B * T, S, D)), ("attn_temp", (B * S, T, D)), ("cross_attn", (B, T * S, D)), ("mlp", (B, T * S, D))
    ]


def test_fresh_model_is_the_image_model_on_every_frame():
    """attn_temp.proj starts at zero, so before training each frame is denoised on its own,
    exactly as the PixArt image model would."""
    model = randomize_zero_init(tiny(), keep=lambda name: "attn_temp.proj" in name)
    x, t, y, mask = inputs()
    with torch.no_grad():
        video = model(x, t, y, mask)
        for f in range(LATENT[0]):
            torch.testing.assert_close(video[:, :, f : f + 1], model(x[:, :, f : f + 1], t, y, mask))
        randomize_zero_init(model)  # once trained, the temporal attention mixes frames
        assert not torch.allclose(model(x, t, y, mask)[:, :, :1], model(x[:, :, :1], t, y, mask))


def pixart_checkpoint(image_model: STDiT) -> dict:
    """A checkpoint in PixArt-alpha's layout: state_dict wrapper, Conv2d patch weight, pos_embed."""
    state = dict(image_model.state_dict())
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].squeeze(2)
    state["pos_embed"] = torch.zeros(1, 16, image_model.hidden_size)
    return {"state_dict": state}


def test_load_pixart_checkpoint(tmp_path):
    """Loading a PixArt image checkpoint misses exactly the temporal attention, and with it a
    fresh STDiT computes the image model (full attention on one frame, no temporal pos-emb)."""
    image_model = randomize_zero_init(tiny((1, 8, 8), attention="full"))
    image_model.pos_embed_temporal.zero_()  # PixArt has no temporal embedding
    checkpoint = pixart_checkpoint(image_model)
    torch.save(checkpoint, tmp_path / "PixArt-tiny.pth")

    video_model = tiny()
    left_at_init = load_pretrained(video_model, tmp_path / "PixArt-tiny.pth")
    assert left_at_init == sorted(k for k in video_model.state_dict() if ".attn_temp." in k)
    assert len(left_at_init) == 4 * len(video_model.blocks)
    assert torch.equal(video_model.y_embedder.y_embedding, image_model.y_embedder.y_embedding)

    assert load_pretrained(tiny(), checkpoint["state_dict"]) == left_at_init  # unwrapped dict too
    x, t, y, mask = inputs(frames=1)
    with torch.no_grad():
        torch.testing.assert_close(video_model(x, t, y, mask), image_model(x, t, y, mask))


def test_full_attention_shares_the_block_and_parameter_names():
    spatial_temporal, full = tiny(), tiny(attention="full")
    st_names = {name for name, _ in spatial_temporal.named_parameters()}
    full_names = {name for name, _ in full.named_parameters()}
    assert full_names == {name for name in st_names if ".attn_temp." not in name}
    assert type(full.blocks[0]) is type(spatial_temporal.blocks[0])
    # full attention mixes frames from the first step; the fresh STDiT does not
    randomize_zero_init(full)
    x, t, y, mask = inputs()
    x2 = x.clone()
    x2[:, :, 1:] += 1.0  # change every frame but the first
    with torch.no_grad():
        assert not torch.allclose(full(x, t, y, mask)[:, :, 0], full(x2, t, y, mask)[:, :, 0])


def test_padded_caption_tokens_are_ignored():
    model = randomize_zero_init(tiny())
    x, t, y, mask = inputs()
    y_padding_changed = torch.where(mask[..., None].bool(), y, torch.randn_like(y))
    y_real_changed = torch.where(mask[..., None].bool(), torch.randn_like(y), y)
    with torch.no_grad():
        out = model(x, t, y, mask)
        torch.testing.assert_close(model(x, t, y_padding_changed, mask), out)
        assert not torch.allclose(model(x, t, y_real_changed, mask), out)
    with pytest.raises(ValueError, match="unmasked"):
        model(x, t, y, torch.zeros_like(mask))


def test_caption_dropout_uses_the_null_caption():
    model = randomize_zero_init(tiny())
    x, t, y, mask = inputs()
    null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
    with torch.no_grad():
        dropped = model(x, t, y, mask, force_drop_ids=torch.tensor([1, 0]))
        torch.testing.assert_close(dropped[:1], model(x, t, null, mask)[:1])
        torch.testing.assert_close(dropped[1:], model(x, t, y, mask)[1:])
    model.train()  # p = 0.1 per caption: over 2000 captions some, not all, are dropped
    model.y_embedder.y_proj = torch.nn.Identity()
    captions = torch.randn(2000, CAPTION_LEN, CAPTION_DIM)
    dropped_rows = (model.y_embedder(captions) == model.y_embedder.y_embedding).all(dim=(1, 2))
    assert 100 < dropped_rows.sum() < 300


def test_grad_checkpointing_gives_the_same_gradients():
    x, t, y, mask = inputs()
    grads = []
    for grad_checkpointing in (False, True):
        model = randomize_zero_init(tiny(grad_checkpointing=grad_checkpointing)).train()
        model.y_embedder.uncond_prob = 0.0  # no random caption dropout
        model(x, t, y, mask).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def sequence_parallel_worker(rank: int, world: int, init_file: str, reference_file: str):
    """One rank: the model with its tokens split over the group must reproduce the
    single-process output, and its parameter gradients summed over ranks the full ones."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reference = torch.load(reference_file)
        x, t, y, mask = inputs()
        for attention in ("spatial_temporal", "full"):
            model = randomize_zero_init(tiny(attention=attention))
            model.enable_sequence_parallel(dist.group.WORLD)
            out = model(x, t, y, mask)
            out.square().mean().backward()
            torch.testing.assert_close(out, reference[attention]["out"])
            for name, param in model.named_parameters():
                dist.all_reduce(param.grad)
                torch.testing.assert_close(param.grad, reference[attention]["grads"][name], msg=name)
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_matches_single_process(tmp_path):
    x, t, y, mask = inputs()
    reference = {}
    for attention in ("spatial_temporal", "full"):
        model = randomize_zero_init(tiny(attention=attention))
        out = model(x, t, y, mask)
        out.square().mean().backward()
        reference[attention] = {
            "out": out.detach(), "grads": {name: p.grad for name, p in model.named_parameters()}
        }
    torch.save(reference, tmp_path / "reference.pt")
    torch.multiprocessing.spawn(
        sequence_parallel_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "reference.pt")), nprocs=2
    )
