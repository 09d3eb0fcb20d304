"""What λ·mean means across micro-batches and data-parallel ranks (DESIGN.md §2, docs/normalisation.md).

2 data-parallel ranks x 2 micro-batches over gloo, real Megatron-Core (schedule, DDP, finalize_model_grads),
very uneven loss masks and EOD tokens, so that every micro-batch and rank has different main and depth
target counts. The gradients after `finalize_model_grads` are compared with a float64 reference that
computes the intended loss of the whole global batch in one process, without Megatron's schedule:
- per-token mode with `global_target_counts`: for every depth k the depth-k gradient is that of
  λ·w_k·Σ CE_k / N_k over the global batch (Megatron-LM issue #7452 is the counter-example), and the main
  part is Σ CE_main / N_main;
- per-token mode without counts: depth k is divided by N_main (native Megatron 0.16's per-token rule);
- default mode: the mean over the 4 micro-batches of L_main + λ Σ_k w_k L_k with per-micro-batch means.
"""

from functools import partial

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

LAMBDA = 0.3
WEIGHTS = (0.7, 0.3)
SEQ, MICRO, EOD = 16, 2, 95
NUM_MICRO_PER_RANK = 2


def _global_batch():
    """4 micro-batches (rank r takes 2r, 2r+1): very uneven masks, EODs inside documents."""
    gen = torch.Generator().manual_seed(7)
    masks = torch.zeros(4, MICRO, SEQ)
    masks[0] = 1.0  # 32 main targets
    masks[1, 0, :6] = 1.0  # 6
    masks[2, 1, [0, 15]] = 1.0  # 2, at both ends of a window
    masks[3, :, ::2] = 1.0  # 16, every other position
    batches = []
    for m in range(4):
        tokens_b_s1 = torch.randint(0, EOD, (MICRO, SEQ + 1), generator=gen)
        if m in (0, 3):
            tokens_b_s1[0, 5] = EOD  # per-document targets: depth k cannot see past this
            tokens_b_s1[1, 9] = EOD
        batches.append(
            {
                "tokens": tokens_b_s1[:, :-1].contiguous(),
                "labels": tokens_b_s1[:, 1:].contiguous(),
                "loss_mask": masks[m],
                "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous(),
            }
        )
    return batches


def _explicit_counts(batches, num_depths):
    """N_main and N_k by the definition (DESIGN.md §2), with loops: depth k at position i needs i + k < S,
    mask[i + k] and no EOD among t_i .. t_(i+k)."""
    main = sum(int(b["loss_mask"].sum()) for b in batches)
    depth = []
    for k in range(1, num_depths + 1):
        n = 0
        for b in batches:
            for row in range(MICRO):
                for i in range(SEQ - k):
                    window = b["tokens"][row, i : i + k + 1].tolist()
                    n += int(b["loss_mask"][row, i + k] > 0 and EOD not in window)
        depth.append(n)
    return main, depth


def _reference_grads(model, batches, counts):
    """float64, one process: gradients of each part of the intended loss of the whole global batch.

    Every part runs its own forward: Megatron's vocab-parallel CE backward works in place on what it saved.
    """
    main_n, depth_n = counts
    params = dict(model.named_parameters())

    def parts():
        main_sum, depth_sums, per_micro = 0.0, [0.0, 0.0], []
        for b in batches:
            main_bs, sums_d, _ = model(
                b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"]
            )
            micro_main = (main_bs * b["loss_mask"].double()).sum()
            main_sum = main_sum + micro_main
            depth_sums = [depth_sums[k] + sums_d[k] for k in range(2)]
            # Default mode: this micro-batch's own means.
            n_depth = _explicit_counts([b], 2)[1]
            depth_means = [sums_d[k] / max(n_depth[k], 1) for k in range(2)]
            per_micro.append(
                micro_main / b["loss_mask"].sum() + LAMBDA * sum(w * m for w, m in zip(WEIGHTS, depth_means))
            )
        return main_sum, depth_sums, per_micro

    def grad(pick):
        values = torch.autograd.grad(pick(*parts()), list(params.values()), allow_unused=True)
        return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), values)}

    return {
        "main": grad(lambda main, depth, micro: main / main_n),
        "depth": [grad(lambda main, depth, micro, k=k: LAMBDA * depth[k] / depth_n[k]) for k in range(2)],
        "depth_over_main": [
            grad(lambda main, depth, micro, k=k: LAMBDA * depth[k] / main_n) for k in range(2)
        ],
        "default": grad(lambda main, depth, micro: sum(micro) / len(micro)),
    }


