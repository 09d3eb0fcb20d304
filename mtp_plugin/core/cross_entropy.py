"""Linear + cross-entropy over an output head, plain and chunked.

Megatron's native MTP materialises every depth's full [tokens x vocab] logits and keeps them alive until
backward (+4 GiB per depth at a 50k vocabulary on the DESIGN.md §6 benchmark shape). The chunked path
here never holds more than one [chunk x vocab] block: while it runs the forward it also computes the
gradients of the summed loss with respect to the hidden states and the head weight, so backward is a
scalar multiply. This is the "fused linear cross-entropy" trick (as in Liger-Kernel / Apple's CCE), written
for a possibly vocab-parallel head: with `tp_group` the head weight is this rank's vocabulary shard
starting at `vocab_start`, and max / sum-exp / target-logit are all-reduced over the group (the way
Megatron's `vocab_parallel_cross_entropy` does it). The caller is responsible for the input-side
communication of a tensor-parallel head (Megatron's copy-to / gather-from-sequence-parallel region),
whose backward all-reduces the hidden-state gradient.

Conventions shared by both paths (so that they agree on every input):
- dtypes: the head matmul runs in the hidden states' dtype, the weight cast to it differentiably (its
  gradient comes back in its own dtype), as Megatron's output layer runs in the activations' dtype;
  softmax, loss and the weight-gradient accumulator are at least fp32.
- labels: every counted (mask = 1) label must lie in [0, V), V the whole vocabulary (this shard's rows
  x the tensor-parallel size); anything else raises ValueError naming the value. Positions with mask = 0
  may hold any value (an ignore index, a fill id): they are never looked up.
- acceptance is argmax semantics: a target is a top-1 hit when it is the first index attaining the
  maximum logit, as `torch.argmax` picks it (under vocab parallelism, the global first argmax), so a
  tie counts only for the lowest index and all-equal logits give acceptance ~1/V, not 1.

Shapes: n = tokens (any leading dims flattened), h = hidden, v = this rank's vocabulary (shard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Default chunk for the MTP depths' head + CE: a [4096 x V] fp32 block is 0.8 GiB at V = 50k and 2.1 GiB at
# DeepSeek-V3's 129k, against ~4 GiB of full logits kept per depth at the DESIGN.md §6 benchmark shape; at
# 4096 the chunked path matched native MTP's peak memory there (BENCHMARKS.md, run 2). 0 = full logits.
DEFAULT_LOSS_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class CrossEntropyStats:
    """Summed CE (differentiable), number of valid targets and of top-1 hits among them.

    hits_n: per target (flattened in the inputs' order), whether it is a counted top-1 hit: the
    per-position correctness a chained acceptance needs (`mtp_plugin.core.loss.depth_count_rows`).
    """

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor
    hits_n: torch.Tensor | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reductions over the vocabulary run in at least fp32 (bf16 logsumexp over 50k entries is too coarse).
    return torch.promote_types(dtype, torch.float32)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Sum over the tensor-parallel group; backward passes the gradient through unchanged.

    Every rank of the group computes the same loss from the reduced value, so each rank's partial sum
    receives the same upstream gradient (torch.distributed.nn's all_reduce would sum those copies).
    """

    @staticmethod
    def forward(ctx, t, group):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _flatten(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    if hidden.shape[:-1] != targets.shape or targets.shape != mask.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be targets.shape + (hidden,), targets {tuple(targets.shape)} "
            f"and mask {tuple(mask.shape)} must match; transpose labels to the hidden states' layout"
        )
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), mask.reshape(-1).bool()


