"""The ddp engine: a full replica of the model per rank, gradients averaged by DistributedDataParallel."""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from soraflow.training.engines.base import Engine


class DDPEngine(Engine):
    """A full replica per rank; DistributedDataParallel averages the gradients."""

    name = "ddp"

    def wrap(self, model, make_optimizer):
        if self.world == 1:
            return model, make_optimizer(model.parameters())
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids), make_optimizer(model.parameters())
