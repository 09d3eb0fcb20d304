"""ρ accounting: analytic matmul FLOPs (``flops``) and the seed text's ρ tables (``seed``).

Framework-free: no Megatron, DeepSpeed or Hydra import here.
"""

from mtp_plugin.accounting.flops import (
    AttentionShape,
    ForwardFlops,
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
from mtp_plugin.accounting.seed import MtpCost, SeedRow, mtp_cost, seed_rows

__all__ = [
    "AttentionShape",
    "ForwardFlops",
    "LayerShape",
    "MLAShape",
    "MLPShape",
    "ModelShape",
    "MoEShape",
    "MtpCost",
    "SeedRow",
    "attention_projection_flops",
    "attention_score_flops",
    "linear_flops",
    "mla_projection_flops",
    "mlp_flops",
    "model_forward_flops",
    "moe_flops",
    "mtp_cost",
    "mtp_depth_flops",
    "output_head_flops",
    "seed_flops",
    "seed_rows",
    "training_flops",
    "transformer_layer_flops",
]
