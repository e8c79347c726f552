"""What only training does with checkpoints: a stage's starting weights, and the optimizer
state as the flat tensors a resumable step's file holds. The file format itself, which sampling
reads too, is soraflow.models.checkpoint.
"""

from __future__ import annotations

import torch

from soraflow.models.checkpoint import initialise_from_state, is_torch_checkpoint, load_checkpoint_file, load_pretrained
from soraflow.models.stdit import STDiT


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