def check_labels(t_n: torch.Tensor, m_n: torch.Tensor, num_vocab: int) -> None:
    """ValueError naming the first counted label outside [0, num_vocab).

    One reduction and one host read per call (not per chunk): the only host synchronisation of the
    loss. A caller scoring several heads of one batch checks once (`check=False` on the others); every
    tensor-parallel rank holds the same labels, so all ranks raise together before any collective.
    """
    bad_n = m_n & ((t_n < 0) | (t_n >= num_vocab))
    if bool(bad_n.any()):
        values = t_n[bad_n]
        raise ValueError(
            f"label {int(values[0])} at a counted position is outside the vocabulary [0, {num_vocab}) "
            f"({values.numel()} such labels); the data holds token ids the model's vocabulary does not: "
            "build the model with the tokenizer's vocabulary size, or set the loss mask to 0 where a label "
            "is an ignore index"
        )


def _num_vocab(weight_vh: torch.Tensor, tp_group) -> int:
    # Megatron pads the vocabulary so that every tensor-parallel rank holds an equal shard.
    return weight_vh.shape[0] * (dist.get_world_size(tp_group) if tp_group is not None else 1)


def _top1_hits(
    target_logit_n: torch.Tensor, max_n: torch.Tensor, num_earlier_maxima_n: torch.Tensor, m_n: torch.Tensor
) -> torch.Tensor:
    """First-argmax hits: the target attains the (global) max and no lower index does."""
    return (target_logit_n == max_n) & (num_earlier_maxima_n == 0) & m_n


def _earlier_maximum(
    local_max_n: torch.Tensor, local_argmax_n: torch.Tensor, max_n: torch.Tensor, local_t_n: torch.Tensor
) -> torch.Tensor:
    """1 where this shard holds an index below the target that attains the global max, else 0.

    `local_argmax_n` is the shard's first maximum (torch.max's documented tie rule): if any index of the
    shard below the target attains the max, the first one does. A shard before the target's has
    local_t_n >= its size (all its indices are below); a shard after it has local_t_n < 0 (none are).
    """
    return ((local_max_n == max_n) & (local_argmax_n < local_t_n)).to(max_n.dtype)


def linear_cross_entropy_plain(
    hidden: torch.Tensor,
    weight_vh: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group=None,
    check: bool = True,
) -> CrossEntropyStats:
    """Reference path: full logits, autograd through everything (conventions: module docstring)."""
    h_nh, t_n, m_n = _flatten(hidden, targets, mask)
    if check:
        check_labels(t_n, m_n, _num_vocab(weight_vh, tp_group))
    logits_nv = torch.nn.functional.linear(h_nh, weight_vh.to(h_nh.dtype)).to(_compute_dtype(h_nh.dtype))
    local_t_n = t_n - vocab_start
    in_shard_n = (local_t_n >= 0) & (local_t_n < weight_vh.shape[0])
    # Masked rows may hold any label: clamp so that the gather stays in bounds (their loss is zeroed).
    picked_n = logits_nv.gather(1, local_t_n.clamp(0, logits_nv.shape[1] - 1)[:, None])[:, 0]
    local_max_n, local_argmax_n = logits_nv.detach().max(dim=-1)
    if tp_group is None:
        lse_n = torch.logsumexp(logits_nv, dim=-1)
        target_logit_n = picked_n
        max_n = local_max_n
        earlier_n = _earlier_maximum(local_max_n, local_argmax_n, max_n, local_t_n)
    else:
        max_n = _all_reduce(local_max_n.clone(), dist.ReduceOp.MAX, tp_group)
        earlier_n = _earlier_maximum(local_max_n, local_argmax_n, max_n, local_t_n)
        partial_3n = torch.stack(
            [torch.exp(logits_nv - max_n[:, None]).sum(-1), picked_n * in_shard_n, earlier_n]
        )
        sumexp_n, target_logit_n, earlier_n = _AllReduceSum.apply(partial_3n, tp_group)
        lse_n = torch.log(sumexp_n) + max_n
    loss_n = (lse_n - target_logit_n) * m_n
    correct_n = _top1_hits(target_logit_n.detach(), max_n, earlier_n.detach(), m_n)
    return CrossEntropyStats(loss_n.sum(), m_n.sum(), correct_n.sum(), correct_n)


