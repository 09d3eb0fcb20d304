"""Run Megatron-Core on a machine without CUDA (the CPU demo and CPU smoke runs).

Megatron-Core reaches for CUDA in a few places a CPU run passes through: `torch.cuda.current_device()`
as a `device=` (memory buffer, RoPE, DDP grad buffers), `torch.cuda.current_stream()` before a DDP
gradient reduction (0.19), `torch.zeros(..., device="cuda")` in the pipeline schedules and the FP32
optimizer, `weight.data.cuda()` for the pipeline-tied embedding. `enable_megatron_on_cpu()` answers
those at the torch level only (it touches no Megatron module): CUDA device queries return the CPU, and
a TorchFunctionMode maps `device="cuda"` / `.cuda()` to the CPU. The training entry point calls it only
when `torch.cuda.is_available()` is false, so a GPU run never sees it. It is process-wide.

The alltoall token dispatcher needs a CUDA stream for its split sizes, so CPU runs use the allgather
dispatcher (`check_cpu_run` says so before anything is built; the app and the Trainer call it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_MODE: TorchFunctionMode | None = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpuMode(TorchFunctionMode):
    """`device="cuda"` becomes CPU and `.cuda()` / `.to("cuda")` return the tensor unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuStream:
    """What `torch.cuda.current_stream()` returns on CPU: CPU ops are synchronous, waiting is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def check_cpu_run(model_cfg) -> None:
    """Reject, before any work, what cannot run on CPU."""
    if model_cfg.is_moe and model_cfg.moe_token_dispatcher_type == "alltoall":
        raise ValueError(
            "model.moe_token_dispatcher_type=alltoall needs CUDA streams; use "
            "model.moe_token_dispatcher_type=allgather on CPU"
        )


def enable_megatron_on_cpu() -> None:
    """Make this process's Megatron-Core run on CPU (idempotent). Call before building a model."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_megatron_on_cpu() is for machines without CUDA; this one has a GPU")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: CpuStream()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
