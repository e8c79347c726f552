"""The checkpoint file format: safetensors holding named state dicts, JSON metadata beside them.

One file holds several state dicts as `<group>.<key>` tensors (a stage's final file: `model`
and `ema`; a resumable step: `model`, `ema` and `optim`, the optimizer state by parameter
name). Nothing is unpickled. Position embeddings are recomputed for each input size, so they
never travel in checkpoints. Reading needs torch and safetensors only: sampling loads weights
from here without the training engines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soraflow.core.atomic import atomic_path
from soraflow.models.stdit import build_model, load_pixart_checkpoint

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
    with safe_open(str(path), "pt") as f:
        metadata = {k: json.loads(v) for k, v in f.metadata().items()}
        prefix = group + "."
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no '{group}' weights in this checkpoint")
    return state, metadata


def initialise(model: torch.nn.Module, init_path: str | None) -> dict:
    """Start from a previous stage's checkpoint (its raw weights) or a PixArt-α .pth."""
    if not init_path:
        return {}
    if str(init_path).endswith((".pth", ".pt")):
        missing, unexpected = load_pixart_checkpoint(model, init_path)
        return {"missing": missing, "unexpected": unexpected}
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


def load_for_sampling(path, use_ema: bool) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The model stored in a final checkpoint, ready for inference, and its latent (T, H, W)."""
    weights, metadata = load_checkpoint_file(path, "ema" if use_ema else "model")
    config = {**metadata["model_config"], "grad_checkpointing": False}
    model = build_model(config, input_size=tuple(metadata["input_size"]))
    initialise_from_state(model, weights, path)
    return model.eval(), tuple(metadata["input_size"])