def _accumulate_head_grads(dlogits_cv, h_ch, w_vh, grad_h_nh, grad_w_vh, start, stop) -> None:
    """The chunk's d(loss)/d(hidden) rows and its share of d(loss)/d(weight) (fp32 accumulator)."""
    if grad_h_nh is not None:
        grad_h_nh[start:stop] = dlogits_cv @ w_vh
    if grad_w_vh is not None:
        if dlogits_cv.dtype == grad_w_vh.dtype:
            grad_w_vh.addmm_(dlogits_cv.t(), h_ch)
        elif grad_w_vh.is_cuda:
            # cuBLAS accumulates the bf16 product into the fp32 buffer: no [v x h] bf16 temporary.
            torch.addmm(grad_w_vh, dlogits_cv.t(), h_ch, out_dtype=grad_w_vh.dtype, out=grad_w_vh)
        else:
            grad_w_vh += dlogits_cv.t() @ h_ch


def _fused_chunk(fused, logits_cv, t_c, mask_c, vocab_start, tp_group):
    """One chunk with the Triton kernels: (loss sum, top-1 hits, d(loss)/d(logits) written over the logits).

    The same statistics as the torch path, reduced the same way over the tensor-parallel group; Σ exp is
    taken against each shard's own maximum and rescaled to the global one before the sum.
    """
    num_vocab_local = logits_cv.shape[1]
    local_t_c = t_c - vocab_start
    in_shard_c = (local_t_c >= 0) & (local_t_c < num_vocab_local)
    safe_t_c = local_t_c.clamp(0, num_vocab_local - 1)
    local_max_c, local_argmax_c, local_sumexp_c = fused.row_stats(logits_cv)
    target_logit_c = logits_cv.gather(1, safe_t_c[:, None])[:, 0].float() * in_shard_c
    if tp_group is None:
        max_c, sumexp_c = local_max_c, local_sumexp_c
        earlier_c = _earlier_maximum(local_max_c, local_argmax_c, max_c, local_t_c)
    else:
        max_c = _all_reduce(local_max_c.clone(), dist.ReduceOp.MAX, tp_group)
        earlier_c = _earlier_maximum(local_max_c, local_argmax_c, max_c, local_t_c)
        partial_3c = torch.stack([local_sumexp_c * torch.exp(local_max_c - max_c), target_logit_c, earlier_c])
        sumexp_c, target_logit_c, earlier_c = _all_reduce(partial_3c, dist.ReduceOp.SUM, tp_group)
    lse_c = torch.log(sumexp_c) + max_c
    weight_c = mask_c.float()
    loss_c = ((lse_c - target_logit_c) * weight_c).sum()
    correct_c = _top1_hits(target_logit_c, max_c, earlier_c, mask_c)
    onehot_col_c = torch.where(in_shard_c, local_t_c, -1)
    return loss_c, correct_c, fused.softmax_grad_(logits_cv, lse_c, weight_c, onehot_col_c)


LOSS_KERNELS = ("auto", "torch", "triton")


