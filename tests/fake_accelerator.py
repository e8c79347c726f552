"""A fake accelerator for CI machines without a GPU: devices `fakegpu:0`, `fakegpu:1`, ...
whose tensors hold their values in CPU memory but are not CPU tensors to torch.

torch's CPU build cannot make a CUDA tensor, even under FakeTensorMode ("PyTorch is not linked
with support for cuda devices"), and the `meta` device and fake tensors hold no values, so code
that reads a value back (generate's stopping test, `.item()`, `.tolist()`) cannot run on them.
These devices are torch's PrivateUse1 backend registered from Python
(torch.utils.backend_registration): torch.accelerator reports it as the machine's accelerator,
so soraflow.core.devices places every model step on it as it would on CUDA GPUs. Each tensor
on it wraps a CPU tensor (`DeviceTensor`); every operator on such tensors runs on the wrapped
ones after checking, as CUDA does, that its tensors and generator are on one device: a tensor
or module left on the CPU (or on another of the devices) fails with CUDA's message. The
exceptions are CUDA's too: a 0-dim CPU tensor passes as a scalar, and indexing takes indices
from the host. Matrix products, convolutions and attention on the fake devices are counted
per device (`compute_ops`; the CPU's never reach this code), so a test also sees a model that
ran on the CPU from start to end, which a GPU node would run too, only slowly.

Generators: PrivateUse1 generators can only be made in C++, so while `fake_accelerator()` is
active, `torch.Generator(device="fakegpu:k")` makes a CPU generator that says it is on that
device (`DeviceGenerator`), seeded apart from a CPU generator of the same seed (as a CUDA
generator draws another stream than a CPU one); operators check generators like tensors.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import Counter

import torch
from torch.utils._pytree import tree_flatten, tree_map

NAME = "fakegpu"
COMPUTE = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}
# operators that move values between devices, or take their indices from the host as CUDA's do
CROSSING = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize", "index", "index_put_", "_index_put_impl_"}

_lock = threading.Lock()
compute_ops: Counter = Counter()  # (device, operator) -> calls, device "fakegpu:k"
_devices = 0  # how many the machine has; torch sees them only inside fake_accelerator()


class DeviceMismatch(RuntimeError):
    pass


class DeviceTensor(torch.Tensor):
    """A tensor on `fakegpu:index`; its values are the CPU tensor `elem`."""

    elem: torch.Tensor
    index: int

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device(NAME, index), requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor, index: int):
        self.elem, self.index = elem, index

    def tolist(self):  # torch refuses it for subclasses; a CUDA tensor gives its values
        return self.elem.tolist()

    def untyped_storage(self):  # FSDP frees and regrows the storage of gathered parameters
        return self.elem.untyped_storage()

    def __repr__(self, *, tensor_contents=None):
        return f"DeviceTensor({self.elem!r}, device='{NAME}:{self.index}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_op(func, args, kwargs or {})


class DeviceGenerator(torch.Generator):
    """A CPU generator that says it is on `fakegpu:index`. An operator receives a plain
    Generator for it (the same C++ object), found again by its state."""

    def __new__(cls, index: int):
        return super().__new__(cls, "cpu")

    def __init__(self, index: int):
        self.index = index
        _device_generators.add(self)

    @property
    def device(self):
        return torch.device(NAME, self.index)

    def manual_seed(self, seed):  # torch's returns a plain Generator
        super().manual_seed(seed ^ 0x5EED)
        return self


_device_generators: weakref.WeakSet = weakref.WeakSet()


def _generator_device(generator: torch.Generator) -> str:
    if isinstance(generator, DeviceGenerator):
        return str(generator.device)
    state = generator.get_state()
    found = [g for g in list(_device_generators) if torch.equal(state, g.get_state())]
    return str(found[0].device) if found else "cpu"


def _device_of(value) -> str | None:
    """"fakegpu:k" or "cpu" for a device argument (an index-less fakegpu is the current, 0)."""
    if value is None:
        return None
    device = torch.device(value)
    if device.type == NAME:
        return f"{NAME}:{device.index or 0}"
    return str(device)


def _unwrap(value):
    if isinstance(value, DeviceTensor):
        return value.elem
    if isinstance(value, torch.device) and value.type == NAME:
        return torch.device("cpu")
    return value


def run_op(func, args, kwargs):
    name = func._schema.name.split("::")[-1]
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    placed = {f"{NAME}:{t.index}" for t in tensors if isinstance(t, DeviceTensor)}
    target = _device_of(kwargs.get("device"))
    if name not in CROSSING:
        found = placed | {"cpu" for t in tensors if not isinstance(t, DeviceTensor) and t.dim() > 0}
        if len(found) > 1:
            host = [tuple(t.shape) for t in tensors if not isinstance(t, DeviceTensor) and t.dim() > 0]
            raise DeviceMismatch(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{' and '.join(sorted(found))}! ({func}"
                + (f"; shapes on the cpu: {host}" if host else "") + ")")
    where = target or (min(placed) if placed else "cpu")
    if name in ("copy_", "_copy_from"):  # the destination decides
        destination = args[0] if name == "copy_" else args[1]
        where = f"{NAME}:{destination.index}" if isinstance(destination, DeviceTensor) else "cpu"
    generator = kwargs.get("generator")
    if generator is not None and _generator_device(generator) != where:
        raise DeviceMismatch(f"Expected a '{where}' device type for generator but found "
                             f"'{_generator_device(generator)}' ({func})")
    if name in COMPUTE and where != "cpu":
        with _lock:
            compute_ops[(where, name)] += 1
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    # an input given back (in place, out=, a collective's) is the caller's own tensor again
    given = {id(t.elem): t for t in tensors if isinstance(t, DeviceTensor)}
    if where == "cpu":
        return tree_map(lambda t: given.get(id(t), t), out)
    index = int(where.split(":")[1])

    def placed(t):
        if id(t) in given:
            return given[id(t)]
        return DeviceTensor(t, index) if type(t) is torch.Tensor else t

    return tree_map(placed, out)


def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return DeviceTensor(torch.empty(size, dtype=dtype, layout=layout, memory_format=memory_format), device.index or 0)


def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
    return DeviceTensor(torch.empty_strided(size, stride, dtype=dtype, layout=layout), device.index or 0)


def _copy_from(src, dst, non_blocking=False):
    """Reached with the Python key excluded (torch.tensor(data, device=...) builds so)."""
    dst.elem.copy_(src.elem if isinstance(src, DeviceTensor) else src)
    return dst


class Stream:
    """A stream of the devices: every operator has finished when it returns, so there is
    nothing to wait for."""

    def __init__(self, device=None, priority: int = 0):
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event or Event()


class Event:
    def record(self, stream=None):
        return self

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_STREAM = Stream()


class BackendModule:
    """What torch asks of a device's module (`torch.fakegpu`)."""

    Stream, Event = Stream, Event

    @staticmethod
    def current_stream(device=None) -> Stream:
        return _STREAM

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device=None) -> None:
        pass

    @staticmethod
    def is_available() -> bool:
        return _devices > 0

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return _devices

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass

    @staticmethod
    def get_amp_supported_dtype():
        return [torch.bfloat16, torch.float16]


class Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return _devices > 0

    def has_primary_context(self, device_index) -> bool:
        return True

    def is_built(self) -> bool:
        return True


_library = None


def register() -> None:
    """Make `fakegpu` a backend of this process (for good: torch cannot remove one; it is
    available only inside fake_accelerator())."""
    global _library
    if _library is not None:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(rename=NAME, backend_module=BackendModule(), hook=Hooks())
    _library = torch.library.Library("aten", "IMPL")
    _library.impl("empty.memory_format", _empty, "PrivateUse1")
    _library.impl("empty_strided", _empty_strided, "PrivateUse1")
    _library.impl("_copy_from", _copy_from, "PrivateUse1")


_Generator = torch.Generator


class _GeneratorType(type):
    def __instancecheck__(cls, value):
        return isinstance(value, _Generator)


class Generator(metaclass=_GeneratorType):
    """torch.Generator while the fake devices are there: a DeviceGenerator for `fakegpu:k`."""

    def __new__(cls, device="cpu"):
        where = _device_of(device)
        return DeviceGenerator(int(where.split(":")[1])) if where.startswith(NAME) else _Generator(device=device)


@contextlib.contextmanager
def fake_accelerator(devices: int = 1):
    """`devices` fake GPUs as the machine's accelerators; yields the compute counter, cleared."""
    global _devices
    register()
    compute_ops.clear()
    torch.Generator, _devices = Generator, devices
    try:
        yield compute_ops
    finally:
        torch.Generator, _devices = _Generator, 0


def ran_on(ops: Counter) -> set[str]:
    """The devices that ran any matrix product, convolution or attention."""
    return {device for (device, _), calls in ops.items() if calls}


def main(argv: list[str]) -> None:
    """`python tests/fake_accelerator.py MODULE:FUNCTION JSON`: the function called with the JSON
    list's arguments on one fake GPU (a training step in a process of its own, whose autograd
    engine starts with the device registered); prints the operators each device computed,
    `compute ops: {"DEVICE OP": calls}`, then the devices that computed, as JSON, on its last line."""
    import importlib
    import json

    module, function = argv[0].split(":")
    with fake_accelerator() as ops:
        getattr(importlib.import_module(module), function)(*json.loads(argv[1]))
    print("compute ops:", json.dumps({f"{device} {op}": calls for (device, op), calls in ops.items()}), flush=True)
    print(json.dumps(sorted(ran_on(ops))), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
