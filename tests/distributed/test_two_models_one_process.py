"""Two plugin models with different depths in one process compute exactly what each computes alone.

Megatron's native MTP keeps its per-depth losses in a process-global tracker (a second model with
another depth fails or mixes them); the plugin's losses and metrics are objects the caller owns. Rank 0
trains an MoE model with D = 1, then D = 3, then D = 2 in one process; ranks 1 and 2 train the D = 3
and D = 2 models each in a fresh process of its own. Same seeds, same data: the metrics and every
gradient must be bit-identical, so anything one model leaves behind for the next (a shared tracker, a
cached target or mask, an accumulated metric) fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

IN_ONE_PROCESS = (1, 3, 2)  # rank 0, in this order
ALONE = {1: 3, 2: 2}  # rank -> the depth it trains alone


def _train(depth: int) -> dict:
    from megatron_cpu import (
        TinyGPT,
        build_tiny_plugin_gpt,
        make_microbatches,
        plugin_forward_backward,
        seed_megatron,
    )

    from mtp_plugin.megatron import MTPMetrics

    shape = TinyGPT(num_layers=2, num_moe_experts=4, mtp_num_layers=depth)
    seed_megatron(100 + depth)
    model = build_tiny_plugin_gpt(shape)
    metrics = MTPMetrics(depth)
    plugin_forward_backward(model, make_microbatches(shape, 2, 2, seed=depth), lam=0.1, metrics=metrics)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"metrics": metrics.reduce(), "grads": grads}


def _worker() -> dict:
    rank = torch.distributed.get_rank()
    if rank == 0:
        return {depth: _train(depth) for depth in IN_ONE_PROCESS}
    return {ALONE[rank]: _train(ALONE[rank])}


def test_two_models_with_different_depths_in_one_process_match_separate_processes():
    together, *alone = run_distributed(_worker, 3, parallel=dict(), timeout=240)
    for depth, stats in together.items():
        assert sorted(k for k in stats["metrics"] if k.endswith(" loss")) == ["lm loss"] + [
            f"mtp_{k} loss" for k in range(1, depth + 1)
        ]
        # An untrained model over a 96-token vocabulary: every depth's loss is near ln 96 = 4.56.
        assert all(abs(v - math.log(96)) < 0.6 for k, v in stats["metrics"].items() if k.endswith("loss"))
    for result in alone:
        ((depth, want),) = result.items()
        got = together[depth]
        assert got["metrics"] == want["metrics"], depth
        assert got["grads"].keys() == want["grads"].keys() and any("mtp_stack" in n for n in want["grads"])
        for name, grad in want["grads"].items():
            assert torch.equal(got["grads"][name], grad), (depth, name)
