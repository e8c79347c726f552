"""Where model steps run: on the job's accelerators, in bf16, else on the CPU in fp32.

Every model step (sampling, captioning, encoding video and text, aesthetic scoring, training)
places its models and tensors through this module. The job's devices are the accelerators the
process can see: Slurm gives a job its GPUs by CUDA_VISIBLE_DEVICES (and cgroups), so the count
torch reports is the job's, and a job given none runs on the CPU. torch.accelerator names the
accelerator (CUDA on the clusters; the tests' fake device, tests/fake_accelerator.py, in CI);
the colossalai environment's torch 2.5.1 predates it and knows CUDA alone.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

CPU = torch.device("cpu")


def accelerator_type() -> str | None:
    """The accelerator this process can use ("cuda"), or None."""
    if hasattr(torch, "accelerator"):
        found = torch.accelerator.current_accelerator(check_available=True)
        return None if found is None else found.type
    return "cuda" if torch.cuda.is_available() else None


def job_devices() -> list[torch.device]:
    """The job's devices in order: every accelerator it was given ([cuda:0, cuda:1] for two
    GPUs), else [cpu]."""
    kind = accelerator_type()
    if kind is None:
        return [CPU]
    count = torch.accelerator.device_count() if hasattr(torch, "accelerator") else torch.cuda.device_count()
    return [torch.device(kind, index) for index in range(count)]


def model_dtype(device: torch.device) -> torch.dtype:
    """Inference weights: bf16 on an accelerator, fp32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def device_and_dtype(index: int = 0) -> tuple[torch.device, torch.dtype]:
    """The job's `index`-th device (the first by default; one per model replica) and its dtype."""
    device = job_devices()[index]
    return device, model_dtype(device)


def rank_device(local_rank: int) -> torch.device:
    """A training process's device: the node's `local_rank`-th accelerator (torchrun starts one
    process per device), else the CPU."""
    devices = job_devices()
    if devices == [CPU]:
        return CPU
    if local_rank >= len(devices):
        raise RuntimeError(f"training process {local_rank} of this node has no device: the job sees "
                           f"{len(devices)} ({', '.join(map(str, devices))}); give it one GPU per process")
    return devices[local_rank]


def use_device(device: torch.device):
    """A context making `device` the current one of its kind where torch keeps one (CUDA:
    kernels and memory without an index go there), for a thread driving one replica."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def set_process_device(device: torch.device) -> None:
    """Make `device` this process's current device (a training rank's)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def collective_backend(device: torch.device) -> str:
    """torch.distributed's backend for tensors on `device`: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (CUDA's total), None where torch does not say (the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None
