"""Megatron-Core's native MTP on CPU over gloo: the same weights give the same losses and gradients
at pp=1, pp=2 and pp=2 x ep=2.

This proves the test infrastructure (tests/megatron_cpu.py, tests/distributed_utils.py) runs real
pipeline and expert parallelism, and pins down facts the parity tests rely on: the MTP loss is not
in GPTModel's returned loss (only in its gradients and in MTPLossLoggingHelper), and at pp>1 the
word-embedding gradient is split between stage 0 and the MTP stage's copy (Megatron sums the two in
finalize_model_grads).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from distributed_utils import run_distributed  # noqa: E402
from megatron_cpu import (  # noqa: E402
    TinyGPT,
    build_tiny_gpt,
    forward_backward,
    load_global_state,
    make_microbatches,
    to_global_names,
)

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

NUM_MICROBATCHES = 4
MICRO_BATCH_SIZE = 2
DATA_SEED = 7
DENSE = dict(num_moe_experts=None, mtp_num_layers=2)
MOE = dict(num_moe_experts=4, moe_router_topk=2, mtp_num_layers=2)


def _stage_worker(model_kwargs: dict, ref_path: str, save_reference: bool) -> dict:
    """One rank: build its stage, load (or save) the pp=1 weights, run its microbatches."""
    from megatron.core import parallel_state as ps

    model = TinyGPT(**model_kwargs)
    gpt = build_tiny_gpt(model)
    if save_reference:
        state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
        torch.save(state, ref_path)
    else:
        load_global_state(gpt, torch.load(ref_path))

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_rank = NUM_MICROBATCHES // dp_size
    batches = make_microbatches(model, NUM_MICROBATCHES, MICRO_BATCH_SIZE, DATA_SEED, mask_tail=3)
    out = forward_backward(gpt, batches[dp_rank * per_rank : (dp_rank + 1) * per_rank])

    grads = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    return {
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": dp_rank,
        "dp_size": dp_size,
        "post_process": gpt.post_process,
        "lm_loss": out["lm_loss"],
        "mtp_tracker": out["mtp_tracker"],
        "grads": to_global_names(gpt, grads),
    }


def _combine(results: list[dict]) -> dict:
    """Per-microbatch main losses in global order, summed MTP tracker, grads summed over ranks.

    Summing over pipeline stages is what finalize_model_grads does for the word-embedding copies
    (all-reduce over the embedding group). With dp ranks each running 1/dp of the microbatches,
    the schedule scales each rank's grads by 1/(its microbatches), so the sum over ranks (and an
    expert's grad, which collects tokens of every dp rank through the dispatcher) is dp_size
    times the pp=1 grad: divide by dp_size.
    """
    last = sorted((r for r in results if r["post_process"]), key=lambda r: r["dp_rank"])
    lm_loss = torch.stack([loss for r in last for loss in r["lm_loss"]])
    mtp = torch.stack([r["mtp_tracker"] for r in last]).sum(0)
    grads: dict[str, torch.Tensor] = {}
    for r in results:
        for name, grad in r["grads"].items():
            grads[name] = grads.get(name, 0) + grad / r["dp_size"]
    return {"lm_loss": lm_loss, "mtp": mtp, "grads": grads}


def _run(model_kwargs: dict, ref_path: str, parallel: dict, world_size: int, save: bool) -> dict:
    results = run_distributed(
        _stage_worker, world_size, model_kwargs, ref_path, save, parallel=parallel, timeout=150
    )
    return _combine(results)


def _assert_same(ref: dict, got: dict, *, check_grads: bool) -> None:
    torch.testing.assert_close(got["lm_loss"], ref["lm_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["mtp"], ref["mtp"], rtol=1e-5, atol=1e-6)
    if check_grads:
        assert got["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _assert_reference_sane(ref: dict, vocab_size: int) -> None:
    # Random init: every loss sits near log(V); 4 microbatches, 2 depths, tracker = sum of means.
    log_v = torch.log(torch.tensor(float(vocab_size)))
    assert ref["lm_loss"].shape == (NUM_MICROBATCHES,)
    assert ref["mtp"].shape == (2,)
    assert torch.all((ref["lm_loss"] - log_v).abs() < 0.5)
    assert torch.all((ref["mtp"] / NUM_MICROBATCHES - log_v).abs() < 0.5)
    # The MTP loss reaches the gradients even though it is not in the returned loss.
    for k in range(2):
        assert ref["grads"][f"mtp.layers.{k}.eh_proj.weight"].abs().sum() > 0


@pytest.mark.timeout(120)
def test_dense_native_mtp_pp1_equals_pp2(tmp_path):
    ref_path = str(tmp_path / "ref.pt")
    ref = _run(DENSE, ref_path, {}, 1, save=True)
    _assert_reference_sane(ref, TinyGPT().vocab_size)
    pp2 = _run(DENSE, ref_path, dict(pipeline_model_parallel_size=2), 2, save=False)
    _assert_same(ref, pp2, check_grads=True)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    ref_path = str(tmp_path_factory.mktemp("moe") / "ref.pt")
    ref = _run(MOE, ref_path, {}, 1, save=True)
    _assert_reference_sane(ref, TinyGPT().vocab_size)
    return ref_path, ref


@pytest.mark.timeout(120)
def test_moe_native_mtp_pp1_equals_pp2(moe_reference):
    ref_path, ref = moe_reference
    pp2 = _run(MOE, ref_path, dict(pipeline_model_parallel_size=2), 2, save=False)
    _assert_same(ref, pp2, check_grads=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_moe_native_mtp_pp1_equals_pp2xep2(moe_reference, dispatcher):
    # Same weights, other token dispatcher: routing is per token, so losses and grads must match.
    ref_path, ref = moe_reference
    parallel = dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    got = _run(dict(MOE, moe_token_dispatcher_type=dispatcher), ref_path, parallel, 4, save=False)
    _assert_same(ref, got, check_grads=True)
