"""The seed text's ρ tables in correct units, the CLI, and the true cost of MTP depths."""

from __future__ import annotations

import json
import math

import pytest

from mtp_plugin.accounting.seed import (
    SeedRow,
    benchmark_moe_shape,
    deepseek_v3_shape,
    llama2_7b_shape,
    mtp_cost,
    rho_bits_per_flop,
    seed_rows,
)
from mtp_plugin.rho import main

JSON_KEYS = {
    "model",
    "params",
    "active_params",
    "seq",
    "vocab",
    "k",
    "flops_per_step",
    "bits_per_step",
    "rho_bits_per_flop",
    "rho_bits_per_gflop",
    "seed_printed",
}


def row(model: str, k: int = 1) -> SeedRow:
    (found,) = [r for r in seed_rows() if r.model == model and r.k == k]
    return found


def test_seed_walkthrough_7b_bits_per_flop_figures():
    r = row("7B")
    assert r.flops_per_step == pytest.approx(1.72e14, rel=2e-3)
    assert r.bits_per_step == pytest.approx(63_930, rel=1e-3)
    assert r.rho_bits_per_flop == pytest.approx(3.71e-10, rel=2e-3)


# (model, k, correct bits/GFLOP, seed's printed "bits/GFLOP", tolerance)
REQUIRED = [
    ("7B", 1, 0.3717, 3.71e-4, 0.015),
    ("7B", 2, 0.743, 7.3e-4, 0.015),
    ("7B", 3, 1.115, 1.1e-3, 0.015),
    ("7B", 4, 1.487, 1.5e-3, 0.015),
    ("70B", 1, 0.03717, 3.71e-5, 0.015),
    ("DeepSeek-V3 (37B active)", 1, 0.0766, 7.6e-5, 0.015),
    ("DeepSeek-V3 (all 671B)", 1, 0.00422, 4.2e-6, 0.015),
    ("DeepSeek-V3 (37B active)", 2, 0.153, 1.5e-4, 0.015),
    ("sanity 100M", 1, 26.0, 2.6e-2, 0.015),
]


@pytest.mark.parametrize(("model", "k", "correct", "printed", "tol"), REQUIRED)
def test_required_values_and_seed_is_1000x_too_small(model, k, correct, printed, tol):
    r = row(model, k)
    assert r.rho_bits_per_gflop == pytest.approx(correct, rel=tol)
    assert r.seed_printed == printed
    # The seed's "bits/GFLOP" is bits per MFLOP: 10^3 off, up to its two-digit rounding.
    assert r.rho_bits_per_gflop / r.seed_printed == pytest.approx(1000, rel=0.025)


def test_deepseek_uses_37b_active_and_seed_rounded_17_bits():
    r = row("DeepSeek-V3 (37B active)")
    assert r.active_params == 3.7e10 and r.params == 6.71e11 and r.vocab == 128_000
    assert r.bits_per_step == 4096 * 17.0 == 69_632
    assert r.flops_per_step == pytest.approx(9.1e14, rel=0.01)
    assert row("DeepSeek-V3 (all 671B)").flops_per_step == pytest.approx(1.65e16, rel=0.01)


def test_sanity_n1_v2_is_one_sixth_bit_per_flop():
    r = row("sanity N=1 V=2")
    assert r.rho_bits_per_flop == pytest.approx(1 / 6)
    assert r.seed_printed is None
    assert rho_bits_per_flop(n_active=1, k=1, vocab=2) == pytest.approx(1 / 6)


def test_rho_is_linear_in_k_and_independent_of_seq():
    assert row("70B", 4).rho_bits_per_flop == pytest.approx(4 * row("70B", 1).rho_bits_per_flop)
    assert rho_bits_per_flop(n_active=7e9, k=1, vocab=50_000) == pytest.approx(row("7B").rho_bits_per_flop)


