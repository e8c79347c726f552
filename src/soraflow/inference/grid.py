"""A sample grid of weights during training (`soraflow sample-grid`, which the trainer's rank 0
runs every `validation.sample_every` steps: the training loop imports no text encoder or
autoencoder): a row per prompt, then a row per validation caption, its sample beside its clip;
a few evenly spaced frames of each video, one PNG. Sampled as the stage's samples are
(soraflow.inference.sample.Sampler: an STDiT, or a Wan transformer in diffusers' WanPipeline)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from soraflow.core.atomic import atomic_path
from soraflow.data import video
from soraflow.data.cache import LatentDataset
from soraflow.inference.sample import Sampler


def grid_image(rows: list[list[torch.Tensor]], frames: int = 4) -> Image.Image:
    """One image: a row per entry, each entry's videos ([T, 3, H, W] in [-1, 1]) side by side,
    `frames` evenly spaced frames of each (top-aligned on white: a validation clip of another
    bucket than the one the model samples at has another size)."""
    strips = []
    for videos in rows:
        shown = []
        for pixels in videos:
            count = min(frames, pixels.shape[0])
            picks = [round(k * (pixels.shape[0] - 1) / max(count - 1, 1)) for k in range(count)]
            shown += list(video.to_uint8(pixels[picks]))
        height = max(frame.shape[0] for frame in shown)
        strips.append(torch.cat([F.pad(frame, (0, 0, 0, 0, 0, height - frame.shape[0]), value=255) for frame in shown],
                                dim=1))
    width = max(s.shape[1] for s in strips)
    canvas = torch.full((sum(s.shape[0] for s in strips), width, 3), 255, dtype=torch.uint8)
    top = 0
    for strip in strips:
        canvas[top : top + strip.shape[0], : strip.shape[1]] = strip
        top += strip.shape[0]
    return Image.fromarray(canvas.numpy())


def sample_grid(weights, out_png, params: dict, steps: int, validation_index=None, captions: int = 0) -> None:
    """`weights`: a checkpoint file of one set of weights (its "model" group, with the metadata of
    a stage checkpoint); params: the sample step's settings (sample.prompts and seed, text_encoder,
    vae, diffusion), sampled in `steps` steps; `captions` of the validation index's clips sampled
    with their own caption features, each beside its clip."""
    sampler = Sampler(weights, {**params, "sample": {**params["sample"], "use_ema": False},
                                "diffusion": {**params["diffusion"], "sample_steps": steps}})
    features, mask = sampler.text_encoder.encode(params["sample"]["prompts"])
    entries = [(features[k : k + 1], mask[k : k + 1], None) for k in range(len(features))]
    held_out = LatentDataset(validation_index) if validation_index and captions else None
    for row in range(min(captions, len(held_out or ()))):
        latents, y, y_mask = held_out[row]
        entries.append((y[None], y_mask[None], latents))
    rows = []
    for k, (y, y_mask, clip) in enumerate(entries):
        sample = sampler.generate(y, y_mask, params["sample"]["seed"] + k)
        rows.append([sample] + ([] if clip is None else [sampler.decode(clip)]))
    with atomic_path(Path(out_png)) as tmp:
        grid_image(rows).save(tmp, format="PNG")
