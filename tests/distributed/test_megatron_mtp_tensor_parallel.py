"""Tensor parallel: the vocab-parallel head and the column-parallel eh_proj give tp=1's losses and gradients.

Megatron's CPU initialisation draws each full ("master") weight with the same RNG sequence and keeps
this rank's slice, so a tp=2 model holds exactly the tp=1 weights, split. Every parameter's gradient is
compared (embedding, output head, trunk and MTP depths): a TP-split one is concatenated along the
`partition_dim` Megatron records on it, after checking that the concatenated weights are the tp=1
weights (so the concatenation is the right layout, qkv and fc1 included).
"""

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]


# (loss_chunk_tokens, tied head, sequence parallel at tp=2) by test id.
CASES = {
    "plain-untied": (0, False, False),
    "chunked-tied": (6, True, False),
    "chunked-sequence-parallel": (6, False, True),
}


def _tp_worker(cases: dict[str, tuple[int, bool, bool]]) -> dict[str, dict]:
    """Every case in one launch (process start-up and Megatron's import dominate a case's time), each from
    the RNG state a fresh process starts with, so the tp=1 and tp=2 launches draw the same master weights."""
    from megatron_cpu import seed_megatron

    out = {}
    for name, case in cases.items():
        seed_megatron(1234)
        out[name] = _tp_case(*case)
    return out


def _tp_case(chunk_tokens: int, tied: bool, sequence_parallel: bool):
    from megatron.core import parallel_state as ps
    from megatron_cpu import TinyGPT, build_tiny_plugin_gpt, make_microbatches, plugin_forward_backward

    from mtp_plugin.megatron import MTPMetrics

    shape = TinyGPT(num_layers=2, mtp_num_layers=2, share_embeddings_and_output_weights=tied)
    tp = ps.get_tensor_model_parallel_world_size()
    model = build_tiny_plugin_gpt(
        shape, loss_chunk_tokens=chunk_tokens, sequence_parallel=sequence_parallel and tp > 1
    )
    metrics = MTPMetrics(2)
    losses = plugin_forward_backward(
        model, make_microbatches(shape, 2, 2, seed=5, mask_tail=2), lam=0.3, metrics=metrics
    )
    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "losses": losses,
        "metrics": metrics.reduce(),
        "params": {
            n: {
                "weight": p.detach().clone(),
                "grad": None if p.grad is None else p.grad.clone(),
                # Megatron's own marks: which dim a TP-split weight is split on; which replicated
                # weights see only this rank's slice of the sequence under sequence parallel.
                "partition_dim": p.partition_dim if getattr(p, "tensor_model_parallel", False) else None,
                "sequence_parallel": bool(getattr(p, "sequence_parallel", False)),
            }
            for n, p in model.named_parameters()
        },
    }


@pytest.fixture(scope="module")
def runs() -> tuple[dict, list[dict]]:
    """(tp=1 results by case, each tp=2 rank's results by case): one launch per tensor-parallel size."""
    tp1_cases = {name: (chunk, tied, False) for name, (chunk, tied, _) in CASES.items()}
    (ref,) = run_distributed(_tp_worker, 1, tp1_cases, parallel=dict(), timeout=360)
    tp = run_distributed(_tp_worker, 2, CASES, parallel=dict(tensor_model_parallel_size=2), timeout=360)
    return ref, tp


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(runs, case):
    sequence_parallel = CASES[case][2]
    ref, tp = runs[0][case], [rank[case] for rank in runs[1]]
    for rank in tp:
        assert rank["metrics"] == pytest.approx(ref["metrics"], rel=1e-5)
        for mb_ref, mb in zip(ref["losses"], rank["losses"]):
            for key in mb_ref:
                torch.testing.assert_close(mb[key], mb_ref[key], rtol=1e-5, atol=1e-6)
    assert all(p["grad"] is not None for p in ref["params"].values()), "tp=1: a parameter got no gradient"
    ranks = sorted(tp, key=lambda r: r["tp_rank"])
    for rank in ranks:
        assert set(rank["params"]) == set(ref["params"])
    for name, full in ref["params"].items():
        shards = [rank["params"][name] for rank in ranks]
        dim = shards[0]["partition_dim"]
        if dim is not None:  # split over TP (vocab-parallel embedding and head, column/row-parallel linears)
            torch.testing.assert_close(
                torch.cat([s["weight"] for s in shards], dim), full["weight"], msg=name
            )
            grad = torch.cat([s["grad"] for s in shards], dim)
        elif shards[0]["sequence_parallel"] and sequence_parallel:
            # each rank normalised its own slice of the sequence: the partial gradients add up
            # (finalize_model_grads sums them for params marked sequence_parallel)
            grad = sum(s["grad"] for s in shards)
        else:  # replicated: every rank holds the whole gradient
            for shard in shards[1:]:
                torch.testing.assert_close(shard["grad"], shards[0]["grad"], rtol=1e-5, atol=1e-7, msg=name)
            grad = shards[0]["grad"]
        torch.testing.assert_close(grad, full["grad"], rtol=1e-4, atol=1e-6, msg=name)
