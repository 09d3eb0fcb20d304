"""Analytic matmul FLOPs against torch's FlopCounterMode on small real modules.

FlopCounterMode counts the full (non-causal) T x T attention matmuls, so attention here is compared
with ``causal_half=False``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtp_plugin.accounting.flops import (
    AttentionShape,
    LayerShape,
    MLAShape,
    MLPShape,
    ModelShape,
    MoEShape,
    attention_projection_flops,
    attention_score_flops,
    linear_flops,
    mla_projection_flops,
    mlp_flops,
    model_forward_flops,
    moe_flops,
    mtp_depth_flops,
    output_head_flops,
    seed_flops,
    training_flops,
    transformer_layer_flops,
)

B, T = 2, 12  # batch, sequence length
H = 32  # hidden
V = 97  # vocabulary


def measured(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def assert_same_flops(analytic: int, measured_flops: int) -> None:
    """Exactly equal: every matmul is counted, so a dropped one (e.g. the MoE router, 0.8-1.8% of a
    layer's total) is a failure, not a rounding error."""
    assert measured_flops > 0
    assert analytic == measured_flops, (analytic, measured_flops, analytic - measured_flops)


# --- reference modules: plain nn.Linear + explicit attention matmuls (no SDPA) ---------------------


class GQAAttention(nn.Module):
    def __init__(self, shape: AttentionShape):
        super().__init__()
        self.shape = shape
        d = shape.head_dim
        self.q = nn.Linear(shape.hidden_size, shape.num_attention_heads * d, bias=False)
        self.k = nn.Linear(shape.hidden_size, shape.num_query_groups * d, bias=False)
        self.v = nn.Linear(shape.hidden_size, shape.num_query_groups * d, bias=False)
        self.o = nn.Linear(shape.num_attention_heads * d, shape.hidden_size, bias=False)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_btd.shape
        s = self.shape
        q_bnth = self.q(x_btd).view(b, t, s.num_attention_heads, s.head_dim).transpose(1, 2)
        k_bgth = self.k(x_btd).view(b, t, s.num_query_groups, s.head_dim).transpose(1, 2)
        v_bgth = self.v(x_btd).view(b, t, s.num_query_groups, s.head_dim).transpose(1, 2)
        rep = s.num_attention_heads // s.num_query_groups
        k_bnth = k_bgth.repeat_interleave(rep, dim=1)
        v_bnth = v_bgth.repeat_interleave(rep, dim=1)
        return self.o(_causal_attention(q_bnth, k_bnth, v_bnth).transpose(1, 2).reshape(b, t, -1))


def _causal_attention(q_bnth, k_bnth, v_bnth_v):
    t = q_bnth.shape[2]
    scores_bntt = q_bnth @ k_bnth.transpose(-1, -2) / math.sqrt(q_bnth.shape[-1])
    mask_tt = torch.ones(t, t, dtype=torch.bool).triu(1)
    probs_bntt = scores_bntt.masked_fill(mask_tt, float("-inf")).softmax(-1)
    return probs_bntt @ v_bnth_v


class MLA(nn.Module):
    def __init__(self, s: MLAShape):
        super().__init__()
        self.s = s
        n = s.num_attention_heads
        self.q_a = nn.Linear(s.hidden_size, s.q_lora_rank, bias=False)
        self.q_b = nn.Linear(s.q_lora_rank, n * s.qk_head_dim, bias=False)
        self.kv_a = nn.Linear(s.hidden_size, s.kv_lora_rank + s.qk_rope_head_dim, bias=False)
        self.kv_b = nn.Linear(s.kv_lora_rank, n * (s.qk_nope_head_dim + s.v_head_dim), bias=False)
        self.o = nn.Linear(n * s.v_head_dim, s.hidden_size, bias=False)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_btd.shape
        s, n = self.s, self.s.num_attention_heads
        q_bnth = self.q_b(self.q_a(x_btd)).view(b, t, n, s.qk_head_dim).transpose(1, 2)
        kv_a = self.kv_a(x_btd)
        latent, k_rope_btr = kv_a.split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)
        kv = self.kv_b(latent).view(b, t, n, s.qk_nope_head_dim + s.v_head_dim).transpose(1, 2)
        k_nope, v_bntv = kv.split([s.qk_nope_head_dim, s.v_head_dim], dim=-1)
        k_rope = k_rope_btr.unsqueeze(1).expand(b, n, t, s.qk_rope_head_dim)
        k_bnth = torch.cat([k_nope, k_rope], dim=-1)
        return self.o(_causal_attention(q_bnth, k_bnth, v_bntv).transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, s: MLPShape):
        super().__init__()
        self.gated = s.gated
        self.up = nn.Linear(s.hidden_size, s.ffn_hidden_size, bias=False)
        self.gate = nn.Linear(s.hidden_size, s.ffn_hidden_size, bias=False) if s.gated else None
        self.down = nn.Linear(s.ffn_hidden_size, s.hidden_size, bias=False)

    def forward(self, x):
        if self.gated:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Module):
    """Router + experts, with the routing fixed by ``expert_idx_nk`` so the work is known."""

    def __init__(self, s: MoEShape, expert_idx_nk: torch.Tensor):
        super().__init__()
        self.router = nn.Linear(s.hidden_size, s.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(s.expert_mlp()) for _ in range(s.num_experts))
        self.shared = nn.ModuleList(MLP(s.shared_mlp()) for _ in range(s.num_shared_experts))
        self.expert_idx_nk = expert_idx_nk

    def forward(self, x_btd):
        x_nd = x_btd.reshape(-1, x_btd.shape[-1])
        weights_nk = self.router(x_nd).softmax(-1).gather(1, self.expert_idx_nk)
        out_nd = torch.zeros_like(x_nd)
        for e, expert in enumerate(self.experts):
            tok, slot = (self.expert_idx_nk == e).nonzero(as_tuple=True)
            if tok.numel():
                out_nd.index_add_(0, tok, expert(x_nd[tok]) * weights_nk[tok, slot, None])
        for shared in self.shared:
            out_nd = out_nd + shared(x_nd)
        return out_nd.view_as(x_btd)


