"""Test-only checks that let a CPU run catch what only fails on a GPU run.

1. `CollectiveDeviceGuard`: every tensor handed to a torch.distributed collective must have had its
   device named: made with `device=` or moved with `.to(device)` / `.cuda()`. On a GPU run a tensor made
   without a device is a CPU tensor, and NCCL rejects it ("No backend type associated with device type
   cpu"); over gloo on CPU it passes silently. A TorchFunctionMode marks tensors made by a factory
   (`torch.tensor`, `torch.zeros`, ..., `torch.from_numpy`) without a device, and results computed only
   from marked tensors; a device move clears the mark; the patched collectives raise on a marked tensor.
   Limits: an explicit `.cpu()` / `.to("cpu")` counts as naming a device (on CPU it cannot be told apart
   from `.to(run_device)`), and the `*_object` collectives are not checked (they place tensors themselves).
2. `cuda_type_names`: Megatron's Float16 optimizer admits parameters by `param.type()` being
   'torch.cuda.BFloat16Tensor' / 'torch.cuda.FloatTensor'; under it, CPU tensors report those names, so
   the bf16 optimizer (and its checkpoint path) runs on CPU.

Both touch torch only, never Megatron, and only inside the `with` block.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_MARK = "_made_without_device_at"

# Factories whose result lands on the default device (the host) unless `device=` is given.
_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.from_numpy,
    torch.frombuffer,
}

# Collectives that take tensors (the *_object ones are excluded: they move tensors themselves).
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)


def _origin(t) -> str | None:
    return getattr(t, _MARK, None) if isinstance(t, torch.Tensor) else None


def _caller() -> str:
    """file:line of the first frame outside torch and this module (where the tensor was made)."""
    frame = sys._getframe(2)
    while frame is not None and (
        "/torch/" in frame.f_code.co_filename or frame.f_code.co_filename == __file__
    ):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


def _names_device(func, args, kwargs) -> bool:
    if kwargs.get("device") is not None or func is torch.Tensor.cuda:
        return True
    if func is torch.Tensor.to:
        # .to(device), .to("cuda"), .to(other_tensor): a device is named; .to(dtype) alone is not.
        return any(isinstance(a, str | torch.device | int) and not isinstance(a, bool) for a in args[1:])
    return False


class _DeviceNamingMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") or name.startswith("__i") or name == "__set__":
            return out  # in place: the tensor keeps its device, whatever the other operand
        if func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor):
            origin = None if kwargs.get("device") is not None else _origin(args[0])
        elif func in _FACTORIES:
            origin = None if kwargs.get("device") is not None else _caller()
        elif _names_device(func, args, kwargs):
            origin = None
        else:
            # A result made only from unnamed tensors stays where they are; one named input decides.
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            origins = [_origin(t) for t in inputs]
            origin = origins[0] if inputs and all(origins) else None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if origin is None:
                    if hasattr(t, _MARK):
                        delattr(t, _MARK)
                else:
                    setattr(t, _MARK, origin)
        return out


class DeviceNotNamedError(AssertionError):
    """A collective received a tensor that a GPU run would hold on the host."""


class CollectiveDeviceGuard:
    """`with CollectiveDeviceGuard() as guard:` checks every collective in the block; `guard.calls`
    counts the checked calls by name (so a test can show the check was not vacuous)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._stack = contextlib.ExitStack()

    def _wrap(self, name: str, real):
        def checked(*args, **kwargs):
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            for t in tensors:
                origin = _origin(t)
                if origin is not None:
                    raise DeviceNotNamedError(
                        f"torch.distributed.{name} got a tensor made without a device at {origin}; on a GPU "
                        "run it is a CPU tensor and NCCL rejects it: create it with device=<the run's device>"
                    )
            self.calls[name] = self.calls.get(name, 0) + 1
            return real(*args, **kwargs)

        return checked

    def _wrap_batch(self, real):
        def checked(p2p_ops):
            for op in p2p_ops:
                origin = _origin(op.tensor)
                if origin is not None:
                    raise DeviceNotNamedError(
                        f"torch.distributed.batch_isend_irecv got a tensor made without a device at {origin}"
                    )
            self.calls["batch_isend_irecv"] = self.calls.get("batch_isend_irecv", 0) + 1
            return real(p2p_ops)

        return checked

    def __enter__(self) -> CollectiveDeviceGuard:
        for name in _COLLECTIVES:
            real = getattr(dist, name)
            self._stack.callback(setattr, dist, name, real)
            setattr(dist, name, self._wrap(name, real))
        real_batch = dist.batch_isend_irecv
        self._stack.callback(setattr, dist, "batch_isend_irecv", real_batch)
        dist.batch_isend_irecv = self._wrap_batch(real_batch)
        self._stack.enter_context(_DeviceNamingMode())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class _CudaTypeNames(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out.startswith("torch."):
            return out if out.startswith("torch.cuda.") else "torch.cuda." + out[len("torch.") :]
        return out


@contextlib.contextmanager
def cuda_type_names():
    """CPU tensors report CUDA type names from `Tensor.type()` (see the module docstring)."""
    with _CudaTypeNames():
        yield
