"""The colossalai engine: ColossalAI's LowLevelZeroPlugin (ZeRO-1/2), Open-Sora 1.0's engine.

Imported only when `train.engine: colossalai` is chosen (load_engine in soraflow.training.engines),
and only in the environment that has colossalai (envs/colossalai.txt: colossalai 0.5.0 pins torch 2.5.1).

The booster wraps the model and the torch AdamW the trainer builds. Under ZeRO every rank
keeps the full working weights (fp32, or bf16 when `train.mixed_precision` says so) and the
fp32 master weights and Adam state of 1/world of each parameter (flattened and padded to a
multiple of world); stage 2 also reduce-scatters the gradients instead of all-reducing them.
The plugin's precision comes from `train.mixed_precision` and its max_norm from
`train.grad_clip`; `train.colossalai` holds the ZeRO stage and whether gradient reduction
overlaps the backward pass (CUDA streams).

States cross the seam in the trainer's format: full tensors by parameter name, the fp32
master weights (not the working copy) as the model's weights. So a bf16 run resumes
exactly, and its checkpoints load under ddp or fsdp and theirs under this engine. The EMA
follows the master weights and is sharded like them.

On a machine without a GPU, ColossalAI's ZeRO stops at its device checks; the tests stand in
for those (tests/colossalai_cpu/sitecustomize.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from colossalai.booster import Booster
from colossalai.booster.plugin import LowLevelZeroPlugin

from soraflow.models.checkpoint import check_fit, saved
from soraflow.training.engines.base import Engine, compute_dtype

PLUGIN_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class ColossalAIEngine(Engine):
    name = "colossalai"

    def wrap(self, model, make_optimizer):
        settings = self.opts["colossalai"]
        precision = PLUGIN_PRECISION[compute_dtype(self.opts["mixed_precision"], self.device)]
        plugin = LowLevelZeroPlugin(
            stage=settings["zero_stage"],
            precision=precision,
            max_norm=self.opts["grad_clip"],
            overlap_communication=settings["overlap_communication"],
        )
        self.booster = Booster(plugin=plugin)
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]  # the optimizer's parameter order
        self.shapes = {name: p.shape for name, p in named}
        # in bf16 the plugin casts the module first and seeds the fp32 master weights from the
        # rounded copy: keep the weights to seed them from
        initial = {name: p.detach().cpu().clone() for name, p in named} if precision != "fp32" else None
        wrapped, optimizer, *_ = self.booster.boost(model, make_optimizer([p for _, p in named]))
        self.masters = {name: optimizer.get_working_to_master_map()[id(p)] for name, p in named}
        if initial is not None:
            self._set_masters(initial)
        return wrapped, optimizer

    def update(self, loss, model, optimizer):
        # the ZeRO optimizer reduces the gradients in its backward and clips them in its step
        self.booster.backward(loss, optimizer)
        optimizer.step()
        norm = optimizer.get_grad_norm()
        optimizer.zero_grad()
        return torch.tensor(norm, device=self.device)

    # --- master weights: 1/world of each flattened, padded parameter per rank --------------
    def _shard(self, full: torch.Tensor) -> torch.Tensor:
        flat = full.reshape(-1)
        flat = torch.nn.functional.pad(flat, [0, -flat.numel() % self.world])
        return flat.chunk(self.world)[self.rank]

    def _set_masters(self, full: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, master in self.masters.items():
                master.copy_(self._shard(full[name]))

    def weights(self, model):
        # buffers in fp32 like the EMA (the bf16 plugin casts the whole module)
        buffers = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        return {**buffers, **self.masters}

    def gather(self, placed):
        full = {}
        for name, t in placed.items():
            if name in self.masters:  # this rank's shard of a parameter
                parts = torch.empty(t.numel() * self.world, dtype=t.dtype, device=t.device)
                dist.all_gather(list(parts.chunk(self.world)), t.detach().contiguous())
                full[name] = parts[: self.shapes[name].numel()].view(self.shapes[name]).cpu()
            else:
                full[name] = t.detach().cpu()
        return full

    def scatter(self, full, placed):
        return {
            name: (self._shard(v) if name in self.masters else v).to(placed[name].device, placed[name].dtype)
            for name, v in full.items()
        }

    # --- checkpoint states -----------------------------------------------------------------
    def model_state(self, model):
        state = self.gather(self.weights(model))  # a collective: every rank takes part
        return {k: v for k, v in state.items() if saved(k)} if self.rank == 0 else {}

    def load_model_state(self, model, state):
        with torch.no_grad():
            check_fit(model.load_state_dict(state, strict=False), "checkpoint")  # the working copy
        self._set_masters({name: state[name].float() for name in self.masters})

    def optimizer_state(self, model, optimizer):
        # ZeRO's state_dict gathers each state tensor in full, keyed by position in the optimizer
        state = optimizer.state_dict(only_on_master=True)
        if self.rank != 0:
            return {}
        return {
            "state": {self.names[i]: {k: v.cpu() for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]],
        }

    def load_optimizer_state(self, model, optimizer, state):
        position = {name: i for i, name in enumerate(self.names)}
        optimizer.load_state_dict({
            "state": {position[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
        })
