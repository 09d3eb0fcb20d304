"""Run Megatron-Core on a machine without CUDA (the CPU demo and CPU smoke runs).

Megatron-Core hard-codes CUDA in a few places that a CPU run reaches: `torch.cuda.current_device()`
as a `device=` (memory buffer, RoPE, DDP grad buffers), `torch.zeros(..., device="cuda")` in the
pipeline schedules and the FP32 optimizer, `weight.data.cuda()` for the pipeline-tied embedding, and
(0.16.1 without TransformerEngine) a missing `te_general_gemm` name. `enable_megatron_on_cpu()` maps
those to CPU. The training entry point calls it only when `torch.cuda.is_available()` is false; a GPU
run never touches Megatron or torch. It is process-wide and cannot be undone (a CPU process has no
CUDA to go back to).
"""

from __future__ import annotations

import importlib
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


def _alltoall_dtoh_cpu(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    # Upstream copies the all-to-all split sizes to host on a side CUDA stream and converts them to
    # numpy; on CPU only the conversion is left.
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.cpu().numpy())
    return tokens_per_expert


class _NoStream:
    """Placeholder for the alltoall dispatcher's `torch.cuda.Stream` (never used on CPU)."""


def enable_megatron_on_cpu() -> None:
    """Make this process's Megatron-Core run on CPU (idempotent). Call before building a model."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_megatron_on_cpu() is for machines without CUDA; this one has a GPU")
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None

    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    dispatcher = importlib.import_module(
        "megatron.core.transformer.moe.token_dispatcher"
    ).MoEAlltoAllTokenDispatcher
    if getattr(dispatcher, "cuda_dtoh_stream", None) is None:
        dispatcher.cuda_dtoh_stream = _NoStream()
    dispatcher._maybe_dtoh_and_synchronize = _alltoall_dtoh_cpu

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
