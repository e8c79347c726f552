"""The fsdp engine: FSDP2 shards parameters, gradients and optimizer state (DTensors) over the ranks;
periodic checkpoints are written in the background."""

from __future__ import annotations

import torch.distributed as dist

from soraflow.training.engines.base import Engine


class FSDPEngine(Engine):
    """FSDP2: each transformer block (the model's `blocks`: STDiT's, Wan's) is one shard unit (all-gathered
    for its forward), then the root."""

    name = "fsdp"
    background_saves = True  # each rank copies only its shards to host memory

    def __init__(self, rank, world, device, opts):
        super().__init__(rank, world, device, opts)
        self.save_group = dist.new_group(backend="gloo") if world > 1 else None

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

    def after_forward_only(self, model):
        # FSDP2 keeps the root's gathered parameters after a forward for the backward; without
        # one they stay the module's parameters, which the optimizer does not know, and the EMA
        # copied into the shards would not reach the next forward
        for module in model.modules():
            if hasattr(module, "reshard"):
                module.reshard()

    def full_tensor(self, t):
        from torch.distributed.tensor import DTensor

        return (t.full_tensor() if isinstance(t, DTensor) else t).detach()
