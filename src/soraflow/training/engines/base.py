"""The engine interface, and the single-process engine that implements it for a plain module.

The trainer talks to an engine only through the methods of `Engine`: it wraps the model and
builds the optimizer (`wrap`), steps (`update`), and moves states across the seam in full and
by parameter name (`model_state`, `optimizer_state` and their loads; `weights`, `gather` and
`scatter` for the EMA). For a plain module, DDP and FSDP those go through torch's
`torch.distributed.checkpoint.state_dict` API, so a checkpoint written by one engine resumes
under another and the file format never depends on the engine. The engines (ddp, fsdp,
colossalai_zero) build on this module, which imports none of them.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from soraflow.models.checkpoint import check_fit, saved

# full (gathered) states on the CPU; with sharded parameters only rank 0 receives them
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
# full states given on every rank, each taking its own shard; position embeddings are absent
SCATTERED = StateDictOptions(full_state_dict=True, strict=False)


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """`train.mixed_precision` on this device: auto is bf16 on a GPU, fp32 elsewhere."""
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


class Engine:
    """One process, no wrapping; the base of the other engines.

    `opts` is the `train` section: grad_clip, mixed_precision and the engine's own settings."""

    name = "single"

    def __init__(self, rank: int, world: int, device: torch.device, opts: dict):
        self.rank, self.world, self.device, self.opts = rank, world, device, opts

    def wrap(self, model: torch.nn.Module, make_optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """(the module to run forward on, the optimizer): `make_optimizer(parameters)` is called
        on the parameters once the engine has placed them (FSDP shards them first)."""
        return model, make_optimizer(model.parameters())

    def update(self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Backward, clip the gradients to train.grad_clip, step, clear them. Returns the global
        gradient norm before clipping (a tensor, so the host need not wait for it)."""
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.opts["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return self.full_tensor(norm)

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full CPU state dict on rank 0, {} elsewhere (a collective: every rank calls it)."""
        state = get_model_state_dict(model, options=GATHERED)
        return {k: v for k, v in state.items() if saved(k)} if self.rank == 0 else {}

    def load_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """A full state dict, given on every rank."""
        check_fit(set_model_state_dict(model, state, options=SCATTERED), "checkpoint")

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """{"state": {param name: {k: tensor}}, "param_groups": [... "params": [names]]}, full,
        CPU, on rank 0 (a collective)."""
        state = get_optimizer_state_dict(model, optimizer, options=GATHERED)
        return state if self.rank == 0 else {}

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights the optimizer steps (and the EMA follows), by name, placed as this
        engine keeps them: the module's state dict (under FSDP its parameters are DTensors)."""
        return model.state_dict()

    def gather(self, placed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors placed like `weights`, in full on the CPU on every rank (a collective)."""
        return {k: self.full_tensor(v).cpu() for k, v in placed.items()}

    def scatter(self, full: dict[str, torch.Tensor], placed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors placed (and sharded) like their namesakes in `placed`."""
        return {k: self.like(v, placed[k]) for k, v in full.items()}

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    def like(self, full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return full.to(ref.device, ref.dtype)
