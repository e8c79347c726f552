"""Test-only stand-ins that let ColossalAI's ZeRO (LowLevelZeroPlugin) train on a CPU machine.

The colossalai tests put this folder on PYTHONPATH, so Python runs it at start-up in every
process of the colossalai environment they start. It stands in for the GPU that colossalai
0.5.0's ZeRO optimizer assumes, and nothing else:

1. LowLevelZeroOptimizer._sanity_checks asserts a CUDA or NPU accelerator ("device is
   required"); the stand-in keeps its other check (every parameter has the same dtype).
2. ZeRO's gradient buckets ask the accelerator for a communication Stream, and the reduction
   runs inside `accelerator.stream(current_stream())` and synchronizes after the backward; the
   CPU accelerator refuses all four. On a CPU there are no streams (gloo collectives run on the
   calling thread and return when done), so no stream, a null context and a no-op
   synchronize are what those calls mean there.

Overlapping the reduction with the backward (overlap_communication) still needs real streams
(`record_stream`), so the tests train with train.colossalai.overlap_communication false.
The reduce-scatters, all-gathers, sharded master weights and optimizer states are
colossalai's own.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

if "RANK" in os.environ:  # torchrun's workers; the launcher never imports colossalai
    from colossalai.accelerator.cpu_accelerator import CpuAccelerator
    from colossalai.zero.low_level.low_level_optim import LowLevelZeroOptimizer

    def _same_dtype_check(self) -> None:
        for group in self.optim.param_groups:
            for param in group["params"]:
                if not getattr(param, "skip_zero_check", False):
                    assert param.dtype == self._dtype, f"parameters are {param.dtype}, expected {self._dtype}"

    LowLevelZeroOptimizer._sanity_checks = _same_dtype_check
    CpuAccelerator.Stream = lambda self, *args, **kwargs: None
    CpuAccelerator.current_stream = lambda self, *args, **kwargs: None
    CpuAccelerator.stream = lambda self, stream: nullcontext()
    CpuAccelerator.synchronize = lambda self, *args, **kwargs: None
