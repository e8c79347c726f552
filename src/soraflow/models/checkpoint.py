"""Model weights in and out: the checkpoint file format, and PixArt-α / Open-Sora 1.0 weights.

Our files are safetensors holding named state dicts, JSON metadata beside them. One file holds
several state dicts as `<group>.<key>` tensors (a stage's final file: `model` and `ema`). Nothing
is unpickled. Position embeddings are recomputed for each input size, so they never travel in
checkpoints. (A run's resumable step checkpoints are torch.distributed.checkpoint folders that
only training reads: soraflow.training.engines.base.)

Besides our own files, PixArt-α and Open-Sora 1.0 .pth files load as a stage's initial weights
and for sampling (load_pretrained), and a final checkpoint exports as a .pth that Open-Sora 1.0's
load_checkpoint takes (export_opensora).

It sits in the models layer, below training and inference: training writes checkpoints and
sampling reads them, and neither imports the other. A stage's starting weights are its model
family's (soraflow.models.family).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from soraflow.core.atomic import atomic_path
from soraflow.models.stdit import PRESETS, STDiT, build_model

# Open-Sora 1.0 saves its position-embedding buffers (pos_embed [1, S, D], pos_embed_temporal
# [1, T, D]) in its checkpoints and deletes them on load (find_model); ours are recomputed
# for each grid, so they are never saved and never load.
RECOMPUTED = ("pos_embed",)  # matches pos_embed_temporal too
# What a .pth may wrap its weights in: Open-Sora 1.0's find_model takes "ema" (its training
# script's layout), PixArt-alpha saves "state_dict". Tried in this order, as find_model does.
WRAPPERS = ("ema", "state_dict")


def saved(name: str) -> bool:
    return not any(n in name for n in RECOMPUTED)


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


def checkpoint_metadata(path) -> dict:
    """The metadata of a file written by save_checkpoint_file (no tensor is read)."""
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items()}


def is_torch_checkpoint(path) -> bool:
    """PixArt-α and Open-Sora ship torch.save files (.pth, .pt); soraflow writes safetensors."""
    return Path(path).suffix in (".pth", ".pt")


def initialise_from_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load our own weights: everything but the recomputed position embeddings must fit."""
    check_fit(model.load_state_dict(state, strict=False), source)


def check_fit(result, source, left_out: frozenset[str] = frozenset()) -> None:
    """A strict=False load result may leave out only the recomputed position embeddings (and the
    weights in `left_out`: a resumable checkpoint holds no frozen weights)."""
    missing = [k for k in result.missing_keys if saved(k) and k not in left_out]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: does not fit this model (missing {missing}, unexpected {result.unexpected_keys})")


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


def pretrained_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """A PixArt-alpha or Open-Sora 1.0 .pth's contents -> a state dict in our layout: unwrapped,
    PixArt's Conv2d patch weight [D, C, 2, 2] made our Conv3d [D, C, 1, 2, 2], no pos-embeds."""
    for wrapper in WRAPPERS:
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    state = {k: v for k, v in checkpoint.items() if saved(k)}
    patch_weight = state.get("x_embedder.proj.weight")
    if isinstance(patch_weight, torch.Tensor) and patch_weight.dim() == 4:
        state["x_embedder.proj.weight"] = patch_weight.unsqueeze(2)
    return state


def _listed(keys, limit: int = 8) -> str:
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_pretrained(model: STDiT, checkpoint, source=None) -> list[str]:
    """Initialise from a PixArt-alpha image checkpoint (as Open-Sora 1.0 does from
    PixArt-XL-2-512x512.pth) or an Open-Sora 1.0 STDiT checkpoint (OpenSora-v1-*.pth), plain
    or wrapped (see WRAPPERS): a .pth path (read with weights_only) or its loaded contents.

    Every weight of the model must come from the checkpoint, with its shape, and every
    checkpoint weight must find its place; the one exception is an image checkpoint, which
    has no temporal attention: that stays at its init (output projection zero, so the model
    starts as the image model on every frame). Anything else is a ValueError naming the file
    and the keys. Returns the keys left at init."""
    if isinstance(checkpoint, (str, Path)):
        source = source or checkpoint
        try:
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # torch's message names what it refused on one line
            lines = str(err).splitlines()
            refused = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
            raise ValueError(f"{source}: holds more than tensors, so it is not unpickled ({refused}); "
                             "save its state dict alone (torch.save(state_dict, path))") from err
    source = source or "checkpoint"
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, not a state dict")
    state, own = pretrained_state(checkpoint), model.state_dict()
    matching = sorted(set(state) & set(own))
    if not matching:
        raise ValueError(
            f"{source}: no weight matches STDiT's key names (it holds {_listed(sorted(state))}); "
            "expected a PixArt-alpha or Open-Sora 1.0 STDiT checkpoint"
        )
    temporal = {k for k in own if ".attn_temp." in k}
    image_checkpoint = not temporal & set(state)
    missing = sorted(set(own) - set(state))
    problems = {
        "trained weights missing": [k for k in missing if not (image_checkpoint and k in temporal)],
        "weights this model has no place for": sorted(set(state) - set(own)),
        "shapes that differ (checkpoint vs model)": [
            f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in matching
            if tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
        ],
    }
    found = [f"{what}: {_listed(keys)}" for what, keys in problems.items() if keys]
    if found:
        raise ValueError(f"{source}: does not fit this STDiT (check its preset and size settings); " + "; ".join(found))
    model.load_state_dict(state, strict=False)
    return missing


def opensora_state_dict(model: STDiT) -> dict[str, torch.Tensor]:
    """The model's weights in Open-Sora 1.0's STDiT layout: our key names are theirs; add the
    position-embedding buffers its state dict holds, for the grid the model was built for."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["pos_embed"] = model.pos_embed.reshape(1, -1, model.hidden_size).clone()  # [1, 1, S, D] -> [1, S, D]
    state["pos_embed_temporal"] = model.pos_embed_temporal.clone()  # [1, T, D]
    return state


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