def _build(per_token: bool, chunk_tokens: int):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron_cpu import TinyGPT, build_tiny_plugin_gpt, seed_megatron

    seed_megatron(1234)  # both modes' models start from the same weights
    shape = TinyGPT(num_layers=2, mtp_num_layers=2, seq_length=SEQ, calculate_per_token_loss=per_token)
    model = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens)
    model.eod_id = EOD  # per-document depth targets, as build_mtp_gpt_model sets with mask_across_eod
    # The reference: a second build (it holds process groups, so no deepcopy) with the same weights.
    reference = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens)
    reference.load_state_dict(model.state_dict())
    reference.eod_id = EOD
    reference.double()
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )
    ddp.broadcast_params()
    model.config.no_sync_func = ddp.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return model, ddp, reference


def _step_grads(model, ddp, batches, **step_kwargs):
    """One step's gradients after Megatron's schedule and finalize_model_grads (DDP all-reduce, 1/N)."""
    from megatron_cpu import plugin_forward_backward

    ddp.zero_grad_buffer()
    plugin_forward_backward(ddp, batches, **step_kwargs)
    return {n: p.main_grad.detach().double().clone() for n, p in model.named_parameters()}


def _normalisation_worker():
    # Plain and chunked head + CE in one launch (process start-up dominates the test's time).
    return {chunk_tokens: _normalisation_run(chunk_tokens) for chunk_tokens in (0, 4096)}


def _normalisation_run(chunk_tokens: int):
    from megatron.core import parallel_state as ps

    from mtp_plugin.megatron import global_target_counts

    rank = ps.get_data_parallel_rank()
    batches = _global_batch()
    mine = batches[NUM_MICRO_PER_RANK * rank : NUM_MICRO_PER_RANK * (rank + 1)]
    counts = global_target_counts(mine, 2, ps.get_data_parallel_group(with_context_parallel=True), eod_id=EOD)
    out = {"counts": (counts.main_tokens.item(), counts.depth_tokens.tolist())}

    model, ddp, reference = _build(True, chunk_tokens)
    step = partial(_step_grads, model, ddp, mine, per_token_loss=True)
    main = step(lam=0.0, depth_weights=WEIGHTS, global_counts=counts)
    out["main"] = main
    out["depth"] = [
        {n: g - main[n] for n, g in step(lam=LAMBDA, depth_weights=w, global_counts=counts).items()}
        for w in ((1.0, 0.0), (0.0, 1.0))
    ]
    out["total"] = step(lam=LAMBDA, depth_weights=WEIGHTS, global_counts=counts)
    out["depth_without_counts"] = [
        {n: g - main[n] for n, g in step(lam=LAMBDA, depth_weights=w).items()}
        for w in ((1.0, 0.0), (0.0, 1.0))
    ]
    if rank == 0:
        out["reference"] = _reference_grads(reference, batches, _explicit_counts(batches, 2))

    model, ddp, _ = _build(False, chunk_tokens)
    out["default"] = _step_grads(model, ddp, mine, lam=LAMBDA, depth_weights=WEIGHTS)
    return out


def _assert_grads_close(actual, expected, what):
    assert set(actual) == set(expected), what
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 0, what
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: {name}")


def test_per_token_mode_normalises_each_depth_by_its_global_target_count():
    per_rank = run_distributed(_normalisation_worker, 2, parallel=dict(), timeout=120)
    for chunk_tokens in (0, 4096):
        _check([out[chunk_tokens] for out in per_rank], f"chunk_tokens={chunk_tokens}")


def _check(results, mode):
    main_n, depth_n = _explicit_counts(_global_batch(), 2)
    # The masks are as uneven as intended: every depth's count differs from the main count.
    assert main_n == 56 and all(n < main_n for n in depth_n) and depth_n[0] != depth_n[1]
    ref = results[0]["reference"]
    for rank, out in enumerate(results):
        assert out["counts"] == (float(main_n), [float(n) for n in depth_n]), rank
        _assert_grads_close(out["main"], ref["main"], f"{mode} rank {rank} main part")
        for k in range(2):
            # λ·Σ CE_k / N_k for the one-hot weight w_k = 1: depth k's own global count.
            _assert_grads_close(out["depth"][k], ref["depth"][k], f"{mode} rank {rank} depth {k + 1}")
            _assert_grads_close(
                out["depth_without_counts"][k],
                ref["depth_over_main"][k],
                f"{mode} rank {rank} depth {k + 1}, no counts",
            )
        total = {
            n: ref["main"][n] + sum(WEIGHTS[k] * ref["depth"][k][n] for k in range(2)) for n in ref["main"]
        }
        _assert_grads_close(out["total"], total, f"{mode} rank {rank} total")
        _assert_grads_close(out["default"], ref["default"], f"{mode} rank {rank} default mode")
    # Without the counts depth k is scaled by N_k / N_main (here 44/56 and 39/56): what the counts fix.
    name = "mtp_stack.depths.1.eh_proj.linear.weight"
    ratio = results[0]["depth_without_counts"][1][name].norm() / results[0]["depth"][1][name].norm()
    assert ratio.item() == pytest.approx(depth_n[1] / main_n, rel=1e-4)
