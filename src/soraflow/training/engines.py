"""Engines (`train.engine`): how the model is spread over the training processes.

    single  one process: the module itself
    ddp     DistributedDataParallel: a full replica per rank, gradients all-reduced
    fsdp    FSDP2: `fully_shard` on every STDiT block, then on the root; parameters,
            gradients and optimizer state are sharded (DTensor) over the ranks

The trainer talks to an engine only through the methods of `Engine`. Model and optimizer
states cross that seam in full and by parameter name, through torch's
`torch.distributed.checkpoint.state_dict` API (the same calls for a plain module, DDP and
FSDP), so a checkpoint written by one engine resumes under another and the file format
never depends on the engine. An engine living in another environment (e.g. a ColossalAI
booster, which pins an older torch) implements these methods around its own wrap and
save calls and registers in `ENGINES`; nothing here imports it.
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
from torch.nn.parallel import DistributedDataParallel

from soraflow.training.checkpoint import check_fit, saved

# full (gathered) states on the CPU; with sharded parameters only rank 0 receives them
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
# full states given on every rank, each taking its own shard; position embeddings are absent
SCATTERED = StateDictOptions(full_state_dict=True, strict=False)


class Engine:
    """One process, no wrapping; the base of the other engines."""

    name = "single"

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward/backward on; the optimizer is built on model.parameters() after it."""
        return model

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

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """One (EMA) tensor in full on the CPU."""
        return t.detach().cpu()

    def like(self, full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """A full tensor placed (and sharded) like `ref`."""
        return full.to(ref.device, ref.dtype)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


class DDPEngine(Engine):
    """A full replica per rank; DistributedDataParallel averages the gradients."""

    name = "ddp"

    def wrap(self, model):
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


class FSDPEngine(Engine):
    """FSDP2: each STDiT block is one shard unit (all-gathered for its forward), then the root."""

    name = "fsdp"

    def wrap(self, model):
        from torch.distributed.fsdp import fully_shard

        if self.world == 1:
            return model
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model

    def full_tensor(self, t):
        from torch.distributed.tensor import DTensor

        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()

    def like(self, full, ref):
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(ref, DTensor):
            return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        return full.to(ref.device, ref.dtype)


ENGINES: dict[str, type[Engine]] = {"single": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine}
