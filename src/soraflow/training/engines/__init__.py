"""Engines (`train.engine`): how the model is spread over the training processes.

    single      one process: the module itself (base.Engine, the base of the others)
    ddp         DistributedDataParallel: a full replica per rank, gradients all-reduced
    fsdp        FSDP2: `fully_shard` on every transformer block, then on the root; parameters,
                gradients and optimizer state are sharded (DTensor) over the ranks
    colossalai  ColossalAI's LowLevelZeroPlugin (ZeRO-1/2, Open-Sora 1.0's engine), in an
                environment of its own

The trainer talks to an engine only through the methods of `base.Engine` and finds it by name
here (`load_engine`), which imports only the chosen engine's module: colossalai lives in
another environment (colossalai pins torch 2.5.1). The engines import the base and never each
other, and nothing imports an engine's module but `load_engine` (import-linter contracts in
pyproject.toml).
"""

from __future__ import annotations

import importlib
import sys

ENGINES = {
    "single": "soraflow.training.engines.base:Engine",
    "ddp": "soraflow.training.engines.ddp:DDPEngine",
    "fsdp": "soraflow.training.engines.fsdp:FSDPEngine",
    "colossalai": "soraflow.training.engines.colossalai_zero:ColossalAIEngine",
}
# the engines whose library lives in an environment of its own, and how to make it
OWN_ENVIRONMENT = {
    "colossalai": "`make .venv-colossalai/.installed` (envs/colossalai.txt), or snakemake --use-conda "
                  "(envs/colossalai.yaml)",
}


def load_engine(name: str):
    """The engine class `train.engine` names (a subclass of base.Engine), its module imported now."""
    if name not in ENGINES:
        raise ValueError(f"train.engine: unknown engine {name!r} (choose from {sorted(ENGINES)})")
    module, cls = ENGINES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as missing:
        if name not in OWN_ENVIRONMENT:
            raise
        raise RuntimeError(f"train.engine {name}: {missing} in this environment ({sys.executable}). It trains in "
                           f"an environment of its own: {OWN_ENVIRONMENT[name]}") from missing
