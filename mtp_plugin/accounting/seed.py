"""The ρ tables of the supervisory-density section (Chapter 7, §7.1 "The Math: Supervisory Density per
FLOP", the diagnosis section of the multi-token-prediction chapter), recomputed in correct units, and the
true FLOP cost of MTP depths. (Code names keep `seed` for that text: ``seed_rows``, ``seed_printed``.)

§7.1's convention (DESIGN.md §3): ``F = 6*N*T`` FLOPs per step, ``B = k*T*log2(V)`` supervisory bits
(ceiling) per step for k prediction heads, ``ρ = B/F = k*log2(V) / (6N)`` bits per FLOP.

§7.1's bits-per-FLOP figures are right (7B, T=4096, V=50,000: 1.72e14 FLOPs, ≈63,930 bits,
3.71e-10 bits/FLOP), but every figure it labels "bits/GFLOP" is bits per *MFLOP*, 10^3 too small
(3.71e-10 bits/FLOP is 0.371 bits/GFLOP, as its own NumPy snippet prints). Each row here carries the
figure §7.1 prints (``seed_printed``) beside the correct one.

§7.1 also says an extra head costs "~0.2%" FLOPs. That counts the head's weights against all
671B parameters; a DeepSeek-V3 MTP depth is ``eh_proj`` + a full (MoE) transformer block + the head,
computed by ``mtp_cost`` from the model shape with ``flops.model_forward_flops``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtp_plugin.accounting.flops import (
    AttentionShape,
    LayerShape,
    MLAShape,
    MLPShape,
    ModelShape,
    MoEShape,
    model_forward_flops,
    seed_flops,
)

__all__ = [
    "SeedRow",
    "seed_rows",
    "seed_bits",
    "rho_bits_per_flop",
    "GFLOP",
    "llama2_7b_shape",
    "deepseek_v3_shape",
    "benchmark_moe_shape",
    "MtpCost",
    "mtp_cost",
    "format_seed_table",
    "format_mtp_costs",
    "default_mtp_costs",
]

GFLOP = 1e9
SEED_SEQ = 4096
SEED_VOCAB = 50_000
DSV3_VOCAB = 128_000
# §7.1 rounds log2(128000) = 16.966 to 17.0 and computes its DeepSeek-V3 rows with that.
DSV3_SEED_BITS_PER_TARGET = 17.0
# "Effective bits (real text): tokens x ~3 bits" in §7.1's first table.
EFFECTIVE_BITS_PER_TARGET = 3.0


def seed_bits(*, k: int, tokens: int, vocab: int, bits_per_target: float | None = None) -> float:
    """``B = k * T * log2(V)``; ``bits_per_target`` replaces ``log2(V)`` where §7.1 rounds it or
    counts effective (real-text) bits."""
    per_target = math.log2(vocab) if bits_per_target is None else bits_per_target
    return k * tokens * per_target


def rho_bits_per_flop(*, n_active: float, k: int, vocab: int, bits_per_target: float | None = None) -> float:
    """``ρ = k * log2(V) / (6N)`` (T cancels)."""
    return seed_bits(k=k, tokens=1, vocab=vocab, bits_per_target=bits_per_target) / seed_flops(n_active, 1)


@dataclass(frozen=True, kw_only=True)
class SeedRow:
    """One row of §7.1's tables. ``active_params`` is the N that goes into ``6*N*T``;
    ``seed_printed`` is §7.1's figure labelled "bits/GFLOP" (really bits/MFLOP), if it prints one."""

    model: str
    params: float
    active_params: float
    seq: int
    vocab: int
    k: int
    bits_per_target: float | None = None
    seed_printed: float | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.active_params <= 0 or self.params < self.active_params:
            raise ValueError(
                f"SeedRow {self.model}: need 0 < active_params <= params, got {self.active_params}, {self.params}"
            )
        if self.k < 1 or self.seq < 1 or self.vocab < 2:
            raise ValueError(f"SeedRow {self.model}: need k >= 1, seq >= 1, vocab >= 2")

    @property
    def flops_per_step(self) -> float:
        return seed_flops(self.active_params, self.seq)

    @property
    def bits_per_step(self) -> float:
        return seed_bits(k=self.k, tokens=self.seq, vocab=self.vocab, bits_per_target=self.bits_per_target)

    @property
    def rho_bits_per_flop(self) -> float:
        return self.bits_per_step / self.flops_per_step

    @property
    def rho_bits_per_gflop(self) -> float:
        return self.rho_bits_per_flop * GFLOP

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "params": self.params,
            "active_params": self.active_params,
            "seq": self.seq,
            "vocab": self.vocab,
            "k": self.k,
            "flops_per_step": self.flops_per_step,
            "bits_per_step": self.bits_per_step,
            "rho_bits_per_flop": self.rho_bits_per_flop,
            "rho_bits_per_gflop": self.rho_bits_per_gflop,
            "seed_printed": self.seed_printed,
        }


