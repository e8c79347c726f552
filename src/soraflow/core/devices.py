"""Where model steps run: the GPU in bf16 when there is one, else the CPU in fp32."""

from __future__ import annotations

import torch


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32
