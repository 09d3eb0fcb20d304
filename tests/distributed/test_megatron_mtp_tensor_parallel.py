"""Tensor parallel: the vocab-parallel head and the column-parallel eh_proj give tp=1's losses and gradients.

Megatron's CPU initialisation draws each full ("master") weight with the same RNG sequence and keeps
this rank's slice, so a tp=2 model holds exactly the tp=1 weights, split.
"""

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]


def _tp_worker(chunk_tokens: int, tied: bool, sequence_parallel: bool):
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
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("mtp_stack.")}
    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "losses": losses,
        "metrics": metrics.reduce(),
        "grads": grads,
    }


@pytest.mark.parametrize(
    ("chunk_tokens", "tied", "sequence_parallel"),
    [(0, False, False), (6, True, False), (6, False, True)],
    ids=["plain-untied", "chunked-tied", "chunked-sequence-parallel"],
)
def test_tp2_matches_tp1(chunk_tokens, tied, sequence_parallel):
    (ref,) = run_distributed(_tp_worker, 1, chunk_tokens, tied, False, parallel=dict(), timeout=180)
    tp = run_distributed(
        _tp_worker,
        2,
        chunk_tokens,
        tied,
        sequence_parallel,
        parallel=dict(tensor_model_parallel_size=2),
        timeout=180,
    )
    for rank in tp:
        assert rank["metrics"] == pytest.approx(ref["metrics"], rel=1e-5)
        for mb_ref, mb in zip(ref["losses"], rank["losses"]):
            for key in mb_ref:
                torch.testing.assert_close(mb[key], mb_ref[key], rtol=1e-5, atol=1e-6)
    for name, grad in ref["grads"].items():
        shards = [r["grads"][name] for r in sorted(tp, key=lambda r: r["tp_rank"])]
        if shards[0].shape == grad.shape:  # replicated over TP: norms
            if sequence_parallel:
                # each rank normalised its own slice of the sequence: the partial gradients add up
                # (finalize_model_grads sums them for params marked sequence_parallel)
                torch.testing.assert_close(sum(shards), grad, rtol=1e-4, atol=1e-6, msg=name)
            else:
                for shard in shards:
                    torch.testing.assert_close(shard, grad, rtol=1e-4, atol=1e-6, msg=name)
        else:  # column-parallel (eh_proj, qkv, fc1) split on dim 0, row-parallel on dim 1
            dim = 0 if shards[0].shape[0] != grad.shape[0] else 1
            if "linear_qkv" in name or "linear_fc1" in name:
                continue  # interleaved per-head / gate-up layouts: not a plain concatenation
            torch.testing.assert_close(torch.cat(shards, dim=dim), grad, rtol=1e-4, atol=1e-6, msg=name)
