"""The Wan family's sizes and rules, without torch: what the workflow checks when it parses a
config and what the plan counts in closed form (soraflow.workflow.plan), so neither imports torch.

Wan 2.1 (Wan-AI/Wan2.1-T2V-*-Diffusers): a 3D causal VAE with 16 latent channels, 4x smaller in
time (the first frame alone, then 4 frames per latent frame: a clip has 4k+1 frames) and 8x in
space; a UMT5-XXL text encoder (4096 wide, 512 tokens); WanTransformer3DModel with 1x2x2 patches,
so a frame's sides are multiples of 16 pixels.
"""

from __future__ import annotations

from soraflow.data import buckets

VAE_TIME, VAE_SPACE, LATENT_CHANNELS = 4, 8, 16
PATCH = (1, 2, 2)
SIDE_MULTIPLE = VAE_SPACE * PATCH[1]  # 16 pixels
TEXT_WIDTH, TEXT_TOKENS = 4096, 512

# WanTransformer3DModel's config.json of the released checkpoints (the keys that size it)
TRANSFORMERS: dict[str, dict] = {
    "Wan2.1-T2V-1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                            text_dim=TEXT_WIDTH, freq_dim=256, in_channels=16, out_channels=16),
    "Wan2.1-T2V-14B": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                           text_dim=TEXT_WIDTH, freq_dim=256, in_channels=16, out_channels=16),
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections (self and cross)
HUB_IDS = {f"Wan-AI/{name}-Diffusers": name for name in TRANSFORMERS}


def check_stage(name: str, stage: dict) -> None:
    """A stage the Wan family can train: frames 4k+1, sides multiples of 16 (of each bucket, when
    the stage lists buckets); the error names the key."""
    for position, (frames, height, width) in enumerate(buckets.stage_buckets(stage)):
        key = buckets.bucket_key(name, stage, position)
        if stage.get("buckets"):  # the error names the bucket: [frames, height, width]
            frames_at = sides_at = f"{key}: {[frames, height, width]}"
        else:
            frames_at, sides_at = f"{key}.num_frames: {frames}", f"{key}.resolution: {height}"
        if (frames - 1) % VAE_TIME:
            raise ValueError(f"{frames_at}; the Wan family needs 4k+1 frames (its VAE keeps the first frame and "
                             f"packs each 4 after it), e.g. {(frames - 1) // VAE_TIME * VAE_TIME + 1} "
                             f"or {((frames - 1) // VAE_TIME + 1) * VAE_TIME + 1}")
        if height % SIDE_MULTIPLE or width % SIDE_MULTIPLE:
            raise ValueError(f"{sides_at}; the Wan family needs each side a multiple of {SIDE_MULTIPLE} pixels "
                             f"(VAE 8x, patch 2x2)")


def latent_size(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    return (num_frames - 1) // VAE_TIME + 1, height // VAE_SPACE, width // VAE_SPACE


def tokens(num_frames: int, height: int, width: int) -> int:
    t, h, w = latent_size(num_frames, height, width)
    return t // PATCH[0] * (h // PATCH[1]) * (w // PATCH[2])


def parameter_count(cfg: dict) -> int:
    """WanTransformer3DModel's parameters from its config (every weight and bias, as in diffusers'
    transformer_wan.py): patch embedding, time and text embedders, per block self- and
    cross-attention (q, k, v, o with RMS norms over q and k), the cross-attention norm, the FFN and
    the modulation table, then the output head. Equals the released checkpoints' counts."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    patch = PATCH[0] * PATCH[1] * PATCH[2]
    c_in, c_out, text = cfg["in_channels"], cfg["out_channels"], cfg["text_dim"]
    embed = c_in * patch * d + d  # Conv3d
    time = (cfg["freq_dim"] * d + d) + (d * d + d) + (d * 6 * d + 6 * d)  # linear_1, linear_2, time_proj
    text_embed = (text * d + d) + (d * d + d)
    head = d * c_out * patch + c_out * patch + 2 * d
    return embed + time + text_embed + cfg["num_layers"] * block_parameter_count(cfg) + head


def block_parameter_count(cfg: dict) -> int:
    """One WanTransformerBlock: self- and cross-attention (q, k, v, o, RMS norms over q and k), the
    cross-attention's affine norm, the FFN and the modulation table."""
    d, f = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    attention = 4 * (d * d + d) + 2 * d
    return 2 * attention + 2 * d + (d * f + f) + (f * d + d) + 6 * d


def lora_parameter_count(cfg: dict, rank: int, targets=LORA_TARGETS) -> int:
    """A LoRA's parameters: rank x (in + out) per targeted d x d projection, in each block's two attentions."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return cfg["num_layers"] * 2 * len(targets) * rank * (d + d)
