"""The STDiT's presets and how a config becomes its constructor's arguments, without torch.

soraflow.models.stdit builds the model from these; the workflow's planning
(soraflow.workflow.plan) sizes jobs from them in closed form, so parsing the workflow
imports no torch.
"""

from __future__ import annotations

from soraflow.data import buckets

PRESETS: dict[str, dict] = {
    # Open-Sora 1.0's model: 724M parameters (PixArt-XL/2 plus temporal attention).
    "STDiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16),
    "STDiT-L/2": dict(depth=24, hidden_size=1024, num_heads=16),
    "STDiT-B/2": dict(depth=12, hidden_size=768, num_heads=12),
    "STDiT-S/2": dict(depth=12, hidden_size=384, num_heads=6),
    # Small models for the local workflow, conditioned on MiniLM (384-d) token embeddings.
    "STDiT-demo": dict(depth=6, hidden_size=192, num_heads=6, caption_channels=384, model_max_length=32),
    "STDiT-tiny": dict(depth=2, hidden_size=64, num_heads=4, caption_channels=384, model_max_length=32),
}
# Shared by every preset unless it says otherwise.
PRESET_DEFAULTS = dict(
    patch_size=(1, 2, 2), in_channels=4, caption_channels=4096, model_max_length=120, mlp_ratio=4.0,
    attention="spatial_temporal",
)
# Keys build_model accepts besides `preset`.
CONFIG_KEYS = {
    "depth", "hidden_size", "num_heads", "patch_size", "in_channels", "caption_channels",
    "model_max_length", "mlp_ratio", "space_scale", "time_scale", "attention",
    "grad_checkpointing", "class_dropout_prob",
}


def stdit_kwargs(cfg: dict, caption_channels: int | None = None) -> dict:
    """cfg = {preset, optional overrides (see CONFIG_KEYS)} -> the STDiT's keyword arguments
    (all of PRESET_DEFAULTS' keys among them). `caption_channels` is the text encoder's width;
    it overrides the preset's."""
    cfg = {k: v for k, v in cfg.items() if v is not None}  # unset keys take the preset's values
    preset_name = cfg.pop("preset")
    if preset_name not in PRESETS:
        raise ValueError(f"unknown STDiT preset {preset_name!r}; choose from {sorted(PRESETS)}")
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown STDiT config keys {sorted(unknown)}")
    if caption_channels is not None:
        if cfg.get("caption_channels", caption_channels) != caption_channels:
            raise ValueError(
                f"config caption_channels {cfg['caption_channels']} != text encoder width {caption_channels}"
            )
        cfg["caption_channels"] = caption_channels
    kwargs = {**PRESET_DEFAULTS, **PRESETS[preset_name], **cfg}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return kwargs


def patch_grid(size: tuple[int, int, int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (T, H, W) -> token grid (t, h, w)."""
    for n, p in zip(size, patch_size):
        if n % p:
            raise ValueError(f"latent size {tuple(size)} is not divisible by patch {tuple(patch_size)}")
    return tuple(n // p for n, p in zip(size, patch_size))


def check_buckets(name: str, stage: dict, stdit: dict, vae_factor: int) -> None:
    """A stage's listed buckets the STDiT can train: frames a whole number of the patch's, sides of the
    autoencoder's factor times the patch's (each latent side a whole number of patches); the error
    names the bucket."""
    patch = stdit_kwargs(stdit)["patch_size"]
    sides = (vae_factor * patch[1], vae_factor * patch[2])
    for position, (frames, height, width) in enumerate(buckets.stage_buckets(stage)):
        if frames % patch[0] or height % sides[0] or width % sides[1]:
            raise ValueError(f"stages.{name}.buckets[{position}]: {[frames, height, width]}; the STDiT needs frames a "
                             f"multiple of {patch[0]} and sides multiples of {sides[0]} x {sides[1]} pixels "
                             f"(autoencoder {vae_factor}x, patch {list(patch)})")
