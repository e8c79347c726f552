"""The Wan family (`model.family: wan`): Wan 2.1's WanTransformer3DModel trained with flow matching,
in full or as a LoRA, and sampled through diffusers' WanPipeline with the trained weights.

The denoiser wraps the diffusers model unchanged (its state dict is the transformer's under
`transformer.`), so a trained model is the diffusers model, and a LoRA exports in the diffusers
format that `WanPipeline.load_lora_weights` reads (`export_lora`). The text features come from
the cache as the pipeline makes them (UMT5's last hidden state, zero past the caption's tokens),
the latents as the pipeline decodes them ((mean - latents_mean) / latents_std: see
soraflow.models.encoders.WanAutoencoder).

Flow matching as Wan trains it (Wan paper, arXiv:2503.20314, sec. 3.2; diffusers'
FlowMatchEulerDiscreteScheduler): for data x_0, noise e and sigma in [0, 1], x_sigma = (1 - sigma)
x_0 + sigma e; the model predicts the velocity e - x_0 (MSE), called with timestep 1000 sigma.
sigma is a uniform draw u moved towards the noisy end by the shift s: sigma = s u / (1 + (s - 1) u),
the same shift the sampler's scheduler applies to its sigmas (Wan 2.1: s = 3 at 480p, 5 at 720p).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from soraflow.core.hub import resolve_model_ref
from soraflow.models.checkpoint import load_checkpoint_file

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' FlowMatchEulerDiscreteScheduler: timestep = 1000 sigma
TRANSFORMER = "transformer"  # the transformer's folder in a diffusers pipeline


def shifted_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


class WanDenoiser(nn.Module):
    """A WanTransformer3DModel called as our trainer calls a model: (x, t, y, mask) -> velocity."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    @property
    def blocks(self) -> nn.ModuleList:  # the fsdp engine's shard units
        return self.transformer.blocks

    def enable_sequence_parallel(self, group) -> None:
        raise ValueError("train.sp_size: the Wan family has no sequence parallelism (its attention is diffusers'); "
                         "set it to 1")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 16, T, h, w] latents at timestep t [B] (1000 sigma), y [B, L, C] text features with
        mask [B, L] (force_drop_ids: no caption dropout in this family)."""
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pipeline_text(y, mask),
                                return_dict=False)[0]


class FlowMatching:
    """Wan's objective (see the module): per-sample uniform u, shifted sigma, velocity MSE."""

    uncond_prob = 0.0  # no caption dropout: WanPipeline's guidance uses the encoded negative prompt

    def __init__(self, shift: float):
        self.shift = shift

    def draw_timestep(self, generator: torch.Generator) -> torch.Tensor:
        return torch.rand((), generator=generator)  # u, shifted in training_losses

    def training_losses(self, model_fn, x_start, t, model_kwargs=None, noise=None) -> dict:
        sigma = shifted_sigma(t.float(), self.shift).reshape(-1, *([1] * (x_start.dim() - 1)))
        x_t = (1 - sigma) * x_start + sigma * noise
        prediction = model_fn(x_t, sigma.flatten() * NUM_TRAIN_TIMESTEPS, **(model_kwargs or {}))
        loss = ((prediction.float() - (noise - x_start).float()) ** 2).mean(dim=tuple(range(1, x_start.dim())))
        return {"loss": loss}


def lora_config(lora: dict):
    """peft's LoraConfig for a stage's `wan.lora` settings (rank, alpha, target modules)."""
    from peft import LoraConfig

    return LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["target_modules"]),
                      init_lora_weights=True)


def build_transformer(model_config: dict):
    """The transformer of `model_config`: its config (`transformer`, as diffusers stores it) with
    random weights; a stage's initial weights load over it (`initialise`), and a LoRA is added."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in model_config["transformer"].items() if not k.startswith("_")}
    transformer = WanTransformer3DModel.from_config(config)
    if model_config["grad_checkpointing"]:
        transformer.enable_gradient_checkpointing()
    return transformer


def pretrained_transformer(ref: str):
    """The base weights a stage fine-tunes: the transformer of a diffusers pipeline (hub id or folder)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(resolve_model_ref(ref), subfolder=TRANSFORMER,
                                                 torch_dtype=torch.float32)


def fused_base_state(model_config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage's final weights (its LoRA, if any, fused into the base) as a plain transformer state."""
    model = build(model_config)
    model.load_state_dict(state)
    if model_config["lora"]:
        model.transformer.fuse_lora()
        model.transformer.unload_lora()
    return model.transformer.state_dict()


def build(model_config: dict, base: dict[str, torch.Tensor] | None = None) -> WanDenoiser:
    """The denoiser of `model_config` with the transformer weights `base` (none: random), then its
    LoRA, if any, at peft's init (B = 0, so the model starts as the base)."""
    transformer = build_transformer(model_config)
    if base is not None:
        transformer.load_state_dict(base)
    if model_config["lora"]:
        # add_adapter, not peft.get_peft_model: the latter prefixes the keys and diffusers refuses them
        transformer.add_adapter(lora_config(model_config["lora"]))
    return WanDenoiser(transformer)


def load_trained(path, use_ema: bool) -> tuple[WanDenoiser, dict]:
    """A Wan stage's final checkpoint as a model for inference: its raw weights, with the EMA (which
    follows only what trained: a LoRA's own weights) over them for `use_ema`; and its metadata."""
    from soraflow.models.checkpoint import load_checkpoint_file

    state, metadata = load_checkpoint_file(path, "model")
    if use_ema:
        state.update(load_checkpoint_file(path, "ema")[0])
    model = build({**metadata["model_config"], "grad_checkpointing": False})
    model.load_state_dict(state)
    return model.eval(), metadata


def lora_state(model: WanDenoiser) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model.transformer)


