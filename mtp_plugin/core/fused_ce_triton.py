"""Triton kernels for the chunked linear + cross-entropy on CUDA: the softmax work on a bf16 logits chunk.

The chunked path's torch version spends ~10 elementwise passes over an fp32 copy of each [chunk x vocab]
block (cast, max, subtract, exp, sum, divide, one-hot subtract, mask, cast back). Here the head GEMM's
bf16 output is read twice and overwritten once, in place, with d(loss)/d(logits):

- `row_stats`: per row, the maximum, its first index (torch.argmax's tie rule) and Σ exp(x - max), in
  fp32, one online pass over the row;
- `softmax_grad_`: per row, (exp(x - lse) - onehot(target)) * weight, written over the logits.

Between the two the caller all-reduces the statistics over the tensor-parallel group (vocab-parallel
head), exactly as the torch path does, so both paths share every convention (cross_entropy.py).
This module imports Triton; cross_entropy.py imports it only for CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 4096 bf16 columns per step: 8 KiB per row block, enough loads in flight to stream at memory speed
# with 8 warps; a row of a 50k vocabulary is 13 steps.
_BLOCK_COLS = 4096
_NUM_WARPS = 8


@triton.jit
def _row_stats_kernel(
    logits_ptr,
    stride_row,
    num_cols,
    max_ptr,
    argmax_ptr,
    sumexp_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    run_max = float("-inf")
    run_arg = 0
    run_sum = 0.0
    for start in tl.range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < num_cols, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_arg = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int32) + start
        new_max = tl.maximum(run_max, block_max)
        # Strictly greater: an equal maximum in a later block keeps the earlier (first) index.
        run_arg = tl.where(block_max > run_max, block_arg, run_arg)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        run_max = new_max
    tl.store(max_ptr + row, run_max)
    tl.store(argmax_ptr + row, run_arg.to(tl.int64))
    tl.store(sumexp_ptr + row, run_sum)


@triton.jit
def _softmax_grad_kernel(
    logits_ptr,
    stride_row,
    num_cols,
    lse_ptr,
    weight_ptr,
    target_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    lse = tl.load(lse_ptr + row)
    weight = tl.load(weight_ptr + row)
    target = tl.load(target_ptr + row)  # this shard's column, or -1 when the target is elsewhere
    for start in tl.range(0, num_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < num_cols
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * weight
        tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def row_stats(logits_cv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max, first argmax, Σ exp(x - max)) per row of a [c, v] block; fp32 / int64 / fp32."""
    rows, cols = logits_cv.shape
    assert logits_cv.stride(1) == 1, "rows must be contiguous"
    max_c = torch.empty(rows, dtype=torch.float32, device=logits_cv.device)
    argmax_c = torch.empty(rows, dtype=torch.int64, device=logits_cv.device)
    sumexp_c = torch.empty(rows, dtype=torch.float32, device=logits_cv.device)
    if rows:
        _row_stats_kernel[(rows,)](
            logits_cv,
            logits_cv.stride(0),
            cols,
            max_c,
            argmax_c,
            sumexp_c,
            BLOCK=_BLOCK_COLS,
            num_warps=_NUM_WARPS,
        )
    return max_c, argmax_c, sumexp_c


def softmax_grad_(
    logits_cv: torch.Tensor, lse_c: torch.Tensor, weight_c: torch.Tensor, target_c: torch.Tensor
) -> torch.Tensor:
    """Overwrite the [c, v] logits with (softmax - onehot(target)) * weight (target -1: no one-hot here)."""
    rows, cols = logits_cv.shape
    assert logits_cv.stride(1) == 1, "rows must be contiguous"
    if rows:
        _softmax_grad_kernel[(rows,)](
            logits_cv,
            logits_cv.stride(0),
            cols,
            lse_c.float().contiguous(),
            weight_c.float().contiguous(),
            target_c.to(torch.int64).contiguous(),
            BLOCK=_BLOCK_COLS,
            num_warps=_NUM_WARPS,
        )
    return logits_cv
