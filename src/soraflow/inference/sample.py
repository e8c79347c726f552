"""Prompts -> videos: text features, respaced IDDPM sampling with guidance, per-frame decoding.

Besides free prompts, a stage can be sampled with captions of its own training clips; each
such sample is then set beside the clip it was trained on (a figure and a table of pixel
distances), which shows at a glance whether the stage learned its data.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd
import torch

from soraflow.core.atomic import atomic_path
from soraflow.core.devices import device_and_dtype
from soraflow.data import video
from soraflow.data.cache import LatentDataset
from soraflow.inference.comparison import plot_comparison
from soraflow.models import diffusion, wan, wan_config
from soraflow.models.checkpoint import checkpoint_metadata, is_torch_checkpoint, load_for_sampling
from soraflow.models.encoders import TextEncoder, load_autoencoder


class Sampler:
    """A stage checkpoint (or a PixArt-α / Open-Sora 1.0 .pth) with the autoencoder that decodes its
    latents, on the job's device (in fp32, as it was trained and checkpointed). A Wan family stage
    samples through diffusers' WanPipeline around its trained transformer (soraflow.models.wan)."""

    def __init__(self, checkpoint, params: dict):
        self.params = params
        self.device, _ = device_and_dtype()
        self.autoencoder = load_autoencoder(params["vae"])
        self.wan = None
        if not is_torch_checkpoint(checkpoint) and checkpoint_metadata(checkpoint).get("family") == "wan":
            model, metadata = wan.load_trained(checkpoint, params["sample"]["use_ema"])
            self.frames, self.height, self.width = metadata["input_size"]
            self.wan = wan.pipeline(model.to(self.device), self.text_encoder, self.autoencoder,
                                    metadata["model_config"]["flow_shift"])
            # guidance against the empty prompt, as WanPipeline encodes it (its default negative prompt)
            self.negative = wan.pipeline_text(*self.text_encoder.encode_batch([""]))
            return
        pth_settings = self.pth_settings(checkpoint, params) if is_torch_checkpoint(checkpoint) else {}
        model, (self.frames, self.height, self.width) = load_for_sampling(
            checkpoint, use_ema=params["sample"]["use_ema"], **pth_settings
        )
        self.model = model.to(self.device)

    @cached_property
    def text_encoder(self) -> TextEncoder:
        """The prompts' encoder (loaded once: a Wan pipeline holds it too; cached captions need none)."""
        return TextEncoder(self.params["text_encoder"])

    def pth_settings(self, checkpoint, params: dict) -> dict:
        """A .pth holds weights only: the STDiT settings come from params["stdit"], the video size
        from params["size"] (num_frames, resolution in pixels), the latent channels from the autoencoder."""
        if "stdit" not in params or "size" not in params:
            raise ValueError(f"{checkpoint}: a .pth holds weights only; params need 'stdit' and 'size'")
        frames, resolution = params["size"]["num_frames"], params["size"]["resolution"]
        factor = self.autoencoder.downsample
        if resolution % factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's factor {factor}")
        return {
            "model_config": {**params["stdit"], "in_channels": self.autoencoder.latent_channels},
            "input_size": (frames, resolution // factor, resolution // factor),
        }

    def generate(self, y: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
        """One caption's features [1, L, C] and mask [1, L] -> pixels [T, 3, H, W] in [-1, 1] on the CPU."""
        steps = self.params["diffusion"]
        if self.wan is not None:
            factor = self.autoencoder.downsample
            video = self.wan(prompt_embeds=wan.pipeline_text(y, mask).to(self.device),
                             negative_prompt_embeds=self.negative.to(self.device),
                             num_frames=(self.frames - 1) * wan_config.VAE_TIME + 1, height=self.height * factor,
                             width=self.width * factor, num_inference_steps=steps["sample_steps"],
                             guidance_scale=steps["cfg_scale"], generator=torch.Generator(self.device).manual_seed(seed),
                             output_type="pt").frames[0]  # [T, 3, H, W] in [0, 1]
            return (video.float().cpu() * 2 - 1).clamp(-1, 1)
        latents = diffusion.sample(
            self.model,
            shape=(1, self.model.in_channels, self.frames, self.height, self.width),
            y=y.to(self.device),
            mask=mask.to(self.device),
            cfg_scale=steps["cfg_scale"],
            num_steps=steps["sample_steps"],
            seed=seed,
            num_timesteps=steps["num_timesteps"],
            progress=True,
            clip_denoised=self.autoencoder.latent_bound,  # pixel_pack: pixels stay in range
        )  # [1, C, T, h, w]
        return self.decode(latents[0])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[C, T, h, w] -> [T, 3, H, W] on the CPU"""
        return self.autoencoder.decode_clip(latents)

    def write(self, pixels: torch.Tensor, out_path, label: str) -> None:
        video.write_video(Path(out_path), video.to_uint8(pixels), fps=self.params["sample"]["fps"])
        print(f"{out_path}: {label!r}", flush=True)


def sample_prompts(checkpoint, prompts: list[str], out_paths: list, params: dict) -> None:
    """One mp4 per prompt. params: text_encoder, vae, diffusion, sample (seed, fps, use_ema)."""
    if len(prompts) != len(out_paths):
        raise ValueError(f"{len(prompts)} prompts but {len(out_paths)} output paths")
    sampler = Sampler(checkpoint, params)
    y, mask = sampler.text_encoder.encode(prompts)
    for k, (prompt, out_path) in enumerate(zip(prompts, out_paths)):
        sampler.write(sampler.generate(y[k : k + 1], mask[k : k + 1], params["sample"]["seed"] + k), out_path, prompt)


def pick_training_clips(index: pd.DataFrame, count: int, index_path) -> list[int]:
    """Positions of `count` clips evenly spaced through a stage index, preferring clips whose
    caption no other clip has (so each sample has one clip it should resemble), then one clip
    per caption, then any."""
    if count > len(index):
        raise ValueError(f"sample.training_captions: {count} asked for, but {index_path} holds {len(index)} clips")
    unique = [i for i, shared in enumerate(index["text"].duplicated(keep=False)) if not shared]
    distinct = [i for i, repeated in enumerate(index["text"].duplicated()) if not repeated]
    pool = next(p for p in (unique, distinct, list(range(len(index)))) if len(p) >= count)
    return [pool[round(k * (len(pool) - 1) / max(count - 1, 1))] for k in range(count)]


def sample_training_captions(checkpoint, index_path, out_paths: list, comparison_png, comparison_csv,
                             params: dict) -> None:
    """One mp4 per picked training clip, sampled from that clip's cached caption features, and
    a figure and table setting each sample beside its clip (both decoded the same way).
    mse_own is the sample's pixel MSE to its own clip; nearest_clip is the picked clip it is
    closest to (its own when the stage has learned to tell its captions apart)."""
    sampler = Sampler(checkpoint, params)
    data = LatentDataset(index_path)
    # clips of the size the model samples at: its stage's first bucket with clips (soraflow.data.buckets)
    same_size = data.bucket_rows()[0]
    picked = [same_size[i] for i in pick_training_clips(data.index.iloc[same_size], len(out_paths), index_path)]
    rows = data.index.iloc[picked]
    clips, samples = [], []
    for k, (position, caption, out_path) in enumerate(zip(picked, rows["text"], out_paths)):
        latents, y, mask = data[position]
        if tuple(latents.shape[1:]) != (sampler.frames, sampler.height, sampler.width):
            raise ValueError(f"{index_path}: latents {tuple(latents.shape)} do not match {checkpoint}'s input size")
        clips.append(sampler.decode(latents))
        samples.append(sampler.generate(y[None], mask[None], params["sample"]["seed"] + k))
        sampler.write(samples[-1], out_path, caption)
    # [sample, clip] pixel MSE
    distance = ((torch.stack(samples)[:, None] - torch.stack(clips)[None]) ** 2).mean(dim=(2, 3, 4, 5))
    ids = rows["id"].tolist()
    comparison = pd.DataFrame(
        {
            "sample": [str(p) for p in out_paths],
            "clip_id": ids,
            "caption": rows["text"].tolist(),
            "mse_own": distance.diagonal().tolist(),
            "nearest_clip": [ids[j] for j in distance.argmin(dim=1).tolist()],
            "mse_nearest": distance.min(dim=1).values.tolist(),
        }
    )
    with atomic_path(comparison_csv) as tmp:
        comparison.to_csv(tmp, index=False)
    plot_comparison(clips, samples, comparison, comparison_png)
