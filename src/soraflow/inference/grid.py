"""A sample grid of weights during training (`soraflow sample-grid`, which the trainer's rank 0
runs every `validation.sample_every` steps: the training loop imports no text encoder or
autoencoder): a row per prompt, then a row per validation caption, its sample beside its clip;
a few evenly spaced frames of each video, one PNG."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from soraflow.core.atomic import atomic_path
from soraflow.core.devices import device_and_dtype
from soraflow.data import video
from soraflow.data.cache import LatentDataset
from soraflow.models import diffusion
from soraflow.models.checkpoint import load_for_sampling
from soraflow.models.encoders import TextEncoder, load_autoencoder


def grid_image(rows: list[list[torch.Tensor]], frames: int = 4) -> Image.Image:
    """One image: a row per entry, each entry's videos ([T, 3, H, W] in [-1, 1]) side by side,
    `frames` evenly spaced frames of each."""
    strips = []
    for videos in rows:
        shown = []
        for pixels in videos:
            count = min(frames, pixels.shape[0])
            picks = [round(k * (pixels.shape[0] - 1) / max(count - 1, 1)) for k in range(count)]
            shown += list(video.to_uint8(pixels[picks]))
        strips.append(torch.cat(shown, dim=1))
    width = max(s.shape[1] for s in strips)
    canvas = torch.full((sum(s.shape[0] for s in strips), width, 3), 255, dtype=torch.uint8)
    top = 0
    for strip in strips:
        canvas[top : top + strip.shape[0], : strip.shape[1]] = strip
        top += strip.shape[0]
    return Image.fromarray(canvas.numpy())


def sample_grid(weights, out_png, params: dict, steps: int, validation_index=None, captions: int = 0) -> None:
    """`weights`: a checkpoint file of one set of weights ("model"); params: the sample step's
    settings (sample.prompts and seed, text_encoder, vae, diffusion); `captions` of the
    validation index's clips sampled with their own caption features, each beside its clip."""
    device, _ = device_and_dtype()
    model, input_size = load_for_sampling(weights, use_ema=False)
    model.to(device)
    autoencoder = load_autoencoder(params["vae"])
    features, mask = TextEncoder(params["text_encoder"]).encode(params["sample"]["prompts"])
    entries = [(features[k : k + 1], mask[k : k + 1], None) for k in range(len(features))]
    held_out = LatentDataset(validation_index) if validation_index and captions else None
    for row in range(min(captions, len(held_out or ()))):
        latents, y, y_mask = held_out[row]
        entries.append((y[None], y_mask[None], latents))
    rows = []
    for k, (y, y_mask, clip) in enumerate(entries):
        latents = diffusion.sample(model, shape=(1, model.in_channels, *input_size), y=y.to(device), mask=y_mask.to(device),
                                   cfg_scale=params["diffusion"]["cfg_scale"], num_steps=steps,
                                   seed=params["sample"]["seed"] + k, num_timesteps=params["diffusion"]["num_timesteps"],
                                   clip_denoised=autoencoder.latent_bound)  # fmt: skip
        videos = [latents[0]] + ([] if clip is None else [clip])  # [C, T, h, w] each
        rows.append([autoencoder.decode(v.transpose(0, 1)).float().cpu() for v in videos])
    with atomic_path(Path(out_png)) as tmp:
        grid_image(rows).save(tmp, format="PNG")