def _fused_kernels(kernel: str, device: torch.device):
    """The Triton module for `kernel` on `device`, or None for the torch ops (module docstring)."""
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"loss kernel must be one of {LOSS_KERNELS}, got {kernel!r}")
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"loss kernel 'triton' needs CUDA tensors, got {device}; use 'auto' or 'torch'")
    try:
        from mtp_plugin.core import fused_ce_triton
    except ImportError as err:
        raise ImportError(
            f"the fused CUDA loss needs Triton ({err}); install triton or set mtp.loss_kernel=torch"
        ) from err
    return fused_ce_triton


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_nh, weight_vh, t_n, m_n, chunk_tokens, vocab_start, tp_group, fused):
        # The head matmuls run in the activations' dtype (bf16 tensor cores on GPU), as the output
        # layer does; softmax, loss and the weight-gradient accumulator are at least fp32.
        # `fused`: the Triton kernels' module (CUDA), or None for the torch ops below.
        cdtype = _compute_dtype(h_nh.dtype)
        num_vocab_local = weight_vh.shape[0]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w_vh = weight_vh.to(h_nh.dtype)
        grad_h_nh = torch.empty_like(h_nh) if ctx.needs_input_grad[0] else None
        grad_w_vh = (
            torch.zeros(weight_vh.shape, dtype=cdtype, device=weight_vh.device)
            if ctx.needs_input_grad[1]
            else None
        )
        loss_sum = torch.zeros((), dtype=cdtype, device=h_nh.device)
        hits_n = torch.zeros(h_nh.shape[0], dtype=torch.bool, device=h_nh.device)
        for start in range(0, h_nh.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, h_nh.shape[0])
            h_ch = h_nh[start:stop]
            if fused is not None:
                loss_c, correct_c, dlogits_cv = _fused_chunk(
                    fused, h_ch @ w_vh.t(), t_n[start:stop], m_n[start:stop], vocab_start, tp_group
                )
                loss_sum += loss_c
                hits_n[start:stop] = correct_c
                if needs_grad:
                    _accumulate_head_grads(dlogits_cv, h_ch, w_vh, grad_h_nh, grad_w_vh, start, stop)
                # Free this chunk's [chunk x vocab] block before the next chunk's GEMM allocates its own.
                del dlogits_cv
                continue
            logits_cv = (h_ch @ w_vh.t()).to(cdtype)
            local_t_c = t_n[start:stop] - vocab_start
            in_shard_c = (local_t_c >= 0) & (local_t_c < num_vocab_local)
            safe_t_c = local_t_c.clamp(0, num_vocab_local - 1)
            target_logit_c = logits_cv.gather(1, safe_t_c[:, None])[:, 0] * in_shard_c
            local_max_c, local_argmax_c = logits_cv.max(dim=-1)
            max_c = _all_reduce(local_max_c.clone(), dist.ReduceOp.MAX, tp_group)
            earlier_c = _earlier_maximum(local_max_c, local_argmax_c, max_c, local_t_c)
            # In place: the chunk's logits become exp(logits - max), then the softmax, then d(loss)/d(logits).
            exp_cv = logits_cv.sub_(max_c[:, None]).exp_()
            # One sum-reduction for the three per-row partials (sum-exp, target logit, earlier maxima).
            partial_3c = torch.stack([exp_cv.sum(-1), target_logit_c, earlier_c])
            sumexp_c, target_logit_c, earlier_c = _all_reduce(partial_3c, dist.ReduceOp.SUM, tp_group)
            mask_c = m_n[start:stop]
            loss_sum += ((torch.log(sumexp_c) + max_c - target_logit_c) * mask_c).sum()
            hits_n[start:stop] = _top1_hits(target_logit_c, max_c, earlier_c, mask_c)
            if needs_grad:
                # d(sum CE)/d logits = softmax - onehot(target), zero on masked rows.
                dlogits_cv = exp_cv.div_(sumexp_c[:, None])
                rows = torch.nonzero(in_shard_c, as_tuple=True)[0]
                dlogits_cv[rows, safe_t_c[rows]] -= 1.0
                dlogits_cv.mul_(mask_c[:, None])
                _accumulate_head_grads(
                    dlogits_cv.to(h_nh.dtype), h_ch, w_vh, grad_h_nh, grad_w_vh, start, stop
                )
            # logits_cv, exp_cv and dlogits_cv name one buffer: free it before the next chunk's GEMM.
            logits_cv = exp_cv = dlogits_cv = None
        ctx.save_for_backward(grad_h_nh, grad_w_vh)
        ctx.has_grads = (grad_h_nh is not None, grad_w_vh is not None)
        ctx.weight_dtype = weight_vh.dtype
        num_tokens = m_n.sum()
        num_correct = hits_n.sum()
        ctx.mark_non_differentiable(num_tokens, num_correct, hits_n)
        return loss_sum, num_tokens, num_correct, hits_n

    @staticmethod
    def backward(ctx, grad_loss, _grad_num_tokens, _grad_num_correct, _grad_hits):
        grad_h_nh, grad_w_vh = ctx.saved_tensors
        has_h, has_w = ctx.has_grads
        grad_h = grad_h_nh * grad_loss.to(grad_h_nh.dtype) if has_h else None
        grad_w = (grad_w_vh * grad_loss).to(ctx.weight_dtype) if has_w else None
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight_vh: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_tokens: int = 0,
    vocab_start: int = 0,
    tp_group=None,
    kernel: str = "auto",
    check: bool = True,
) -> CrossEntropyStats:
    """Σ CE(hidden @ weightᵀ, targets) over valid targets; `chunk_tokens > 0` takes the chunked path.

    Both paths follow the module docstring's conventions (dtypes, label range, argmax acceptance).
    `kernel` picks the chunked path's softmax work: "triton" (CUDA: in place on the head GEMM's output,
    fused_ce_triton.py), "torch" (any device: fp32 torch ops, the reference), "auto" (triton on CUDA).
    `check=False` skips the label-range check (one host sync) for a caller that ran `check_labels` on
    labels covering these.
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0 = plain path), got {chunk_tokens}")
    if chunk_tokens == 0:
        return linear_cross_entropy_plain(
            hidden, weight_vh, targets, mask, vocab_start=vocab_start, tp_group=tp_group, check=check
        )
    fused = _fused_kernels(kernel, hidden.device)
    h_nh, t_n, m_n = _flatten(hidden, targets, mask)
    if check:
        check_labels(t_n, m_n, _num_vocab(weight_vh, tp_group))
    loss_sum, num_tokens, num_correct, hits_n = _ChunkedLinearCrossEntropy.apply(
        h_nh, weight_vh, t_n, m_n, chunk_tokens, vocab_start, tp_group, fused
    )
    return CrossEntropyStats(loss_sum, num_tokens, num_correct, hits_n)


def _chunk_lse_and_target(fused, logits_cv, local_t_c, tp_group):
    """(log Σ exp, target logit) per row of a [chunk x vocab-shard] logits block, fp32, over the whole
    vocabulary (all-reduced over `tp_group`); a label outside this shard contributes target logit 0 here."""
    num_vocab_local = logits_cv.shape[1]
    in_shard_c = (local_t_c >= 0) & (local_t_c < num_vocab_local)
    safe_t_c = local_t_c.clamp(0, num_vocab_local - 1)
    target_logit_c = logits_cv.gather(1, safe_t_c[:, None])[:, 0].to(_compute_dtype(logits_cv.dtype))
    target_logit_c = target_logit_c * in_shard_c
    if fused is not None:
        local_max_c, _, local_sumexp_c = fused.row_stats(logits_cv)
    else:
        logits_f = logits_cv.to(_compute_dtype(logits_cv.dtype))
        local_max_c = logits_f.max(dim=-1).values
        local_sumexp_c = torch.exp(logits_f - local_max_c[:, None]).sum(-1)
    if tp_group is None:
        return torch.log(local_sumexp_c) + local_max_c, target_logit_c
    max_c = _all_reduce(local_max_c.clone(), dist.ReduceOp.MAX, tp_group)
    partial_2c = torch.stack([local_sumexp_c * torch.exp(local_max_c - max_c), target_logit_c])
    sumexp_c, target_logit_c = _all_reduce(partial_2c, dist.ReduceOp.SUM, tp_group)
    return torch.log(sumexp_c) + max_c, target_logit_c


class _ChunkedLinearCrossEntropyPerToken(torch.autograd.Function):
    """Per-token CE whose backward recomputes each chunk's logits (one more head GEMM than the summed
    path) so that it is exact for any upstream gradient: the caller's loss function weighs the tokens."""

    @staticmethod
    def forward(ctx, h_nh, weight_vh, t_n, chunk_tokens, vocab_start, tp_group, fused):
        w_vh = weight_vh.to(h_nh.dtype)
        lse_n = torch.empty(h_nh.shape[0], dtype=_compute_dtype(h_nh.dtype), device=h_nh.device)
        loss_n = torch.empty_like(lse_n)
        for start in range(0, h_nh.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, h_nh.shape[0])
            lse_c, target_logit_c = _chunk_lse_and_target(
                fused, h_nh[start:stop] @ w_vh.t(), t_n[start:stop] - vocab_start, tp_group
            )
            lse_n[start:stop] = lse_c
            loss_n[start:stop] = lse_c - target_logit_c
        ctx.save_for_backward(h_nh, weight_vh, t_n, lse_n)
        ctx.chunk_tokens, ctx.vocab_start, ctx.fused = chunk_tokens, vocab_start, fused
        return loss_n

    @staticmethod
    def backward(ctx, grad_loss_n):
        h_nh, weight_vh, t_n, lse_n = ctx.saved_tensors
        w_vh = weight_vh.to(h_nh.dtype)
        num_vocab_local = w_vh.shape[0]
        grad_h_nh = torch.empty_like(h_nh) if ctx.needs_input_grad[0] else None
        grad_w_vh = (
            torch.zeros(weight_vh.shape, dtype=lse_n.dtype, device=weight_vh.device)
            if ctx.needs_input_grad[1]
            else None
        )
        grad_loss_n = grad_loss_n.to(lse_n.dtype)
        for start in range(0, h_nh.shape[0], ctx.chunk_tokens):
            stop = min(start + ctx.chunk_tokens, h_nh.shape[0])
            h_ch = h_nh[start:stop]
            logits_cv = h_ch @ w_vh.t()
            local_t_c = t_n[start:stop] - ctx.vocab_start
            onehot_col_c = torch.where((local_t_c >= 0) & (local_t_c < num_vocab_local), local_t_c, -1)
            if ctx.fused is not None:
                dlogits_cv = ctx.fused.softmax_grad_(
                    logits_cv, lse_n[start:stop], grad_loss_n[start:stop], onehot_col_c
                )
            else:
                # d CE_i / d logits_i = softmax_i - onehot(target_i), times the token's upstream gradient.
                dlogits_cv = torch.exp(logits_cv.to(lse_n.dtype) - lse_n[start:stop, None])
                rows = torch.nonzero(onehot_col_c >= 0, as_tuple=True)[0]
                dlogits_cv[rows, onehot_col_c[rows]] -= 1.0
                dlogits_cv = dlogits_cv.mul_(grad_loss_n[start:stop, None]).to(h_nh.dtype)
            _accumulate_head_grads(dlogits_cv, h_ch, w_vh, grad_h_nh, grad_w_vh, start, stop)
            logits_cv = dlogits_cv = None  # free this chunk's block before the next chunk's GEMM
        grad_w = None if grad_w_vh is None else grad_w_vh.to(weight_vh.dtype)
        return grad_h_nh, grad_w, None, None, None, None, None


def linear_cross_entropy_per_token(
    hidden: torch.Tensor,
    weight_vh: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_tokens: int,
    vocab_start: int = 0,
    tp_group=None,
    kernel: str = "auto",
) -> torch.Tensor:
    """CE(hidden @ weightᵀ, targets) per token, fp32, shaped like `targets`, never holding more than one
    [chunk x vocab] block: a main head's per-token loss, as Megatron's `compute_language_model_loss`
    returns it (every position, unmasked; a label outside the vocabulary gives log Σ exp, as there).

    Labels are not range-checked here: run `check_labels` on the counted ones first. The backward
    recomputes each chunk's logits, so any per-token weighting of the result is differentiated exactly.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0 for the per-token chunked loss, got {chunk_tokens}")
    fused = _fused_kernels(kernel, hidden.device)
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be targets.shape + (hidden,), targets {tuple(targets.shape)}; "
            "transpose labels to the hidden states' layout"
        )
    loss_n = _ChunkedLinearCrossEntropyPerToken.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight_vh,
        targets.reshape(-1),
        chunk_tokens,
        vocab_start,
        tp_group,
        fused,
    )
    return loss_n.view(targets.shape)
