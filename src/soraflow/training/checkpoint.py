"""The checkpoint file format: safetensors holding named state dicts, JSON metadata beside them.

One file holds several state dicts as `<group>.<key>` tensors (a stage's final file: `model`
and `ema`; a resumable step: `model`, `ema` and `optim`, the optimizer state by parameter
name). Nothing is unpickled. Position embeddings are recomputed for each input size, so they
never travel in checkpoints. Reading needs torch and safetensors only: sampling loads weights
from here without the training engines.

Besides our own files, PixArt-α and Open-Sora 1.0 .pth files load as a stage's initial weights
and for sampling (models.stdit.load_pretrained), and a final checkpoint exports as a .pth that
Open-Sora 1.0's load_checkpoint takes (export_opensora).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from soraflow.core.atomic import atomic_path
from soraflow.models.stdit import PRESETS, STDiT, build_model, load_pretrained, opensora_state_dict

NOT_SAVED = ("pos_embed",)


def saved(name: str) -> bool:
    return not any(n in name for n in NOT_SAVED)


def save_checkpoint_file(path: Path, groups: dict[str, dict[str, torch.Tensor]], metadata: dict) -> None:
    """One safetensors file holding several named state dicts as `<group>.<key>` tensors."""
    tensors = {f"{group}.{k}": v.contiguous() for group, state in groups.items() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})


def load_checkpoint_file(path, group: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A named state dict and the metadata from a file written by save_checkpoint_file."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = {k: json.loads(v) for k, v in f.metadata().items()}
            prefix = group + "."
            state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except SafetensorError as err:
        raise ValueError(
            f"{path}: not a soraflow checkpoint ({err}); PixArt-α and Open-Sora weights load from .pth files"
        ) from err
    if not state:
        raise ValueError(f"{path}: no '{group}' weights in this checkpoint")
    return state, metadata


def is_torch_checkpoint(path) -> bool:
    """PixArt-α and Open-Sora ship torch.save files (.pth, .pt); soraflow writes safetensors."""
    return Path(path).suffix in (".pth", ".pt")


def initialise(model: STDiT, init_path: str | None) -> dict:
    """Start from a previous stage's checkpoint (its raw weights), or a PixArt-α or Open-Sora 1.0
    .pth (plain or wrapped; what does not fit is an error naming the file and the keys)."""
    if not init_path:
        return {}
    if is_torch_checkpoint(init_path):
        return {"left_at_init": load_pretrained(model, init_path)}
    state, _ = load_checkpoint_file(init_path, "model")
    initialise_from_state(model, state, init_path)
    return {}


def initialise_from_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load our own weights: everything but the recomputed position embeddings must fit."""
    check_fit(model.load_state_dict(state, strict=False), source)


