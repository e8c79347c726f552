"""Engines (`train.engine`): how the model is spread over the training processes.

    single      one process: the module itself
    ddp         DistributedDataParallel: a full replica per rank, gradients all-reduced
    fsdp        FSDP2: `fully_shard` on every STDiT block, then on the root; parameters,
                gradients and optimizer state are sharded (DTensor) over the ranks
    colossalai  ColossalAI's LowLevelZeroPlugin (ZeRO-1/2, Open-Sora 1.0's engine), in an
                environment of its own (soraflow.training.colossalai_engine)

The trainer talks to an engine only through the methods of `Engine`: it wraps the model and
builds the optimizer (`wrap`), steps (`update`), and moves states across the seam in full and
by parameter name (`model_state`, `optimizer_state` and their loads; `weights`, `gather` and
`scatter` for the EMA). For a plain module, DDP and FSDP those go through torch's
`torch.distributed.checkpoint.state_dict` API, so a checkpoint written by one engine resumes
under another and the file format never depends on the engine. The colossalai engine lives in
another environment (colossalai pins torch 2.5.1) and is imported only when chosen.
"""

from __future__ import annotations

import sys

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


class DDPEngine(Engine):
    """A full replica per rank; DistributedDataParallel averages the gradients."""

    name = "ddp"

    def wrap(self, model, make_optimizer):
        if self.world == 1:
            return model, make_optimizer(model.parameters())
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), make_optimizer(model.parameters())


class FSDPEngine(Engine):
    """FSDP2: each STDiT block is one shard unit (all-gathered for its forward), then the root."""

    name = "fsdp"

    def wrap(self, model, make_optimizer):
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6 (the colossalai environment's 2.5.1)
            from torch.distributed._composable.fsdp import fully_shard

        if self.world > 1:
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        return model, make_optimizer(model.parameters())  # the sharded (DTensor) parameters

    def full_tensor(self, t):
        from torch.distributed.tensor import DTensor

        return (t.full_tensor() if isinstance(t, DTensor) else t).detach()

    def like(self, full, ref):
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(ref, DTensor):
            return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        return full.to(ref.device, ref.dtype)


def colossalai_engine(rank: int, world: int, device: torch.device, opts: dict) -> Engine:
    """The colossalai engine, imported only when chosen: colossalai lives in its own environment."""
    try:
        from soraflow.training.colossalai_engine import ColossalAIEngine
    except ImportError as missing:
        raise RuntimeError(
            f"train.engine colossalai: {missing} in this environment ({sys.executable}). It trains in an "
            "environment of its own: `make .venv-colossalai/.installed` (envs/colossalai.txt), or "
            "snakemake --use-conda (envs/colossalai.yaml)"
        ) from missing
    return ColossalAIEngine(rank, world, device, opts)


ENGINES = {"single": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine, "colossalai": colossalai_engine}
