"""The engine interface, and the single-process engine that implements it for a plain module.

The trainer talks to an engine only through the methods of `Engine`: it wraps the model and
builds the optimizer (`wrap`), steps (`update`), writes and reads a resumable checkpoint
(`save_checkpoint`, `load_checkpoint`), and gathers full states by parameter name for the
final checkpoint and the replica check (`model_state`; `weights` and `gather` for the EMA).

A resumable checkpoint is a torch.distributed.checkpoint folder: every rank writes its own
share in parallel (FSDP its shards; DDP's replicated tensors are spread over the ranks by
size) and reads back only what it holds, into its tensors in place, so no rank ever holds a
full copy of the model, EMA and optimizer state beside its own. An engine whose states are
sharded (fsdp) writes its periodic checkpoints in the background: each rank copies its share
to host memory and trains on while a thread writes it (under ddp that copy would be a whole
replica per rank, so it writes in the foreground). The folder stores global tensors by
parameter name: `model`, `ema` and the optimizer's `state` (exp_avg, exp_avg_sq, step per
parameter; its param_groups come from the settings), so it loads at any world size and under
any engine (torch 2.13's folders load in the colossalai environment's torch 2.5.1 and the
reverse: tests/test_colossalai.py). `model` holds what trains: a LoRA run reads its frozen base
from its source again on resume (Wan 14B with a rank-32 LoRA: 1.7 GB of states instead of 59, by
parameter count). Its `.metadata` is torch's pickle: a run reads only the folders it wrote itself. For a plain module, DDP and FSDP the states come from torch's
`torch.distributed.checkpoint.state_dict` API. The engines (ddp, fsdp, colossalai_zero) build
on this module, which imports none of them.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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
# each rank's own tensors (FSDP: its shards); position embeddings are never saved
PLACED = StateDictOptions(strict=False)


@contextmanager
def one_process_quietly():
    """torch.distributed.checkpoint warns on each call without a process group that it reads or
    writes in this one process: that is the single engine's case, not news for the log."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def frozen_names(model: torch.nn.Module) -> frozenset[str]:
    """The parameters that do not train (a LoRA's base), by state-dict name."""
    return frozenset(name for name, p in model.named_parameters() if not p.requires_grad)


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """`train.mixed_precision` on this device: auto is bf16 on a GPU, fp32 elsewhere."""
    bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


class Engine:
    """One process, no wrapping; the base of the other engines.

    `opts` is the `train` section: grad_clip, mixed_precision and the engine's own settings."""

    name = "single"
    background_saves = False  # whether save_checkpoint may write in the background (see the module)
    # whether `weights` are the tensors the forward pass reads, so copying the EMA into them
    # evaluates the EMA weights (the validation loss of both)
    weights_are_forward = True

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

    def after_forward_only(self, model: torch.nn.Module) -> None:
        """Called after forward passes without a backward (the validation loss): an engine that
        keeps gathered weights for the backward lets them go here."""

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full CPU state dict on rank 0, {} elsewhere (a collective: every rank calls it)."""
        state = get_model_state_dict(model, options=GATHERED)
        return {k: v for k, v in state.items() if saved(k)} if self.rank == 0 else {}

    def save_checkpoint(self, path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: dict[str, torch.Tensor], background: bool = False) -> Future | None:
        """Write the model, EMA (placed like `weights`) and optimizer state into the folder `path`,
        every rank its share (a collective). With `background`, an engine with background_saves
        returns once its share is copied, with a Future of the write (on rank 0 it completes once
        every rank's share is in); otherwise it returns None once written."""
        state = self.checkpoint_state(model, optimizer, ema)[0]
        if background and self.background_saves:
            # the writing thread talks on a group of its own, off the training thread's
            return dcp.async_save(state, checkpoint_id=path, process_group=self.save_group)
        with one_process_quietly():
            dcp.save(state, checkpoint_id=path)
        return None

    def load_checkpoint(self, path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: dict[str, torch.Tensor]) -> None:
        """Read a folder save_checkpoint wrote (at any world size, by any engine) into the model,
        the EMA and the optimizer, each rank its own share (a collective)."""
        state, param_groups = self.checkpoint_state(model, optimizer, ema)
        with one_process_quietly():
            dcp.load(state, checkpoint_id=path)  # into the tensors themselves
        check_fit(set_model_state_dict(model, state["model"], options=PLACED), path, frozen_names(model))
        set_optimizer_state_dict(model, optimizer, {**state["optim"], "param_groups": param_groups})

    def checkpoint_state(self, model, optimizer, ema) -> tuple[dict, list]:
        """(the tensors a checkpoint holds, as this rank places them: its own, not copies), the
        optimizer's param_groups). An optimizer that has not stepped yet is given its state first."""
        optim = get_optimizer_state_dict(model, optimizer)
        frozen = frozen_names(model)
        state = {
            "model": {k: v for k, v in get_model_state_dict(model).items() if saved(k) and k not in frozen},
            "ema": {k: v for k, v in ema.items() if saved(k)},
            "optim": {"state": optim["state"]},
        }
        return state, optim["param_groups"]

    def weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights the optimizer steps (and the EMA follows), by name, placed as this
        engine keeps them: the module's state dict (under FSDP its parameters are DTensors)."""
        return model.state_dict()

    def gather(self, placed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors placed like `weights`, in full on the CPU on every rank (a collective)."""
        return {k: self.full_tensor(v).cpu() for k, v in placed.items()}

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach()