def seed_rows() -> list[SeedRow]:
    """Every configuration §7.1 computes, k = 1..4 for its three models."""
    rows: list[SeedRow] = []
    printed_7b = {1: 3.71e-4, 2: 7.3e-4, 3: 1.1e-3, 4: 1.5e-3}
    for k in range(1, 5):
        rows.append(
            SeedRow(
                model="7B",
                params=7e9,
                active_params=7e9,
                seq=SEED_SEQ,
                vocab=SEED_VOCAB,
                k=k,
                seed_printed=printed_7b[k],
            )
        )
    for k in range(1, 5):
        rows.append(
            SeedRow(
                model="70B",
                params=7e10,
                active_params=7e10,
                seq=SEED_SEQ,
                vocab=SEED_VOCAB,
                k=k,
                seed_printed=3.71e-5 if k == 1 else None,
            )
        )
    printed_active = {1: 7.6e-5, 2: 1.5e-4}
    printed_full = {1: 4.2e-6}
    for label, active, printed in (
        ("DeepSeek-V3 (37B active)", 3.7e10, printed_active),
        ("DeepSeek-V3 (all 671B)", 6.71e11, printed_full),
    ):
        for k in range(1, 5):
            rows.append(
                SeedRow(
                    model=label,
                    params=6.71e11,
                    active_params=active,
                    seq=SEED_SEQ,
                    vocab=DSV3_VOCAB,
                    k=k,
                    bits_per_target=DSV3_SEED_BITS_PER_TARGET,
                    seed_printed=printed.get(k),
                    note="log2 V rounded to 17.0 as in §7.1",
                )
            )
    rows += [
        SeedRow(
            model="7B effective",
            params=7e9,
            active_params=7e9,
            seq=SEED_SEQ,
            vocab=SEED_VOCAB,
            k=1,
            bits_per_target=EFFECTIVE_BITS_PER_TARGET,
            seed_printed=7e-5,
            note="real text ~3 bits/target (§7.1's first table)",
        ),
        SeedRow(
            model="DeepSeek-V3 effective (all 671B)",
            params=6.71e11,
            active_params=6.71e11,
            seq=SEED_SEQ,
            vocab=DSV3_VOCAB,
            k=1,
            bits_per_target=EFFECTIVE_BITS_PER_TARGET,
            seed_printed=8e-7,
            note="real text ~3 bits/target (§7.1's first table)",
        ),
        SeedRow(
            model="sanity 100M",
            params=1e8,
            active_params=1e8,
            seq=SEED_SEQ,
            vocab=SEED_VOCAB,
            k=1,
            seed_printed=2.6e-2,
        ),
        SeedRow(
            model="sanity N=1 V=2",
            params=1.0,
            active_params=1.0,
            seq=SEED_SEQ,
            vocab=2,
            k=1,
            note="1/6 bit per FLOP; §7.1 agrees (it prints bits/FLOP here)",
        ),
        SeedRow(
            model="GPT-2 1.5B",
            params=1.5e9,
            active_params=1.5e9,
            seq=SEED_SEQ,
            vocab=SEED_VOCAB,
            k=1,
            seed_printed=5e-3,
            note="§7.1's era table; off by ~350x, not 10^3: matches neither unit",
        ),
    ]
    return rows


# --- model shapes for the true cost of MTP ---------------------------------------------------------


def llama2_7b_shape(*, vocab_size: int = 32_000, seq_length: int = 4096) -> ModelShape:
    """Llama-2-7B: hidden 4096, 32 layers, 32 heads (MHA), SwiGLU ffn 11008."""
    layer = LayerShape(
        attention=AttentionShape(hidden_size=4096, num_attention_heads=32),
        mlp=MLPShape(hidden_size=4096, ffn_hidden_size=11008, gated=True),
    )
    return ModelShape(
        name=f"Llama-2-7B (V={vocab_size})",
        num_layers=32,
        vocab_size=vocab_size,
        seq_length=seq_length,
        layer=layer,
    )


def deepseek_v3_shape(*, seq_length: int = 4096) -> ModelShape:
    """DeepSeek-V3 (HF config.json): 61 layers, hidden 7168, MLA, first 3 layers dense (ffn 18432),
    then 256 routed experts top-8 + 1 shared, expert ffn 2048, SwiGLU, V 129280."""
    h = 7168
    mla = MLAShape(
        hidden_size=h,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    )
    moe = MoEShape(
        hidden_size=h, num_experts=256, top_k=8, expert_ffn_hidden_size=2048, num_shared_experts=1, gated=True
    )
    return ModelShape(
        name="DeepSeek-V3",
        num_layers=61,
        vocab_size=129_280,
        seq_length=seq_length,
        layer=LayerShape(attention=mla, mlp=moe),
        num_dense_layers=3,
        dense_layer=LayerShape(attention=mla, mlp=MLPShape(hidden_size=h, ffn_hidden_size=18432, gated=True)),
    )


