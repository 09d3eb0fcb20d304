"""`split`: the MTP depths spread over consecutive pipeline stages (issue 25), over real Megatron groups
(CPU, gloo), against the same model on one stage.

Every parameter gets a value that is a function of its pp=1/ep=1 name (depth k of a split stage under
its global index), so differently split models hold the same weights. The reference is the model in one
process (`last` on a single stage: every depth, the head and the loss together); each split run must give
its losses and every DDP-reduced gradient (fp32). Three launches hold every case (process start-up is
most of the time): the references in one process, pp = 3 on 6 ranks (dp 2, so one case can take ep 2),
pp = 4 on 4 ranks; each case initialises its own model-parallel groups, since the embedding group
depends on the plan.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from distributed_utils import run_distributed
from test_megatron_mtp_pipeline import _init_by_global_name

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.slow]

GLOBAL_MICROBATCHES = 4
MICRO_BATCH = 2


def _run_case(case: dict, optimizer_steps: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_cpu import TinyGPT, build_tiny_plugin_gpt, ddp_and_adam, make_microbatches, to_global_names

    from mtp_plugin.megatron import MTPMetrics, mtp_forward_step

    num_depths = case["depths"]
    shape = TinyGPT(
        num_layers=4,
        num_moe_experts=case.get("experts"),
        mtp_num_layers=num_depths,
        share_embeddings_and_output_weights=case["tied"],
        pipeline_model_parallel_layout=case.get("layout"),
    )
    model = build_tiny_plugin_gpt(shape)
    names = _init_by_global_name(model, to_global_names)
    ddp, optimizer = ddp_and_adam(model)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    num_mb = GLOBAL_MICROBATCHES // dp
    batches = make_microbatches(shape, GLOBAL_MICROBATCHES, MICRO_BATCH, seed=11, mask_tail=1)
    batches = batches[dp_rank * num_mb : (dp_rank + 1) * num_mb]
    has_table = hasattr(model, "embedding")
    out = {
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": dp_rank,
        "last": model.post_process,
        "depths": list(model.mtp_depths),
        "losses": None,
        "grads": None,
        "emb": [],
    }
    for step in range(max(optimizer_steps, 1)):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=partial(mtp_forward_step, lam=0.3, metrics=MTPMetrics(num_depths)),
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=num_mb,
            seq_length=shape.seq_length,
            micro_batch_size=MICRO_BATCH,
        )
        if step == 0:
            out["losses"] = [{k: v.tolist() for k, v in d.items()} for d in losses]
            out["grads"] = {names[n]: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        if has_table:
            out["emb"].append(model.embedding.word_embeddings.weight.detach().clone())
        if optimizer_steps:
            optimizer.step()
    if has_table:
        out["emb"].append(model.embedding.word_embeddings.weight.detach().clone())
    return out


def _cases_worker(cases: list[dict]) -> list[dict]:
    """Each case under its own model-parallel groups (the embedding group is the plan's)."""
    from megatron.core import parallel_state as ps
    from megatron_cpu import seed_megatron

    from mtp_plugin.megatron.placement import plan_pipeline

    world = torch.distributed.get_world_size()
    results = []
    for case in cases:
        pp = case.get("pp", 1)
        plan = plan_pipeline(
            num_layers=4, num_depths=case["depths"], pipeline_size=pp, layout=case.get("layout")
        )
        ps.initialize_model_parallel(
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=case.get("ep", 1) if world > 1 else 1,
            get_embedding_ranks=plan.embedding_ranks_fn(tied_head=case["tied"]),
        )
        seed_megatron(1234)
        try:
            results.append(_run_case(case, case.get("steps", 0)))
        finally:
            ps.destroy_model_parallel()
    return results


def _reference_key(case: dict) -> tuple:
    return case["depths"], case["tied"], case.get("experts")


PP3 = [
    dict(pp=3, layout="Et*2|t*2m|mL", depths=2, tied=False),
    dict(pp=3, layout="Et*2|t*2m|mL", depths=2, tied=True, steps=2),
    dict(pp=3, layout="Et*2|t*2mm|mL", depths=3, tied=False),
    dict(pp=3, layout="Et*2|t*2m|mL", depths=2, tied=False, experts=4, ep=2),  # pp 3 x ep 2
]
PP4 = [
    dict(pp=4, layout="Et*2|t*2m|m|mL", depths=3, tied=False, steps=2),
    dict(pp=4, layout="Et*2|t*2m|m|mL", depths=3, tied=True),
    dict(pp=4, layout="Et|t|t*2m|mL", depths=2, tied=True),
    dict(pp=4, layout="Et*2|t*2m|m|L", depths=2, tied=False, experts=4),  # MoE, a loss-only stage after
]


@pytest.fixture(scope="module")
def runs():
    references = {}
    for case in PP3 + PP4:
        references.setdefault(
            _reference_key(case), {k: case[k] for k in ("depths", "tied")} | {"experts": case.get("experts")}
        )
    ref_cases = list(references.values())
    (ref_results,) = run_distributed(_cases_worker, 1, ref_cases, timeout=300)
    by_key = {_reference_key(c): r for c, r in zip(ref_cases, ref_results)}
    pp3 = run_distributed(_cases_worker, 6, PP3, timeout=480)
    pp4 = run_distributed(_cases_worker, 4, PP4, timeout=480)
    return by_key, {"pp3": pp3, "pp4": pp4}


def _loss_table(rank_results: list[dict]) -> dict:
    """{(microbatch index in the global batch, key): (sum, count)} from every last-stage rank."""
    table = {}
    for r in rank_results:
        if not r["last"]:
            continue
        for i, d in enumerate(r["losses"]):
            for key, value in d.items():
                table[(r["dp_rank"] * len(r["losses"]) + i, key)] = value
    return table


def _check_case(reference: dict, rank_results: list[dict], case: dict) -> None:
    ref_table, table = _loss_table([reference]), _loss_table(rank_results)
    assert set(table) == set(ref_table)
    # lm loss, each depth's loss and acceptance, the chain accept length
    assert len(table) == GLOBAL_MICROBATCHES * (2 + 2 * case["depths"])
    for key, (value, count) in table.items():
        assert count == ref_table[key][1], key
        assert value == pytest.approx(ref_table[key][0], rel=1e-5), key
    seen = set()
    for r in rank_results:
        for name, grad in r["grads"].items():
            torch.testing.assert_close(
                grad, reference["grads"][name], rtol=1e-4, atol=1e-6, msg=f"pp{r['pp_rank']}: {name}"
            )
            seen.add(name)
    assert seen == set(reference["grads"]), set(reference["grads"]) ^ seen


@pytest.mark.parametrize(
    ("group", "index"), [("pp3", i) for i in range(len(PP3))] + [("pp4", i) for i in range(len(PP4))]
)
def test_split_matches_one_stage(runs, group, index):
    references, results = runs
    case = (PP3 if group == "pp3" else PP4)[index]
    ranks = [r[index] for r in results[group]]
    _check_case(references[_reference_key(case)], ranks, case)
    # Depth k runs on the stage the layout gives it, and only there.
    from mtp_plugin.megatron.placement import parse_layout

    stages = parse_layout(case["layout"])
    for r in ranks:
        before = "".join(stages[: r["pp_rank"]]).count("m")
        assert r["depths"] == list(range(before + 1, before + 1 + stages[r["pp_rank"]].count("m")))


@pytest.mark.parametrize(("group", "index"), [("pp3", 1), ("pp4", 0)])
def test_embedding_copies_stay_bit_identical_over_steps(runs, group, index):
    """Stage 0's table and every depth stage's copy (and a tied head's) after each optimizer step."""
    _, results = runs
    ranks = [r[index] for r in results[group] if r[index]["emb"]]
    case = (PP3 if group == "pp3" else PP4)[index]
    # Every stage holds the table here: stage 0, each depth stage (the last one among them).
    assert {r["pp_rank"] for r in ranks} == set(range(case["pp"]))
    first = next(r for r in ranks if r["pp_rank"] == 0)
    assert not torch.equal(first["emb"][0], first["emb"][-1])  # the optimizer did move it
    for r in ranks:
        for a, b in zip(first["emb"], r["emb"], strict=True):
            assert torch.equal(a, b), f"stage {r['pp_rank']}"
