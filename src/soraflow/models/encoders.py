"""The frozen encoders around the denoiser: an autoencoder and a text encoder.

Both load through `from_pretrained(id or path)`. The STDiT family's autoencoder works per frame
(as Open-Sora 1.0 uses SD-VAE), the Wan family's (`wan`) on whole clips; `pixel_pack` is an exactly invertible stand-in for CPU runs,
where a random-weight VAE could never give recognisable samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from soraflow.core.devices import device_and_dtype
from soraflow.core.hub import resolve_model_ref
from soraflow.core.progress import progress


class FrameAutoencoder:
    """An autoencoder of single frames: a clip's latents are its frames', stacked in time."""

    def encode_clips(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, T, 3, H, W] in [-1, 1] -> [n, C, T, h, w]."""
        n, frames = pixels.shape[:2]
        return self.encode(pixels.flatten(0, 1)).unflatten(0, (n, frames)).transpose(1, 2)

    def decode_clip(self, latents: torch.Tensor) -> torch.Tensor:
        """[C, T, h, w] -> [T, 3, H, W] in [-1, 1] on the CPU."""
        return self.decode(latents.transpose(0, 1)).float().cpu()


class KLAutoencoder(FrameAutoencoder):
    """diffusers AutoencoderKL (SD-VAE in the real recipe), latents = mean x scaling factor."""

    latent_bound = None  # unbounded latents: sampling does not clamp its x_0 predictions

    def __init__(self, params: dict):
        from diffusers import AutoencoderKL

        self.device, self.dtype = device_and_dtype()
        self.vae = AutoencoderKL.from_pretrained(resolve_model_ref(params["model"]), subfolder=params.get("subfolder"),
                                                 torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.scaling_factor = params["scaling_factor"] or self.vae.config.scaling_factor  # null: the VAE's own
        self.micro_batch = params["micro_batch"]
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [-1,1] -> [N,C,H/f,W/f], micro-batched to bound memory."""
        out = []
        for chunk in frames.split(self.micro_batch):
            dist = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            # the mean: a cached sample would freeze one draw of the posterior noise forever
            out.append((dist.mean * self.scaling_factor).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in latents.split(self.micro_batch):
            z = chunk.to(self.device, self.dtype) / self.scaling_factor
            out.append(self.vae.decode(z).sample.float().cpu())
        return torch.cat(out).clamp(-1, 1)


class PixelPackAutoencoder(FrameAutoencoder):
    """Space-to-depth packing: f x f pixel blocks become 3*f*f channels. Exactly invertible.

    Keep a token's width (3*f*f * the STDiT patch area) at most the STDiT hidden size: with
    f = 8 and 2x2 patches a token holds 768 numbers, STDiT-demo's 192-wide embedding cannot
    pass that noise through, and the eps loss cannot fall below 1 - 192/768 (flat at ~0.78)."""

    def __init__(self, params: dict):
        self.downsample = params["factor"]
        self.scaling_factor = params["scaling_factor"] or 1.0
        self.latent_channels = 3 * self.downsample**2
        # pixels in [-1, 1]: sampling clamps its x_0 predictions to this, as pixel-space
        # IDDPM does; without it a briefly trained model's samples blow up to saturated noise
        self.latent_bound = self.scaling_factor

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(frames.float(), self.downsample) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.scaling_factor, self.downsample).clamp(-1, 1)


class WanAutoencoder:
    """diffusers AutoencoderKLWan (Wan 2.1's 3D causal VAE: 16 channels, 4x in time, 8x in space),
    encoding whole clips of 4k+1 frames. Latents are the posterior mean normalised per channel,
    (mean - latents_mean) / latents_std, which is what WanPipeline's decode undoes."""

    latent_bound = None

    def __init__(self, params: dict):
        from diffusers import AutoencoderKLWan

        self.device, self.dtype = device_and_dtype()
        self.vae = AutoencoderKLWan.from_pretrained(resolve_model_ref(params["model"]), subfolder=params.get("subfolder"),
                                                    torch_dtype=self.dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        self.latent_channels, self.downsample = config.z_dim, config.scale_factor_spatial
        self.mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode_clips(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, T, 3, H, W] in [-1, 1] -> [n, 16, (T - 1) / 4 + 1, H / 8, W / 8] (one clip at a time:
        the causal VAE's memory grows with the frames)."""
        out = []
        for clip in pixels.transpose(1, 2).split(1):  # [1, 3, T, H, W]
            mean = self.vae.encode(clip.to(self.device, self.dtype)).latent_dist.mean.float().cpu()
            out.append((mean - self.mean) / self.std)
        return torch.cat(out)

    @torch.no_grad()
    def decode_clip(self, latents: torch.Tensor) -> torch.Tensor:
        """[16, t, h, w] -> [T, 3, H, W] in [-1, 1] on the CPU."""
        z = (latents[None].float() * self.std + self.mean).to(self.device, self.dtype)
        return self.vae.decode(z).sample[0].transpose(0, 1).float().cpu().clamp(-1, 1)


AUTOENCODERS = {"autoencoder_kl": KLAutoencoder, "pixel_pack": PixelPackAutoencoder, "wan": WanAutoencoder}


def load_autoencoder(params: dict):
    kind = params["kind"]
    if kind not in AUTOENCODERS:
        raise ValueError(f"vae.kind: unknown autoencoder {kind!r} (choose from {sorted(AUTOENCODERS)})")
    return AUTOENCODERS[kind](params)


class TextEncoder:
    """Token features and mask from a transformers encoder (T5 encoder, BERT, ...)."""

    def __init__(self, params: dict):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        path = resolve_model_ref(params["model"])
        self.device, self.dtype = device_and_dtype()
        self.max_length = params["max_length"]
        # in a diffusers pipeline (Wan's) the encoder is its text_encoder folder, the tokenizer its tokenizer folder
        subfolder = params.get("subfolder") or ""
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer" if subfolder else "")
        config = AutoConfig.from_pretrained(path, subfolder=subfolder)
        # AutoModel would build T5's decoder too, which text conditioning never runs
        encoders = {"t5": T5EncoderModel, "mt5": T5EncoderModel, "umt5": UMT5EncoderModel}  # Wan: UMT5-XXL
        model_class = encoders.get(config.model_type, AutoModel)
        self.model = model_class.from_pretrained(path, subfolder=subfolder, dtype=self.dtype).to(self.device).eval()
        self.hidden_size = config.hidden_size

    @torch.no_grad()
    def encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (features [n, max_length, C] float32, mask [n, max_length] int64), in one forward."""
        tokens = self.tokenizer(
            texts, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return out.last_hidden_state.float().cpu(), tokens.attention_mask.cpu().long()

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (features [N, max_length, C] float32, mask [N, max_length] int64)."""
        if not texts:
            return torch.zeros(0, self.max_length, self.hidden_size), torch.zeros(0, self.max_length, dtype=torch.long)
        starts = progress(range(0, len(texts), batch_size), desc="encode text")
        features, masks = zip(*(self.encode_batch(texts[start : start + batch_size]) for start in starts))
        return torch.cat(features), torch.cat(masks)
