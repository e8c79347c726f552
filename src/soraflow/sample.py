"""Prompts -> videos: text features, respaced IDDPM sampling with guidance, per-frame decoding."""

from __future__ import annotations

from pathlib import Path

import torch

from soraflow import video
from soraflow import diffusion
from soraflow.encoders import TextEncoder, load_autoencoder
from soraflow.train import load_for_sampling


def sample_prompts(checkpoint, prompts: list[str], out_paths: list, params: dict) -> None:
    """One mp4 per prompt. params: text_encoder, vae, diffusion, sample (seed, fps, use_ema)."""
    if len(prompts) != len(out_paths):
        raise ValueError(f"{len(prompts)} prompts but {len(out_paths)} output paths")
    options = params["sample"]
    model, (frames, height, width) = load_for_sampling(checkpoint, use_ema=options.get("use_ema", True))
    y, mask = TextEncoder(params["text_encoder"]).encode(prompts)
    autoencoder = load_autoencoder(params["vae"])
    steps = params["diffusion"]
    for k, (prompt, out_path) in enumerate(zip(prompts, out_paths)):
        latents = diffusion.sample(
            model,
            shape=(1, model.in_channels, frames, height, width),
            y=y[k : k + 1],
            mask=mask[k : k + 1],
            cfg_scale=steps["cfg_scale"],
            num_steps=steps["sample_steps"],
            seed=options["seed"] + k,
            num_timesteps=steps["num_timesteps"],
            progress=True,
            clip_denoised=autoencoder.latent_bound or False,  # pixel_pack: pixels stay in range
        )  # [1, C, T, h, w]
        pixels = autoencoder.decode(latents[0].transpose(0, 1))  # [T, 3, H, W]
        video.write_video(Path(out_path), video.to_uint8(pixels), fps=options["fps"])
        print(f"{out_path}: {prompt!r}", flush=True)