def benchmark_moe_shape(*, expert_ffn_hidden_size: int = 4096, gated: bool = False) -> ModelShape:
    """DESIGN.md §6 benchmark: hidden 1024, 8 layers, 16 heads, 16 experts top-2, V 50304, T 2048.

    The expert ffn size is not recorded; the default assumes Megatron-LM's defaults when neither
    ``--ffn-hidden-size`` nor ``--swiglu`` is passed: ``ffn = 4*hidden = 4096``, GeLU (not gated).
    """
    h = 1024
    moe = MoEShape(
        hidden_size=h, num_experts=16, top_k=2, expert_ffn_hidden_size=expert_ffn_hidden_size, gated=gated
    )
    act = "SwiGLU" if gated else "GeLU"
    return ModelShape(
        name=f"benchmark MoE (expert ffn {expert_ffn_hidden_size} {act})",
        num_layers=8,
        vocab_size=50_304,
        seq_length=2048,
        layer=LayerShape(attention=AttentionShape(hidden_size=h, num_attention_heads=16), mlp=moe),
    )


@dataclass(frozen=True, kw_only=True)
class MtpCost:
    """Analytic cost of MTP depths for one model shape, per token, forward (training is x3 for both
    trunk and depths, so the fractions are the same for a training step without recompute)."""

    model: str
    vocab_size: int
    trunk_flops_per_token: float
    head_flops_per_token: float
    depth_flops_per_token: float
    depth_flops_per_token_weights_only: float
    trunk_flops_per_token_weights_only: float

    @property
    def head_only_fraction(self) -> float:
        """What §7.1's "~0.2%" counts: one more head, nothing else."""
        return self.head_flops_per_token / self.trunk_flops_per_token

    @property
    def depth_fraction(self) -> float:
        """+FLOPs of one MTP depth relative to the NTP step (causal-half attention scores included)."""
        return self.depth_flops_per_token / self.trunk_flops_per_token

    @property
    def depth_fraction_weights_only(self) -> float:
        """Same without attention scores: the ``2*N`` weight matmuls ``6*N*T`` approximates."""
        return self.depth_flops_per_token_weights_only / self.trunk_flops_per_token_weights_only

    def rho_multiplier(self, num_depths: int) -> float:
        """ρ with D depths over ρ of NTP: bits x(1+D), FLOPs x(1 + D * depth_fraction)."""
        return (1 + num_depths) / (1 + num_depths * self.depth_fraction)

    @property
    def trunk_rho_bits_per_gflop(self) -> float:
        """Analytic ρ (ceiling) of the NTP step: log2 V per token over 3x forward FLOPs per token."""
        return math.log2(self.vocab_size) / (3 * self.trunk_flops_per_token) * GFLOP

    @property
    def marginal_rho_bits_per_gflop(self) -> float:
        """ρ of what one extra depth buys: its log2 V bits per token over its 3x forward FLOPs."""
        return math.log2(self.vocab_size) / (3 * self.depth_flops_per_token) * GFLOP

    def to_json(self, max_depths: int = 4) -> dict:
        return {
            "model": self.model,
            "vocab": self.vocab_size,
            "trunk_fwd_flops_per_token": self.trunk_flops_per_token,
            "mtp_depth_fwd_flops_per_token": self.depth_flops_per_token,
            "head_only_fraction": self.head_only_fraction,
            "depth_fraction": self.depth_fraction,
            "depth_fraction_weights_only": self.depth_fraction_weights_only,
            "trunk_rho_bits_per_gflop": self.trunk_rho_bits_per_gflop,
            "marginal_rho_bits_per_gflop": self.marginal_rho_bits_per_gflop,
            "rho_multiplier": {d: self.rho_multiplier(d) for d in range(1, max_depths + 1)},
        }


def mtp_cost(model: ModelShape, *, causal_half: bool = True) -> MtpCost:
    """Per-token forward FLOPs of the trunk, its head and one MTP depth, balanced routing."""
    full = model_forward_flops(model, num_tokens=1, causal_half=causal_half)
    weights = model_forward_flops(model, num_tokens=1, causal_half=causal_half, include_scores=False)
    return MtpCost(
        model=model.name,
        vocab_size=model.vocab_size,
        trunk_flops_per_token=full.trunk,
        head_flops_per_token=full.head,
        depth_flops_per_token=full.mtp_per_depth,
        depth_flops_per_token_weights_only=weights.mtp_per_depth,
        trunk_flops_per_token_weights_only=weights.trunk,
    )


