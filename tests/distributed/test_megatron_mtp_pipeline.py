"""The plugin's MTP over real Megatron pipeline / expert parallel groups (CPU, gloo).

Every parameter gets a value that is a function of its pp=1/ep=1 name, so differently split models hold
the same weights; losses and DDP-reduced gradients are compared against a single-process run over the
same global batch.
"""

import zlib

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

NUM_DEPTHS = 2
MICROBATCHES_PER_DP_RANK_AT_DP1 = 4
MICRO_BATCH = 2


def _init_by_global_name(model, to_global):
    # to_global_names renames keys: {global name: local name}, inverted here.
    names = {
        local: glob for glob, local in to_global(model, {n: n for n, _ in model.named_parameters()}).items()
    }
    with torch.no_grad():
        for local, param in model.named_parameters():
            name = names[local]
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return names


def _pipeline_worker(num_experts, layout, tied, optimizer_steps, dispatcher="alltoall"):
    from megatron.core import parallel_state as ps
    from megatron_cpu import (
        TinyGPT,
        build_tiny_plugin_gpt,
        ddp_and_adam,
        make_microbatches,
        plugin_forward_backward,
        to_global_names,
    )

    from mtp_plugin.megatron import MTPMetrics

    pp_rank = ps.get_pipeline_model_parallel_rank()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    shape = TinyGPT(
        num_layers=4,
        num_moe_experts=num_experts,
        mtp_num_layers=NUM_DEPTHS,
        share_embeddings_and_output_weights=tied,
        pipeline_model_parallel_layout=layout,
        moe_token_dispatcher_type=dispatcher,
    )
    model = build_tiny_plugin_gpt(shape)
    stage = ("E" if model.pre_process else "") + ("L" if model.post_process else "")
    emb_at_build = (
        model.embedding.word_embeddings.weight.detach().clone() if hasattr(model, "embedding") else None
    )
    names = _init_by_global_name(model, to_global_names)
    ddp, optimizer = ddp_and_adam(model)

    num_mb = MICROBATCHES_PER_DP_RANK_AT_DP1 // dp
    all_batches = make_microbatches(shape, MICROBATCHES_PER_DP_RANK_AT_DP1, MICRO_BATCH, seed=11, mask_tail=1)
    batches = all_batches[dp_rank * num_mb : (dp_rank + 1) * num_mb]
    out = {"pp_rank": pp_rank, "dp_rank": dp_rank, "stage": stage, "emb_at_build": emb_at_build, "steps": []}
    for step in range(max(optimizer_steps, 1)):
        metrics = MTPMetrics(NUM_DEPTHS)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = plugin_forward_backward(ddp, batches, lam=0.3, metrics=metrics)
        record = {
            "losses": [{k: v.tolist() for k, v in d.items()} for d in losses],
            "emb": model.embedding.word_embeddings.weight.detach().clone()
            if hasattr(model, "embedding")
            else None,
        }
        if step == 0:
            record["grads"] = {names[n]: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        out["steps"].append(record)
        if optimizer_steps:
            optimizer.step()
    if hasattr(model, "embedding"):
        out["emb_final"] = model.embedding.word_embeddings.weight.detach().clone()
    return out


def _run(world, parallel, num_experts, layout, tied=False, steps=0, dispatcher="alltoall"):
    return run_distributed(
        _pipeline_worker, world, num_experts, layout, tied, steps, dispatcher, parallel=parallel, timeout=240
    )


def _loss_table(results):
    """{(microbatch index in the global batch, key): (sum, count)} from the last stage of every DP rank."""
    table = {}
    for r in results:
        if "L" not in r["stage"]:
            continue
        for i, d in enumerate(r["steps"][0]["losses"]):
            index = r["dp_rank"] * len(r["steps"][0]["losses"]) + i
            for key, value in d.items():
                table[(index, key)] = value
    return table


def _assert_same_as_reference(reference, results):
    ref_table, table = _loss_table(reference), _loss_table(results)
    # lm loss, each depth's loss and acceptance, the chain accept length
    assert set(table) == set(ref_table) and len(table) == MICROBATCHES_PER_DP_RANK_AT_DP1 * (
        2 + 2 * NUM_DEPTHS
    )
    for key, (value, count) in table.items():
        assert count == ref_table[key][1], key
        assert value == pytest.approx(ref_table[key][0], rel=1e-5), key
    ref_grads = reference[0]["steps"][0]["grads"]
    seen = set()
    for r in results:
        for name, grad in r["steps"][0]["grads"].items():
            torch.testing.assert_close(
                grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"rank pp{r['pp_rank']}: {name}"
            )
            seen.add(name)
    assert seen == set(ref_grads), set(ref_grads) ^ seen


@pytest.fixture(scope="module")
def dense_reference():
    return _run(1, dict(), None, None)


@pytest.fixture(scope="module")
def moe_reference():
    return _run(1, dict(), 4, None)


def test_pp2_matches_pp1(dense_reference):
    results = _run(2, dict(pipeline_model_parallel_size=2), None, None)
    _assert_same_as_reference(dense_reference, results)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_pp2_ep2_matches_pp1(moe_reference, dispatcher):
    results = _run(
        4, dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2), 4, None, dispatcher=dispatcher
    )
    _assert_same_as_reference(moe_reference, results)