def export_lora(model: WanDenoiser, lora: dict, out_dir) -> Path:
    """The model's LoRA as diffusers writes it (pytorch_lora_weights.safetensors) with its adapter
    metadata: without it a LoRA whose alpha is not its rank loads at the wrong scale, silently."""
    from diffusers import WanPipeline

    metadata = lora_config(lora).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: JSON cannot hold it
    WanPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=lora_state(model),
                                  transformer_lora_adapter_metadata=metadata, safe_serialization=True)
    return Path(out_dir)


def export_stage_lora(checkpoint, out_dir, use_ema: bool = True) -> str:
    """A Wan stage's LoRA (EMA or raw) as diffusers' LoRA file; returns how to load it."""
    model, metadata = load_trained(checkpoint, use_ema)
    lora = metadata["model_config"]["lora"]
    if not lora:
        raise ValueError(f"{checkpoint}: this stage trained in full, not a LoRA (its weights are the whole transformer)")
    export_lora(model, lora, out_dir)
    return (f"# {out_dir}: rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])}\n"
            f"pipe = WanPipeline.from_pretrained({metadata['model_config']['base']!r}); "
            f"pipe.load_lora_weights({str(out_dir)!r})")


def pipeline(model: WanDenoiser, text_encoder, autoencoder, shift: float):
    """diffusers' WanPipeline around the trained transformer and the run's own text encoder and VAE,
    with the flow-matching Euler scheduler at the shift training used."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    return WanPipeline(tokenizer=text_encoder.tokenizer, text_encoder=text_encoder.model, vae=autoencoder.vae,
                       scheduler=scheduler, transformer=model.transformer)


def pipeline_text(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cached features as WanPipeline's prompt_embeds: zero past each caption's tokens."""
    return y * mask[..., None].to(y.dtype)


class WanFamily:
    name = "wan"

    def model_config(self, params: dict, stage: dict, channels: int, caption_channels: int,
                     grad_checkpointing: bool) -> dict:
        from diffusers import WanTransformer3DModel

        wan = params["wan"]
        transformer = dict(WanTransformer3DModel.load_config(resolve_model_ref(wan["model"]), subfolder=TRANSFORMER))
        if (transformer["in_channels"], transformer["text_dim"]) != (channels, caption_channels):
            raise ValueError(f"wan.model {wan['model']}: its transformer takes {transformer['in_channels']} latent "
                             f"channels and text {transformer['text_dim']} wide, but the caches hold {channels} and "
                             f"{caption_channels} (vae, text_encoder)")
        finetune = stage.get("finetune") or wan["finetune"]
        return {"family": self.name, "base": wan["model"], "transformer": transformer, "flow_shift": wan["flow_shift"],
                "lora": dict(wan["lora"]) if finetune == "lora" else None, "grad_checkpointing": grad_checkpointing}

    def build(self, model_config: dict, input_size, init_path: str | None, initial: bool):
        """The base weights are wan.model's transformer, or a previous stage's (its LoRA fused in);
        the stage's LoRA, if any, goes on top of them. A resumed LoRA run reads its base too: its
        checkpoints hold only what trains (the run's identity holds the base's digest)."""
        base, report = None, {}
        if initial or model_config["lora"]:
            if init_path:
                state, metadata = load_checkpoint_file(init_path, "model")
                base, report = fused_base_state(metadata["model_config"], state), {"base": str(init_path)}
            else:
                base = pretrained_transformer(model_config["base"]).state_dict()
                report = {"base": model_config["base"]}
        return build(model_config, base), report

    def frozen_files(self, model_config: dict, init_path: str | None) -> list[str]:
        """A LoRA's base, where it comes from wan.model (a previous stage's is the initial weights,
        in the identity already): the transformer's files, a hub id's as its snapshot holds them."""
        if not model_config["lora"] or init_path:
            return []
        ref = resolve_model_ref(model_config["base"])
        if not Path(ref).is_dir():
            from huggingface_hub import snapshot_download

            ref = snapshot_download(ref, allow_patterns=[f"{TRANSFORMER}/*"])
        return sorted(str(path) for path in (Path(ref) / TRANSFORMER).iterdir() if path.is_file())

    def objective(self, params: dict, model_config: dict):
        return FlowMatching(model_config["flow_shift"])

    def uncond_prob(self, model, objective) -> float:
        return objective.uncond_prob