def test_seed_table_json_schema(capsys):
    assert main(["seed-table", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == len(seed_rows())
    for r in rows:
        assert set(r) == JSON_KEYS
        assert isinstance(r["model"], str) and isinstance(r["k"], int)
        assert r["seed_printed"] is None or isinstance(r["seed_printed"], float)
        assert r["flops_per_step"] == pytest.approx(6 * r["active_params"] * r["seq"])
        assert r["rho_bits_per_flop"] == pytest.approx(r["bits_per_step"] / r["flops_per_step"])
        assert r["rho_bits_per_gflop"] == pytest.approx(r["rho_bits_per_flop"] * 1e9)
    seven_b = [r for r in rows if r["model"] == "7B"]
    assert [r["k"] for r in seven_b] == [1, 2, 3, 4]
    assert seven_b[0]["bits_per_step"] == pytest.approx(4096 * math.log2(50_000))


def test_seed_table_text_prints_both_units_and_true_cost(capsys):
    assert main(["density-table"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('Source: Chapter 7, §7.1 "The Math: Supervisory Density per FLOP"')
    assert "seed" not in out.lower()  # the chapter is named, not "the seed"
    assert "bits per MFLOP" in out and "10^3 too small" in out
    assert "0.3717" in out and "0.000371" in out  # correct value beside the seed's figure
    assert "~0.2%" in out and "DeepSeek-V3" in out and "+1 depth" in out


def test_mtp_cost_json(capsys):
    assert main(["mtp-cost", "--json"]) == 0
    costs = json.loads(capsys.readouterr().out)
    assert {c["model"].split(" ")[0] for c in costs} >= {"Llama-2-7B", "DeepSeek-V3", "benchmark"}


# Forward FLOPs per token written out from each model's published shape (2 FLOPs per weight of every
# matmul a token passes; attention scores 2*seq*heads*(d_qk + d_v), halved for causal attention), so
# the fractions below are derived here, not copied from the code under test.


def _scores(seq: int, heads: int, d_qk: int, d_v: int) -> int:
    return 2 * seq * heads * (d_qk + d_v) // 2


def _deepseek_v3_per_token(*, scores: bool) -> tuple[int, int, int]:
    """(trunk + head, one MTP depth, head): HF config.json - hidden 7168, 61 layers (3 dense, ffn
    18432), MLA (128 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128), 256 experts top-8
    + 1 shared of ffn 2048 (SwiGLU: 3 matrices), vocabulary 129280, sequence 4096."""
    h, heads, nope, rope, v_dim = 7168, 128, 128, 64, 128
    mla = 2 * (
        h * 1536
        + 1536 * heads * (nope + rope)
        + h * (512 + rope)
        + 512 * heads * (nope + v_dim)
        + heads * v_dim * h
    )
    attention = mla + (_scores(4096, heads, nope + rope, v_dim) if scores else 0)
    moe = 2 * h * 256 + (8 + 1) * 3 * 2 * h * 2048  # router + 8 routed + 1 shared expert per token
    dense = 3 * 2 * h * 18432
    head = 2 * h * 129_280
    trunk = 3 * (attention + dense) + 58 * (attention + moe) + head
    depth = 2 * (2 * h) * h + (attention + moe) + head  # eh_proj 2h -> h, one MoE block, the head
    return trunk, depth, head


def _dense_or_moe_per_token(*, h, layers, heads, seq, vocab, mlp) -> tuple[int, int]:
    """(trunk + head, one MTP depth) of a model with plain multi-head attention and one kind of layer."""
    layer = 4 * 2 * h * h + _scores(seq, heads, h // heads, h // heads) + mlp
    head = 2 * h * vocab
    return layers * layer + head, 2 * (2 * h) * h + layer + head


def test_true_cost_of_an_mtp_depth():
    dsv3 = mtp_cost(deepseek_v3_shape())
    trunk_w, depth_w, _ = _deepseek_v3_per_token(scores=False)
    trunk, depth, head = _deepseek_v3_per_token(scores=True)
    assert dsv3.depth_fraction_weights_only == depth_w / trunk_w
    assert dsv3.depth_fraction == depth / trunk
    assert dsv3.head_only_fraction == head / trunk
    assert dsv3.rho_multiplier(1) == 2 / (1 + depth / trunk)
    # What DESIGN.md §3 states, rounded: +4.4% per depth (weight matmuls, as 6NT counts them), 4.1% with
    # causal-half scores, the head alone 2.2% of the 37B-active step (the seed's "~0.2%" is a head
    # against all 671B); the weight matmuls of the active trunk are ~2 * 37B per token (6NT's premise).
    assert (round(depth_w / trunk_w, 3), round(depth / trunk, 3), round(head / trunk, 3)) == (
        0.044,
        0.041,
        0.022,
    )
    assert dsv3.trunk_flops_per_token_weights_only == trunk_w == pytest.approx(2 * 3.7e10, rel=0.02)

    # Llama-2-7B: hidden 4096, 32 layers, 32 heads, SwiGLU ffn 11008, sequence 4096.
    for vocab, rounded in ((32_000, 0.054), (50_000, 0.063)):
        trunk, depth = _dense_or_moe_per_token(
            h=4096, layers=32, heads=32, seq=4096, vocab=vocab, mlp=3 * 2 * 4096 * 11008
        )
        assert mtp_cost(llama2_7b_shape(vocab_size=vocab)).depth_fraction == depth / trunk
        assert round(depth / trunk, 3) == rounded

    # Benchmark (DESIGN.md §6): hidden 1024, 8 layers, 16 heads, 16 experts top-2, V 50304, T 2048; the
    # expert ffn is not recorded: 4096 GeLU (Megatron's defaults) gives +32.5%, 2048 GeLU DESIGN's +40%.
    for ffn, shape, rounded, digits in (
        (4096, benchmark_moe_shape(), 0.325, 3),
        (2048, benchmark_moe_shape(expert_ffn_hidden_size=2048, gated=False), 0.40, 2),  # 0.404
    ):
        moe = 2 * 1024 * 16 + 2 * 2 * 2 * 1024 * ffn  # router + top-2 GeLU experts (2 matrices)
        trunk, depth = _dense_or_moe_per_token(h=1024, layers=8, heads=16, seq=2048, vocab=50_304, mlp=moe)
        assert mtp_cost(shape).depth_fraction == depth / trunk
        assert round(depth / trunk, digits) == rounded
    # An extra depth always buys bits cheaper than the trunk does.
    bench_2048 = mtp_cost(benchmark_moe_shape(expert_ffn_hidden_size=2048, gated=False))
    llama = mtp_cost(llama2_7b_shape(vocab_size=32_000))
    for cost in (dsv3, llama, bench_2048):
        assert cost.marginal_rho_bits_per_gflop > cost.trunk_rho_bits_per_gflop


def test_seed_row_validation():
    with pytest.raises(ValueError, match="active_params"):
        SeedRow(model="x", params=1e9, active_params=2e9, seq=1, vocab=2, k=1)
    with pytest.raises(ValueError, match="k >= 1"):
        SeedRow(model="x", params=1e9, active_params=1e9, seq=1, vocab=2, k=0)
