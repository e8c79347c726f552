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
follows the master weights and is sharded like them. ZeRO's shards are ranges of the flattened
parameter, which a torch.distributed.checkpoint chunk (a box of the parameter's shape) cannot
describe, so each parameter has an owner rank (the ranks share the bytes evenly): a checkpoint
gathers a parameter's weights, EMA and moments to its owner, one parameter at a time, and every
rank writes what it owns; a resume reads what each rank owns and sends every rank its shard. No
rank holds more than its share of the full states.

On a machine without a GPU, ColossalAI's ZeRO stops at its device checks; the tests stand in
for those (tests/colossalai_cpu/sitecustomize.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from colossalai.booster import Booster
from colossalai.booster.plugin import LowLevelZeroPlugin

from soraflow.models.checkpoint import saved
from soraflow.training.engines.base import Engine, compute_dtype

PLUGIN_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class ColossalAIEngine(Engine):
    name = "colossalai"
    weights_are_forward = False  # the fp32 master shards: the forward reads the working copy

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

    def _gather_to(self, owner: int, name: str, shard: torch.Tensor) -> torch.Tensor | None:
        """A parameter's full tensor (CPU) on its owner from every rank's shard; None elsewhere."""
        parts = [torch.empty_like(shard) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(shard.detach().contiguous(), parts, dst=owner)
        if parts is None:
            return None
        return torch.cat(parts)[: self.shapes[name].numel()].view(self.shapes[name]).cpu()

    def _scatter_from(self, owner: int, full: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the owner's full tensor, placed like `like`."""
        shard = torch.empty_like(like)
        parts = None
        if self.rank == owner:
            flat = full.to(like.device, like.dtype).reshape(-1)
            parts = list(torch.nn.functional.pad(flat, [0, -flat.numel() % self.world]).chunk(self.world))
        dist.scatter(shard, parts, src=owner)
        return shard

    def owners(self) -> dict[str, int]:
        """The rank that writes and reads each parameter: the largest first, each to the rank
        with the fewest bytes so far (the same on every rank)."""
        load, owners = [0] * self.world, {}
        for name in sorted(self.names, key=lambda n: (-self.shapes[n].numel(), n)):
            owners[name] = min(range(self.world), key=lambda r: load[r])
            load[owners[name]] += self.shapes[name].numel()
        return owners

    def weights(self, model):
        # the parameters are ZeRO's fp32 master shards themselves, so the EMA reads them in place:
        # no per-call copy of the model. Only the persistent buffers (the null caption) are cast
        # to fp32 like the EMA, since the bf16 plugin casts the whole module.
        buffers = {k: v.float() if v.is_floating_point() else v
                   for k, v in model.state_dict().items() if k not in self.masters}
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

    # --- checkpoint states -----------------------------------------------------------------
    def model_state(self, model):
        state = self.gather(self.weights(model))  # a collective: every rank takes part
        return {k: v for k, v in state.items() if saved(k)} if self.rank == 0 else {}

    def _buffers(self, model) -> list[str]:
        """The saved entries of the state dict that are not parameters (full on every rank)."""
        return [k for k in model.state_dict() if k not in self.masters and saved(k)]

    def save_checkpoint(self, path, model, optimizer, ema, background=False):
        # background_saves is False: the gathers to owner ranks are collectives on the training group
        owners, buffers = self.owners(), model.state_dict()
        share = {"model": {}, "ema": {}, "optim": {"state": {}}}
        for name in self.names:
            state = optimizer.optim.state[self.masters[name]]
            full = {what: self._gather_to(owners[name], name, t) for what, t in
                    (("model", self.masters[name]), ("ema", ema[name]), ("exp_avg", state["exp_avg"]),
                     ("exp_avg_sq", state["exp_avg_sq"]))}  # fmt: skip
            if owners[name] == self.rank:
                share["model"][name], share["ema"][name] = full.pop("model"), full.pop("ema")
                share["optim"]["state"][name] = {"step": state["step"], **full}
        if self.rank == 0:
            for name in self._buffers(model):
                share["model"][name], share["ema"][name] = buffers[name].float().cpu(), ema[name].cpu()
        dcp.save(share, checkpoint_id=path)

    def load_checkpoint(self, path, model, optimizer, ema):
        owners, buffers = self.owners(), self._buffers(model)
        mine = [name for name in self.names if owners[name] == self.rank]

        def empty(name):
            return torch.empty(self.shapes[name], dtype=torch.float32)

        share = {  # what this rank reads: its own parameters in full, every step count and buffer
            "model": {**{n: empty(n) for n in mine}, **{n: torch.empty_like(ema[n], device="cpu") for n in buffers}},
            "ema": {**{n: empty(n) for n in mine}, **{n: torch.empty_like(ema[n], device="cpu") for n in buffers}},
            "optim": {"state": {n: {"step": torch.tensor(0.0), **({"exp_avg": empty(n), "exp_avg_sq": empty(n)}
                                                                  if n in mine else {})} for n in self.names}},
        }  # fmt: skip
        dcp.load(share, checkpoint_id=path)
        working = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.names:
                owner, master = owners[name], self.masters[name]
                full = share["model"].get(name, torch.empty(self.shapes[name], dtype=torch.float32)).to(self.device)
                dist.broadcast(full, src=owner)  # every rank keeps the full working weights
                working[name].copy_(full)
                master.copy_(self._shard(full))
                ema[name].copy_(self._scatter_from(owner, share["ema"].get(name), master))
                saved_state = share["optim"]["state"][name]
                optimizer.optim.state[master] = {
                    "step": saved_state["step"],
                    **{k: self._scatter_from(owner, saved_state.get(k), master) for k in ("exp_avg", "exp_avg_sq")},
                }
            module_buffers = dict(model.named_buffers())
            for name in buffers:
                module_buffers[name].copy_(share["model"][name])
                ema[name].copy_(share["ema"][name])