class Layer(nn.Module):
    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(H), nn.RMSNorm(H)
        self.attn, self.mlp = attn, mlp

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MTPDepth(nn.Module):
    """DESIGN.md §2: eh_proj(concat(enorm(emb), hnorm(h))) -> block -> head(norm(.))."""

    def __init__(self, block: nn.Module, head: nn.Linear):
        super().__init__()
        self.enorm, self.hnorm, self.final_norm = nn.RMSNorm(H), nn.RMSNorm(H), nn.RMSNorm(H)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.block, self.head = block, head

    def forward(self, emb_btd, h_btd):
        h = self.block(self.eh_proj(torch.cat([self.enorm(emb_btd), self.hnorm(h_btd)], dim=-1)))
        return self.head(self.final_norm(h))


# --- shapes ---------------------------------------------------------------------------------------

GQA = AttentionShape(hidden_size=H, num_attention_heads=4, num_query_groups=2)
MLA_SHAPE = MLAShape(
    hidden_size=H,
    num_attention_heads=4,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=6,
)
SWIGLU = MLPShape(hidden_size=H, ffn_hidden_size=48, gated=True)
GELU = MLPShape(hidden_size=H, ffn_hidden_size=48, gated=False)
MOE = MoEShape(hidden_size=H, num_experts=4, top_k=2, expert_ffn_hidden_size=24, num_shared_experts=1)