def check_fit(result, source) -> None:
    """A strict=False load result may leave out only the recomputed position embeddings."""
    missing = [k for k in result.missing_keys if saved(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: does not fit this model (missing {missing}, unexpected {result.unexpected_keys})")


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state by parameter name, flattened for safetensors:
    {"state": {name: {k: t}}, "param_groups"} -> ({"<name>.<k>": t}, param_groups)."""
    tensors = {f"{name}.{k}": v for name, s in state["state"].items() for k, v in s.items()}
    return tensors, state["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, k = key.rsplit(".", 1)
        state.setdefault(name, {})[k] = value
    return {"state": state, "param_groups": param_groups}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_stored_model(path, group: str) -> tuple[STDiT, dict]:
    """The model of a final checkpoint with its `group` weights ("model" or "ema"), and the metadata."""
    weights, metadata = load_checkpoint_file(path, group)
    config = {**metadata["model_config"], "grad_checkpointing": False}
    model = build_model(config, input_size=tuple(metadata["input_size"]))
    initialise_from_state(model, weights, path)
    return model, metadata


def load_for_sampling(
    path, use_ema: bool, model_config: dict | None = None, input_size: tuple[int, int, int] | None = None
) -> tuple[STDiT, tuple[int, int, int]]:
    """The model stored in a checkpoint, ready for inference, and its latent (T, H, W).

    A soraflow checkpoint carries its settings. A PixArt-α or Open-Sora 1.0 .pth holds weights
    only, so `model_config` (build_model's cfg) and `input_size` must come with it; its wrapper,
    not `use_ema`, decides which weights it gives (Open-Sora's "ema" when it has one)."""
    if is_torch_checkpoint(path):
        if model_config is None or input_size is None:
            raise ValueError(f"{path}: a .pth holds weights only; give the STDiT settings and the video size")
        model = build_model({**model_config, "grad_checkpointing": False}, input_size=tuple(input_size))
        load_pretrained(model, path)
        return model.eval(), tuple(input_size)
    model, metadata = load_stored_model(path, "ema" if use_ema else "model")
    return model.eval(), tuple(metadata["input_size"])


# Open-Sora 1.0's autoencoder (sd-vae-ft-ema, 4 latent channels, 8x smaller) and text encoder
# (T5-XXL, 4096 wide, 120 tokens): its config builds STDiT from these, so they must match.
OPENSORA_VAE_CHANNELS, OPENSORA_VAE_FACTOR = 4, 8
OPENSORA_TEXT = (120, 4096)  # model_max_length, caption_channels
OPENSORA_XL2 = {**PRESETS["STDiT-XL/2"], "patch_size": (1, 2, 2), "mlp_ratio": 4.0}  # its registered STDiT-XL/2


def export_opensora(checkpoint, out_path, use_ema: bool = True) -> str:
    """Write a final checkpoint's EMA (or raw) weights as the .pth Open-Sora 1.0's load_checkpoint
    takes: a plain state dict in its STDiT layout (find_model's other accepted layout, {"ema": ...},
    would gain nothing). Returns the lines Open-Sora's inference config needs for these weights:
    its STDiT builds its size, position embeddings and input widths from them, and a mismatch
    either fails to load or silently changes what the weights compute (space_scale)."""
    model, metadata = load_stored_model(checkpoint, "ema" if use_ema else "model")
    if model.attention != "spatial_temporal":
        raise ValueError(f"{checkpoint}: attention {model.attention!r} has no Open-Sora 1.0 counterpart "
                         "(its STDiT is spatial_temporal)")
    with atomic_path(out_path) as tmp:
        torch.save(opensora_state_dict(model), tmp)

    frames, height, width = metadata["input_size"]
    block = model.blocks[0]
    size = {"depth": len(model.blocks), "hidden_size": model.hidden_size, "num_heads": block.attn.num_heads,
            "patch_size": model.patch_size, "mlp_ratio": block.mlp.fc1.out_features / model.hidden_size}
    scales = f"space_scale={model.space_scale}, time_scale={model.time_scale}"
    lines = [
        f"# Open-Sora 1.0 config for {out_path}: start from configs/opensora/inference/16x256x256.py and set",
        f"num_frames = {frames}",
        f"image_size = ({height * OPENSORA_VAE_FACTOR}, {width * OPENSORA_VAE_FACTOR})  # latent {height}x{width}, VAE factor 8",
    ]
    if size == OPENSORA_XL2:
        lines += [
            f'model = dict(type="STDiT-XL/2", {scales}, from_pretrained="{out_path}")',
            f"# run: python scripts/inference.py CONFIG.py (or --ckpt-path {out_path})",
        ]
    else:  # Open-Sora registers a from_pretrained builder for STDiT-XL/2 only
        lines += [
            f'model = dict(type="STDiT", depth={size["depth"]}, hidden_size={size["hidden_size"]}, '
            f'num_heads={size["num_heads"]}, patch_size={size["patch_size"]}, mlp_ratio={size["mlp_ratio"]}, {scales})',
            f'# Open-Sora builds from_pretrained for STDiT-XL/2 only: load with load_checkpoint(model, "{out_path}")'
            " from opensora.utils.ckpt_utils",
        ]
    text_tokens, text_width = model.y_embedder.y_embedding.shape
    if model.in_channels != OPENSORA_VAE_CHANNELS:
        lines.append(f"# this model takes {model.in_channels} latent channels; Open-Sora's VAE gives "
                     f"{OPENSORA_VAE_CHANNELS}: its vae must be the one the model was trained with")
    if (text_tokens, text_width) != OPENSORA_TEXT:
        lines.append(f"# this model takes {text_tokens} text tokens of width {text_width}; Open-Sora's T5 gives "
                     f"{OPENSORA_TEXT[0]} x {OPENSORA_TEXT[1]}: its text_encoder must be the one the model was trained with")
    return "\n".join(lines)
