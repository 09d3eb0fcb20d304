"""Framework-free ρ bookkeeping (mtp_plugin.accounting.meter): tallies, bits, cluster log fields."""

from __future__ import annotations

import math

import pytest
import torch

from mtp_plugin.accounting.meter import (
    FLOP_CATEGORIES,
    FlopTally,
    WindowMeter,
    bits_ceiling,
    bits_effective,
    forward_cost,
    pack_window,
    rho_log_fields,
)


def test_tally_closes_steps_and_resets():
    tally = FlopTally()
    tally.add("head", 10.0)
    tally.pending_tokens += 4
    assert tally.window["head"] == 0.0  # an open step is not in the window
    tally.end_step()
    tally.add("head", 5.0)
    tally.end_step()
    assert tally.window["head"] == 15.0 and tally.window_tokens == 4 and tally.steps == 2
    assert set(tally.window) == set(FLOP_CATEGORIES)
    tally.reset()
    assert tally.steps == 0 and sum(tally.window.values()) == 0.0


def test_bits():
    assert bits_ceiling(3, 1024) == 30.0
    assert bits_effective(math.log(2.0) * 7) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="vocab_size"):
        bits_ceiling(1, 1)


def test_fields_from_two_ranks():
    # Rank 0: first pipeline stage (FLOPs only); rank 1: last stage, scores main + 1 depth.
    r0 = pack_window(
        flops=2e12, tokens=0, elapsed_s=2.0, steps=1, target_counts=[0, 0], loss_sums_nats=[0, 0]
    )
    r1 = pack_window(
        flops=3e12,
        tokens=1000,
        elapsed_s=2.0,
        steps=1,
        target_counts=[1000, 990],
        loss_sums_nats=[1000 * math.log(2) * 4, 990 * math.log(2) * 5],
    )
    fields = rho_log_fields(
        r0 + r1, num_depths=1, world_size=2, vocab_size=1024, n_active=1e6, peak_tflops=2.5
    )
    assert fields["flops"] == 5e12
    assert fields["bits main"] == 10_000 and fields["bits mtp_1"] == 9_900
    assert fields["bits effective"] == pytest.approx(4000 + 4950)
    assert fields["rho_ceiling bits/GFLOP"] == pytest.approx(19_900 / 5e3)
    assert fields["rho_effective bits/GFLOP"] == pytest.approx(8950 / 5e3)
    assert fields["flops 6NT"] == 6e9
    assert fields["TFLOP/s/GPU"] == pytest.approx(5e12 / 2.0 / 2 / 1e12)
    assert fields["MFU"] == pytest.approx(1.25 / 2.5)
    assert fields["steps"] == 1.0


def test_seed_units_at_7b():
    # The seed's 7B example: one head, log2(50000) bits per token over 6 * 7e9 FLOPs: 0.3717 bits/GFLOP
    # (3.71e-10 bits/FLOP; the seed's prose prints it 10^3 too small).
    tokens = 4096
    vec = pack_window(
        flops=6 * 7e9 * tokens,
        tokens=tokens,
        elapsed_s=1.0,
        steps=1,
        target_counts=[tokens],
        loss_sums_nats=[0],
    )
    fields = rho_log_fields(vec, num_depths=0, world_size=1, vocab_size=50_000, n_active=7e9)
    assert fields["rho_ceiling bits/GFLOP"] == pytest.approx(0.3717, abs=1e-4)
    assert fields["rho_ceiling 6NT bits/GFLOP"] == pytest.approx(fields["rho_ceiling bits/GFLOP"])
    assert "MFU" not in fields


def test_pack_rejects_mismatched_heads():
    with pytest.raises(ValueError, match="one loss sum"):
        pack_window(flops=1, tokens=1, elapsed_s=1, steps=1, target_counts=[1, 2], loss_sums_nats=[1])
    with pytest.raises(ValueError, match="expected"):
        rho_log_fields(torch.zeros(5), num_depths=1, world_size=1, vocab_size=2, n_active=1)


def _window_metrics(num_depths: int):
    """An MTPMetrics window of one micro-batch: 100 main targets at 2 nats each, 90 per depth at 3 nats."""
    from mtp_plugin.megatron.step import MTPMetrics

    metrics = MTPMetrics(num_depths)
    depth_counts = torch.tensor([[90.0, 40.0, 30.0]] * num_depths)  # (valid targets, top-1 hits, chain hits)
    metrics.update(torch.tensor(200.0), 100, torch.full((num_depths,), 270.0), depth_counts)
    return metrics


def test_window_meter_turns_its_window_into_log_fields():
    # The one reduction both backends' meters inherit (RhoMeter, DeepSpeedRhoMeter): tally + metrics -> fields.
    meter = WindowMeter(num_depths=2, vocab_size=1024, peak_tflops=2.0)
    meter._n_active = 1e6
    meter.tally.add("head", 4e12)
    meter.tally.pending_tokens += 100
    meter.end_step()
    meter.tally.add("mlp", 1e12)  # an open step: not in the window
    fields = meter.reduce(metrics=_window_metrics(2), elapsed_s=2.0)
    assert fields["flops"] == 4e12 and fields["flops 6NT"] == 6e8 and fields["steps"] == 1
    assert fields["targets main"] == 100 and fields["targets mtp_2"] == 90
    assert fields["bits main"] == 1000 and fields["bits mtp_1"] == 900
    assert fields["bits effective"] == pytest.approx((200 + 2 * 270) / math.log(2))
    assert fields["TFLOP/s/GPU"] == 2.0 and fields["MFU"] == 1.0
    assert meter.local_flops() == {**dict.fromkeys(FLOP_CATEGORIES, 0.0), "head": 4e12, "total": 4e12}
    meter._scores_bits = False  # a tensor-parallel peer of the scoring rank: FLOPs, no bits
    assert meter.reduce(metrics=_window_metrics(2), elapsed_s=2.0)["bits ceiling"] == 0.0
    meter.reset()
    assert meter.reduce(elapsed_s=1.0)["flops"] == 0.0


def test_window_meter_rejects_metrics_of_other_depths():
    meter = WindowMeter(num_depths=2, vocab_size=1024)
    with pytest.raises(ValueError, match="WindowMeter.reduce: metrics has 1 depths, the meter 2"):
        meter.reduce(metrics=_window_metrics(1))
    with pytest.raises(ValueError, match="peak_tflops must be > 0"):
        WindowMeter(num_depths=1, vocab_size=1024, peak_tflops=0.0)


def test_forward_cost_counts_a_backward_only_where_one_runs():
    weight = torch.ones(2, 2, requires_grad=True)
    frozen = torch.ones(2, 2)
    x = torch.ones(3, 2)
    assert forward_cost((x @ weight, None)) == 3  # a tuple output (Megatron's (out, bias)) is searched
    assert forward_cost(x @ frozen) == 1  # frozen weights on a constant input: no graph, no backward
    with torch.no_grad():
        assert forward_cost(x @ weight) == 1  # a recomputed region's first forward
