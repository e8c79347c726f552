"""What only training does with checkpoint files: a stage's starting weights. The file format
itself, which sampling reads too, is soraflow.models.checkpoint; a run's resumable step
checkpoints are the engines' (soraflow.training.engines.base).
"""

from __future__ import annotations

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
