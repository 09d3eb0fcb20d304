"""Map the plugin's dataclasses onto Megatron-Core's TransformerConfig, validated before any process group."""

from __future__ import annotations

import torch

from mtp_plugin.config import ModelConfig, MTPConfig, ParallelConfig
from mtp_plugin.megatron.placement import PipelinePlan, plan_pipeline


def _local_spec_builds_mla(model: ModelConfig) -> bool:
    """From megatron-core 0.19, MLA with `qk_layernorm` and no query LoRA (DeepSeek-V2-Lite) fuses a query
    norm into `linear_q_proj`, which only TransformerEngine provides (mla_qk_norm_config.py); 0.16 - 0.18
    have no query norm then. Without TE the local spec cannot build such a layer."""
    from importlib.util import find_spec

    if not (model.qk_layernorm and model.q_lora_rank is None):
        return True
    fused_query_norm = find_spec("megatron.core.transformer.mla_qk_norm_config") is not None
    return not fused_query_norm or find_spec("transformer_engine") is not None


def check_supported(
    model: ModelConfig, parallel: ParallelConfig, mtp: MTPConfig, *, pipeline_layout: str | None = None
) -> PipelinePlan:
    """Every check that can fail before `initialize_model_parallel`; returns the pipeline plan."""
    if mtp.enabled:
        mtp.check_sequence_length(model.seq_length)
    if parallel.context_parallel_size > 1 and mtp.enabled:
        raise ValueError(
            "context parallel is not supported with MTP in mtp_plugin yet (depth-k targets cross CP chunk "
            "boundaries); set parallel.context_parallel_size=1"
        )
    if model.is_moe and model.num_experts % parallel.expert_model_parallel_size:
        raise ValueError(
            f"model.num_experts={model.num_experts} is not divisible by parallel.expert_model_parallel_size="
            f"{parallel.expert_model_parallel_size}; change one of them"
        )
    if model.multi_latent_attention and not _local_spec_builds_mla(model):
        raise ValueError(
            "model.qk_layernorm=true with model.q_lora_rank=null needs TransformerEngine on megatron-core "
            ">= 0.19 (it fuses a query norm into linear_q_proj); install it, use megatron-core 0.16-0.18, "
            "or set model.qk_layernorm=false"
        )
    if model.multi_latent_attention and parallel.sequence_parallel:
        raise ValueError(
            "multi-latent attention with sequence parallel is not supported by the plugin's local spec (its "
            "latent norms would need SequenceParallelRMSNorm); set parallel.sequence_parallel=false"
        )
    if model.padded_vocab_size % parallel.tensor_model_parallel_size:
        raise ValueError(
            f"padded vocabulary {model.padded_vocab_size} is not divisible by tensor_model_parallel_size="
            f"{parallel.tensor_model_parallel_size}; change model.make_vocab_size_divisible_by"
        )
    return _plan(
        model, mtp, parallel.pipeline_model_parallel_size, pipeline_layout or parallel.pipeline_layout
    )


def _plan(model: ModelConfig, mtp: MTPConfig, pipeline_size: int, layout: str | None) -> PipelinePlan:
    return plan_pipeline(
        num_layers=model.num_layers,
        num_depths=mtp.num_depths,
        pipeline_size=pipeline_size,
        placement=mtp.placement,
        mtp_stage=mtp.mtp_stage,
        layout=layout,
    )


def plan_from_config(model: ModelConfig, mtp: MTPConfig, config) -> PipelinePlan:
    """The plan a built TransformerConfig encodes (its layout, or Megatron's default split).

    `mtp.placement=split` is planned again from the placement: the config holds only the layout given to
    Megatron (every depth on the first depth stage). An explicit split layout needs the caller's plan.
    """
    if mtp.placement == "split":
        return _plan(model, mtp, config.pipeline_model_parallel_size, None)
    layout = config.pipeline_model_parallel_layout
    if layout is not None and not isinstance(layout, str):
        # Megatron converts the string into a PipelineParallelLayerLayout in __post_init__.
        layout = "|".join(
            "".join({"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}[t.name] for t in stage[0])
            for stage in layout.layout
        )
    return _plan(model, mtp, config.pipeline_model_parallel_size, layout)


def transformer_config_from(
    model: ModelConfig,
    parallel: ParallelConfig,
    mtp: MTPConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    pipeline_layout: str | None = None,
    **overrides,
):
    """A Megatron TransformerConfig for a DeepSeek-shaped (RMSNorm, SwiGLU, RoPE, optional MoE) GPT.

    With `model.multi_latent_attention` it is Megatron's `MLATransformerConfig` (MLA and its RoPE/YaRN).
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    plan = check_supported(model, parallel, mtp, pipeline_layout=pipeline_layout)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=None if model.multi_latent_attention else model.hidden_size // model.num_attention_heads,
        qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        # Megatron's MoE with bias fails on CPU and DeepSeek-V3 has no biases in linears anyway.
        add_bias_linear=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        # D tells Megatron's pipeline machinery about the depths (final norm placement, layout, embedding
        # group); Megatron's own MTP block is never built (see model.py), so its λ is unused here.
        mtp_num_layers=mtp.num_depths or None,
        # A split plan's layout Megatron would refuse (one MTP stage); see placement.py.
        pipeline_model_parallel_layout=plan.megatron_layout,
        # Fusions that need kernels outside megatron-core (TransformerEngine, apex, compiled extensions) are off;
        # pass overrides to turn them on where those are installed.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    if parallel.recompute_granularity is not None:
        kwargs.update(
            recompute_granularity=parallel.recompute_granularity,
            recompute_method=parallel.recompute_method,
            recompute_num_layers=parallel.recompute_num_layers,
        )
        if parallel.recompute_modules:
            kwargs["recompute_modules"] = list(parallel.recompute_modules)
    if model.multi_latent_attention:
        kwargs.update(
            q_lora_rank=model.q_lora_rank,
            kv_lora_rank=model.kv_lora_rank,
            qk_head_dim=model.qk_head_dim,
            qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
            v_head_dim=model.v_head_dim,
            rope_type=model.rope_type,
            rotary_base=model.rotary_base,
            rotary_scaling_factor=model.rotary_scaling_factor,
            original_max_position_embeddings=model.original_max_position_embeddings,
            beta_fast=model.beta_fast,
            beta_slow=model.beta_slow,
            mscale=model.mscale,
            mscale_all_dim=model.mscale_all_dim,
        )
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_size or None,
            moe_layer_freq=[0] * model.first_dense_layers
            + [1] * (model.num_layers - model.first_dense_layers),
            moe_token_dispatcher_type=model.moe_token_dispatcher_type,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type=model.load_balancing_type,
            moe_router_score_function=model.moe_router_score_function,
            moe_router_pre_softmax=model.moe_router_pre_softmax,
            moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=model.moe_router_bias_update_rate,
            moe_router_num_groups=model.moe_router_num_groups,
            moe_router_group_topk=model.moe_router_group_topk,
            moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
            moe_router_dtype=model.moe_router_dtype,
            moe_grouped_gemm=False,
        )
    kwargs.update(overrides)
    config_cls = MLATransformerConfig if model.multi_latent_attention else TransformerConfig
    return config_cls(**kwargs)
