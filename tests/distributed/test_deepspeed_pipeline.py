"""MTP in a DeepSpeed PipelineModule, trained by DeepSpeed's own pipeline engine on CPU over gloo.

One 1-process run and one 2-process run (two stages) share a model and data: their losses must agree, the
2-stage run's tied embedding / head copies must be bit-identical on both stages after the steps, and the ρ
meter's FLOPs and bits summed over the two ranks must equal the one process's. A 3-process run splits the
two depths over stages 1 and 2 (`mtp.placement=split`) against the same 1-process run.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed_cpu import tiny_moe_model, train_pipeline  # noqa: E402
from distributed_utils import run_distributed  # noqa: E402

from mtp_plugin.config import MTPConfig  # noqa: E402

pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]


STEPS = 3


def _tied_model():
    # Tied embedding/head: one module keyed "embed" on every stage that embeds (stage 0: the input
    # embedding; later stages: the MTP depths' Emb(t_(i+k)) and the head), so the tied-copy checks cover both.
    return tiny_moe_model(untie_embeddings_and_output_weights=False)


@pytest.fixture(scope="module")
def one_stage():
    (one,) = run_distributed(
        train_pipeline, 1, _tied_model(), MTPConfig(num_depths=2), num_stages=1, steps=STEPS, cpu_shims=False
    )
    return one


def test_one_stage_and_two_stages_train_alike_and_keep_tied_copies_identical(one_stage):
    model, mtp, steps, one = _tied_model(), MTPConfig(num_depths=2), STEPS, one_stage
    two = run_distributed(train_pipeline, 2, model, mtp, num_stages=2, steps=steps, cpu_shims=False)
    assert [r["stage"] for r in two] == [0, 1]
    # Stage 0: embedding + 2 trunk layers; stage 1: 2 trunk layers, final norm, 2 x (lookup, depth), head.
    assert two[0]["parts"] == [0, 3, 11]
    # Every rank of the pipeline reports the same (broadcast) loss; it equals the one-stage run's. Only
    # the summation order of the tied weight's gradient differs (one tensor vs two summed), hence rtol 1e-6.
    for rank in two:
        torch.testing.assert_close(rank["losses"], one["losses"], rtol=1e-6, atol=0)
    for got, want in zip(two[1]["metrics"], one["metrics"]):
        assert set(got) == {
            "lm loss", "mtp_1 loss", "mtp_1 acceptance", "mtp_2 loss", "mtp_2 acceptance",
            "mtp chain accept length",
        }  # fmt: skip
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)
    # The loss DeepSpeed reports is the plugin's L_main + λ Σ w_k L_k + aux: 5 MoE layers (3 trunk, 2 MTP
    # blocks) x coefficient 0.01 x DeepSpeed's gate loss (1 at balanced routing).
    first = one["metrics"][0]
    mtp_term = 0.3 * 0.5 * (first["mtp_1 loss"] + first["mtp_2 loss"])
    assert 0.03 < one["losses"][0] - (first["lm loss"] + mtp_term) < 0.08
    # Tied copies: stage 0 and stage 1 hold the same embedding table, bit for bit, after 3 optimizer steps,
    # and training moved it (it is not the initial table on both).
    assert torch.equal(two[0]["tied"]["embed"], two[1]["tied"]["embed"])
    torch.testing.assert_close(two[1]["tied"]["embed"], one["tied"]["embed"], rtol=0, atol=1e-5)
    assert not torch.equal(one["tied"]["embed"], one["initial_embed"])
    # ρ: the two stages' FLOPs (each its own share) sum to the one-stage run's, category by category, and
    # the cluster sums (FLOPs, bits ceiling, bits effective) are the same numbers.
    for category, flops in one["local_flops"].items():
        assert two[0]["local_flops"][category] + two[1]["local_flops"][category] == pytest.approx(
            flops, rel=1e-12
        )
    assert two[0]["local_flops"]["mtp_projections"] == 0 < two[1]["local_flops"]["mtp_projections"]
    assert one["local_flops"]["experts"] > 0 and one["local_flops"]["head"] > 0
    for key in ("flops", "bits ceiling", "bits effective", "targets mtp_2"):
        assert two[0]["rho"][key] == two[1]["rho"][key] == pytest.approx(one["rho"][key], rel=1e-6), key
    # Parity with the core reference (same weights, fp32): the one-stage pipe's loss and every gradient.
    ref = one["reference"]
    torch.testing.assert_close(ref["pipe_loss"], ref["ref_loss"], rtol=1e-5, atol=0)
    assert set(ref["pipe_grads"]) == set(ref["ref_grads"]) and len(ref["pipe_grads"]) > 20
    for name, grad in ref["ref_grads"].items():
        torch.testing.assert_close(ref["pipe_grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_split_depths_over_three_stages_train_alike(one_stage):
    """`mtp.placement=split` at 3 stages: E t t | t t norm (lookup, depth 1) | (lookup, depth 2) head. The
    tuple gains h^1 on stage 1 and h^2 on stage 2; every stage holds the tied table, kept bit-identical."""
    mtp = MTPConfig(num_depths=2, placement="split")
    three = run_distributed(train_pipeline, 3, _tied_model(), mtp, num_stages=3, steps=STEPS, cpu_shims=False)
    assert [r["stage"] for r in three] == [0, 1, 2] and three[0]["parts"] == [0, 3, 8, 11]
    for rank in three:
        torch.testing.assert_close(rank["losses"], one_stage["losses"], rtol=1e-6, atol=0)
    for got, want in zip(three[2]["metrics"], one_stage["metrics"]):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)
    assert torch.equal(three[0]["tied"]["embed"], three[1]["tied"]["embed"])
    assert torch.equal(three[0]["tied"]["embed"], three[2]["tied"]["embed"])
    assert not torch.equal(one_stage["tied"]["embed"], one_stage["initial_embed"])
