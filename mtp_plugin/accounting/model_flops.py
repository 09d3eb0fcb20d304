"""FLOPs of a configured model: the accounting shape of a `ModelConfig` and its forward FLOPs per token.

Shared by the planner (`python -m mtp_plugin.plan`) and the training app's launch notices, which sits below
the planner: the figure is the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_plugin.accounting.flops import (
    AttentionShape,
    LayerShape,
    MLAShape,
    MLPShape,
    ModelShape,
    MoEShape,
    model_forward_flops,
)
from mtp_plugin.config import ModelConfig


def model_shape(model: ModelConfig) -> ModelShape:
    """The accounting shape of `model` (balanced routing, padded vocabulary)."""
    if model.multi_latent_attention:
        attention = MLAShape(
            hidden_size=model.hidden_size,
            num_attention_heads=model.num_attention_heads,
            q_lora_rank=model.q_lora_rank,
            kv_lora_rank=model.kv_lora_rank,
            qk_nope_head_dim=model.qk_head_dim,
            qk_rope_head_dim=model.qk_pos_emb_head_dim,
            v_head_dim=model.v_head_dim,
        )
    else:
        attention = AttentionShape(
            hidden_size=model.hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
        )
    dense = LayerShape(
        attention=attention,
        mlp=MLPShape(hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size),
    )
    if not model.is_moe:
        return ModelShape(
            name="model",
            num_layers=model.num_layers,
            vocab_size=model.padded_vocab_size,
            seq_length=model.seq_length,
            layer=dense,
        )
    moe = MoEShape(
        hidden_size=model.hidden_size,
        num_experts=model.num_experts,
        top_k=model.moe_router_topk,
        expert_ffn_hidden_size=model.expert_ffn_hidden_size,
        num_shared_experts=1 if model.moe_shared_expert_size else 0,
        shared_expert_ffn_hidden_size=model.moe_shared_expert_size or None,
    )
    return ModelShape(
        name="model",
        num_layers=model.num_layers,
        vocab_size=model.padded_vocab_size,
        seq_length=model.seq_length,
        layer=LayerShape(attention=attention, mlp=moe),
        num_dense_layers=model.first_dense_layers,
        dense_layer=dense if model.first_dense_layers else None,
    )


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token (causal-half attention scores, balanced routing, padded vocabulary)."""

    trunk: float  # trunk layers + the main head
    head: float
    mtp_per_depth: float  # eh_proj + the depth's layer + its head

    def training(self, num_depths: int) -> float:
        return 3 * (self.trunk + num_depths * self.mtp_per_depth)


def token_flops(model: ModelConfig) -> TokenFlops:
    seq = model.seq_length
    forward = model_forward_flops(model_shape(model), num_tokens=seq)
    return TokenFlops(
        trunk=forward.trunk / seq, head=forward.head / seq, mtp_per_depth=forward.mtp_per_depth / seq
    )