def default_mtp_costs() -> list[MtpCost]:
    return [
        mtp_cost(llama2_7b_shape(vocab_size=32_000)),
        mtp_cost(llama2_7b_shape(vocab_size=SEED_VOCAB)),
        mtp_cost(deepseek_v3_shape()),
        mtp_cost(benchmark_moe_shape()),
        # The benchmark's expert ffn is not recorded; these bracket the assumption.
        mtp_cost(benchmark_moe_shape(expert_ffn_hidden_size=4096, gated=True)),
        mtp_cost(benchmark_moe_shape(expert_ffn_hidden_size=2048, gated=False)),
    ]


# --- text output -----------------------------------------------------------------------------------

SOURCE = 'Chapter 7, §7.1 "The Math: Supervisory Density per FLOP" (the multi-token-prediction chapter)'
UNITS_LINE = (
    f"Source: {SOURCE}, its 7B/70B/671B walkthrough and tables.\n"
    "Units: §7.1's bits-per-FLOP figures are right, but every figure it labels 'bits/GFLOP' is "
    "bits per MFLOP (10^3 too small); 'bits/GFLOP' below is correct, '§7.1 printed' is its figure."
)


_DSV3_HEAD_PARAMS = 7168 * 129_280


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def format_seed_table(rows: list[SeedRow]) -> str:
    header = (
        f"{'model':<34} {'N (in 6NT)':>10} {'k':>2} {'FLOPs/step':>10} {'bits/step':>10} "
        f"{'bits/FLOP':>10} {'bits/GFLOP':>11} {'§7.1 printed':>12} {'x §7.1':>7}  note"
    )
    lines = [UNITS_LINE, "", header, "-" * len(header)]
    for row in rows:
        ratio = None if row.seed_printed is None else row.rho_bits_per_gflop / row.seed_printed
        lines.append(
            f"{row.model:<34} {row.active_params:>10.3g} {row.k:>2} {row.flops_per_step:>10.3e} "
            f"{row.bits_per_step:>10,.0f} {row.rho_bits_per_flop:>10.3e} {row.rho_bits_per_gflop:>11.4g} "
            f"{_fmt(row.seed_printed):>12} {_fmt(ratio, '.0f'):>7}  {row.note}"
        )
    return "\n".join(lines)


def format_mtp_costs(costs: list[MtpCost], *, max_depths: int = 4) -> str:
    lines = [
        "True cost of MTP depths (per depth: eh_proj 2h->h + full transformer block + output head h->V;",
        "forward matmul FLOPs per token, causal attention scores counted as half of T x T).",
        "§7.1: 'an extra head costs ~0.2% FLOPs' (head weights vs all 671B params) -- it omits eh_proj",
        "and the block, and for DeepSeek-V3 measures against total rather than active parameters",
        f"(DeepSeek-V3's head: {_DSV3_HEAD_PARAMS / 1e9:.2f}B weights = {_DSV3_HEAD_PARAMS / 6.71e11:.2%} of 671B, "
        f"{_DSV3_HEAD_PARAMS / 3.7e10:.1%} of 37B active).",
        "",
    ]
    header = (
        f"{'model':<38} {'trunk GF/tok':>12} {'head only':>9} {'+1 depth':>8} {'(weights)':>9} "
        + " ".join(f"{'rho x D=' + str(d):>9}" for d in range(1, max_depths + 1))
        + f" {'rho NTP':>9} {'rho/depth':>9}"
    )
    lines += [header, "-" * len(header)]
    for c in costs:
        lines.append(
            f"{c.model:<38} {c.trunk_flops_per_token / GFLOP:>12.3f} {c.head_only_fraction:>9.2%} "
            f"{c.depth_fraction:>+8.1%} {c.depth_fraction_weights_only:>+9.1%} "
            + " ".join(f"{c.rho_multiplier(d):>9.3f}" for d in range(1, max_depths + 1))
            + f" {c.trunk_rho_bits_per_gflop:>9.4f} {c.marginal_rho_bits_per_gflop:>9.4f}"
        )
    lines += [
        "",
        "'(weights)' leaves out attention scores (the 2N weight matmuls that 6NT approximates).",
        "rho x D: rho with D MTP depths over NTP rho = (1+D)/(1+D*depth_fraction) (bits grow 1+D).",
        "rho NTP / rho/depth: bits/GFLOP (training = 3x forward) of the trunk step and of one extra depth.",
    ]
    return "\n".join(lines)