def fixed_routing(num_tokens: int, shape: MoEShape) -> torch.Tensor:
    """Deliberately unbalanced: token i goes to expert 0 and to expert 1 + i % 2 (expert 3 idle)."""
    i = torch.arange(num_tokens)
    return torch.stack([torch.zeros_like(i), 1 + i % 2], dim=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def x_btd() -> torch.Tensor:
    return torch.randn(B, T, H)


# --- per-module comparisons -----------------------------------------------------------------------


def test_gqa_attention_projections_and_scores_match_flop_counter():
    attn = GQAAttention(GQA)
    n = B * T
    analytic = attention_projection_flops(GQA, n) + attention_score_flops(
        GQA, num_tokens=n, seq_length=T, causal_half=False
    )
    assert_same_flops(analytic, measured(attn, x_btd()))


def test_mla_projections_and_scores_match_flop_counter():
    attn = MLA(MLA_SHAPE)
    n = B * T
    analytic = mla_projection_flops(MLA_SHAPE, n) + attention_score_flops(
        MLA_SHAPE, num_tokens=n, seq_length=T, causal_half=False
    )
    assert_same_flops(analytic, measured(attn, x_btd()))


@pytest.mark.parametrize("shape", [SWIGLU, GELU], ids=["swiglu", "gelu"])
def test_dense_mlp_matches_flop_counter(shape):
    assert_same_flops(mlp_flops(shape, B * T), measured(MLP(shape), x_btd()))


def test_dense_transformer_layer_matches_flop_counter():
    layer_shape = LayerShape(attention=GQA, mlp=SWIGLU)
    layer = Layer(GQAAttention(GQA), MLP(SWIGLU))
    analytic = transformer_layer_flops(layer_shape, num_tokens=B * T, seq_length=T, causal_half=False)
    assert_same_flops(analytic, measured(layer, x_btd()))


def test_moe_layer_with_fixed_routing_matches_flop_counter():
    n = B * T
    idx_nk = fixed_routing(n, MOE)
    tokens_per_expert = torch.bincount(idx_nk.flatten(), minlength=MOE.num_experts).tolist()
    assert tokens_per_expert == [n, n // 2, n // 2, 0]
    got = measured(MoE(MOE, idx_nk), x_btd())
    assert_same_flops(moe_flops(MOE, num_tokens=n, tokens_per_expert=tokens_per_expert), got)
    # No drops: the per-expert vector sums to n * top_k, the same as the balanced default.
    assert moe_flops(MOE, num_tokens=n) == moe_flops(MOE, num_tokens=n, tokens_per_expert=tokens_per_expert)
    # A rank holding only experts 0 and 3 counts the router, its experts' tokens and the shared expert.
    local = moe_flops(MOE, num_tokens=n, tokens_per_expert=[n, 0])
    assert local == linear_flops(n, H, 4) + 6 * n * H * 24 + 6 * n * H * 24


def test_mtp_depth_with_moe_block_matches_flop_counter():
    n = B * T
    idx_nk = fixed_routing(n, MOE)
    tokens_per_expert = torch.bincount(idx_nk.flatten(), minlength=MOE.num_experts).tolist()
    head = nn.Linear(H, V, bias=False)
    depth = MTPDepth(Layer(MLA(MLA_SHAPE), MoE(MOE, idx_nk)), head)
    analytic = mtp_depth_flops(
        LayerShape(attention=MLA_SHAPE, mlp=MOE),
        vocab_size=V,
        num_tokens=n,
        seq_length=T,
        causal_half=False,
        tokens_per_expert=tokens_per_expert,
    )
    assert_same_flops(analytic, measured(depth, x_btd(), x_btd()))


def test_output_head_matches_flop_counter():
    head = nn.Linear(H, V, bias=False)
    assert_same_flops(
        output_head_flops(hidden_size=H, vocab_size=V, num_tokens=B * T), measured(head, x_btd())
    )


def test_training_flops_is_three_forwards_plus_recompute():
    layer = Layer(GQAAttention(GQA), MLP(SWIGLU))
    x = x_btd().requires_grad_(True)  # so the first matmul's activation gradient is computed too
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    fwd = transformer_layer_flops(
        LayerShape(attention=GQA, mlp=SWIGLU), num_tokens=B * T, seq_length=T, causal_half=False
    )
    assert_same_flops(training_flops(fwd), counter.get_total_flops())
    assert training_flops(100, recomputed_forward_flops=40) == 340
    with pytest.raises(ValueError, match="recomputed"):
        training_flops(10, recomputed_forward_flops=11)


# --- conventions and pure arithmetic --------------------------------------------------------------


def test_causal_half_halves_scores_only():
    full = attention_score_flops(GQA, num_tokens=100, seq_length=64, causal_half=False)
    half = attention_score_flops(GQA, num_tokens=100, seq_length=64, causal_half=True)
    assert full == 2 * half == 100 * 2 * 64 * 4 * (8 + 8)
    layer = LayerShape(attention=GQA, mlp=SWIGLU)
    diff = transformer_layer_flops(layer, num_tokens=100, seq_length=64, causal_half=False) - (
        transformer_layer_flops(layer, num_tokens=100, seq_length=64, causal_half=True)
    )
    assert diff == half


def test_weights_only_model_flops_are_two_n_active():
    """Without scores, forward FLOPs per token are 2 x (active matmul weights): the 6NT premise."""
    layer = LayerShape(attention=GQA, mlp=MOE)
    model = ModelShape(name="toy", num_layers=3, vocab_size=V, seq_length=T, layer=layer)
    attn_w = H * 4 * 8 + 2 * H * 2 * 8 + 4 * 8 * H
    moe_active_w = H * 4 + (2 + 1) * 3 * H * 24
    n_active = 3 * (attn_w + moe_active_w) + H * V
    flops = model_forward_flops(model, num_tokens=1, include_scores=False)
    assert flops.trunk == 2 * n_active
    assert flops.with_depths(2) == flops.trunk + 2 * flops.mtp_per_depth
    assert flops.mtp_per_depth == 2 * (2 * H * H + attn_w + moe_active_w + H * V)
    assert 3 * flops.trunk * T == seed_flops(n_active, T)


def test_seed_flops():
    assert seed_flops(7e9, 4096) == pytest.approx(1.72032e14)


@pytest.mark.parametrize(
    ("ctor", "kwargs", "match"),
    [
        (AttentionShape, {"hidden_size": 30, "num_attention_heads": 4}, "head_dim"),
        (AttentionShape, {"hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 3}, "multiple"),
        (AttentionShape, {"hidden_size": 0, "num_attention_heads": 4}, "positive"),
        (MLPShape, {"hidden_size": 8, "ffn_hidden_size": -1}, "ffn_hidden_size"),
        (MoEShape, {"hidden_size": 8, "num_experts": 2, "top_k": 3, "expert_ffn_hidden_size": 8}, "top_k"),
        (
            MoEShape,
            {
                "hidden_size": 8,
                "num_experts": 2,
                "top_k": 1,
                "expert_ffn_hidden_size": 8,
                "num_shared_experts": -1,
            },
            "num_shared_experts",
        ),
    ],
)
def test_shapes_reject_bad_values_with_a_fix(ctor, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ctor(**kwargs)


def test_shapes_are_keyword_only_and_layer_checks_hidden_size():
    with pytest.raises(TypeError):
        MLPShape(8, 16)  # type: ignore[misc]
    with pytest.raises(ValueError, match="hidden_size"):
        LayerShape(attention=GQA, mlp=MLPShape(hidden_size=H + 1, ffn_hidden_size=8))
    with pytest.raises(ValueError, match="dense_layer"):
        ModelShape(
            name="x",
            num_layers=2,
            vocab_size=V,
            seq_length=T,
            layer=LayerShape(attention=GQA, mlp=MOE),
            num_dense_layers=1,
        )
    with pytest.raises(ValueError, match="dense layer"):
        transformer_layer_flops(
            LayerShape(attention=GQA, mlp=SWIGLU),
            num_tokens=1,
            seq_length=1,
            causal_half=True,
            tokens_per_expert=[1],
        )