def test_pp3_mtp_on_stage1_loss_on_stage2(dense_reference):
    """Layout `E t t | t t m m | L`: MTP on stage 1, head and loss on stage 2 (Megatron's `m | L`)."""
    from mtp_plugin.megatron.placement import plan_pipeline

    plan = plan_pipeline(num_layers=4, num_depths=NUM_DEPTHS, pipeline_size=3, placement="stage", mtp_stage=1)
    assert plan.stages == ("Ett", "ttmm", "L")
    parallel = dict(
        pipeline_model_parallel_size=3, get_embedding_ranks=plan.embedding_ranks_fn(tied_head=False)
    )
    results = _run(3, parallel, None, plan.layout)
    _assert_same_as_reference(dense_reference, results)
    # The MTP stage's embedding copy starts as stage 0's table (Megatron zero-fills it, then all-reduces).
    by_stage = {r["pp_rank"]: r for r in results}
    torch.testing.assert_close(by_stage[1]["emb_at_build"], by_stage[0]["emb_at_build"], rtol=0, atol=0)
    assert by_stage[2]["emb_at_build"] is None  # the loss-only stage holds no embedding


def test_pp3_embedding_copies_stay_bit_identical_over_steps():
    from mtp_plugin.megatron.placement import plan_pipeline

    plan = plan_pipeline(num_layers=4, num_depths=NUM_DEPTHS, pipeline_size=3, placement="stage", mtp_stage=1)
    parallel = dict(
        pipeline_model_parallel_size=3, get_embedding_ranks=plan.embedding_ranks_fn(tied_head=False)
    )
    results = _run(3, parallel, None, plan.layout, steps=3)
    by_stage = {r["pp_rank"]: r for r in results}
    first, mtp = by_stage[0], by_stage[1]
    assert not torch.equal(first["emb_final"], first["steps"][0]["emb"])  # the optimizer did move it
    assert torch.equal(first["emb_final"], mtp["emb_final"])
    for a, b in zip(first["steps"], mtp["steps"]):
        assert torch.equal(a["emb"], b["emb"])


def test_pp2_tied_head_matches_pp1_and_copies_stay_identical():
    """A tied head (embedding = output weight) with pp = 2: stage 0's table, and the last stage's head and
    MTP embedding copies, get the pp=1 gradients and stay bit-identical over optimizer steps."""
    reference = _run(1, dict(), None, None, tied=True)
    results = _run(2, dict(pipeline_model_parallel_size=2), None, None, tied=True, steps=2)
    _assert_same_as_reference(reference, results)
    by_stage = {r["pp_rank"]: r for r in results}
    assert not torch.equal(by_stage[0]["emb_final"], by_stage[0]["steps"][0]["emb"])
    assert torch.equal(by_stage[0]["emb_final"], by_stage[1]["emb_final"])
