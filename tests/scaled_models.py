"""The shipped model configs (`mtp_plugin/hydra_configs/model/*.yaml`), scaled down for CPU tests.

`shipped_model_names()` lists the YAML files, so a config added later is picked up without editing a
test. `scaled_model_config(name)` composes `model=<name>` through the product's Hydra path
(`hydra_app.to_experiment`, the dataclass the YAML fills) and shrinks the sizes while keeping the
structure: SwiGLU and RMSNorm (those come from `transformer_config_from`), dense first layers then MoE,
shared experts, grouped-query attention (the heads-per-group ratio), multi-head latent attention (with
or without the q LoRA), YaRN, the router's rule (softmax/sigmoid, expert bias, node-limited groups,
scaling, balancing loss), a padded vocabulary, tied or untied head, init and RoPE settings.

`SCALE_RULES` holds one rule per `ModelConfig` field: `KEEP`, a constant, or a function of the
shipped config. A field without a rule is an error, so a new field (MLA ranks, a router score
function, ...) must be given one here before any parity test runs with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mtp_plugin.config import ModelConfig

KEEP = object()  # the shipped value, unchanged

HIDDEN, HEADS, FFN, EXPERT_FFN = 32, 4, 64, 16
NUM_EXPERTS, MAX_TOPK, NUM_GROUPS = 4, 2, 2
Q_LORA, KV_LORA, QK_HEAD, QK_ROPE_HEAD, V_HEAD = 16, 16, 8, 4, 8
SEQ_LENGTH, VOCAB, VOCAB_DIVISOR = 16, 90, 32  # 90 ids padded to 96: the padding is kept too


def _first_dense_layers(cfg: ModelConfig) -> int:
    return min(cfg.first_dense_layers, 1) if cfg.is_moe else cfg.first_dense_layers


def _num_layers(cfg: ModelConfig) -> int:
    # MoE: the dense first layer(s), then one MoE layer, which is also the MTP depths' layer spec.
    return _first_dense_layers(cfg) + 1 if cfg.is_moe else 2


def _num_query_groups(cfg: ModelConfig) -> int | None:
    if cfg.num_query_groups is None:
        return None
    heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
    return max(1, HEADS // heads_per_group)


def _shared_expert_size(cfg: ModelConfig) -> int:
    # DeepSeek sizes the shared expert in routed-expert widths: keep that ratio.
    if not cfg.moe_shared_expert_size:
        return 0
    return max(1, round(EXPERT_FFN * cfg.moe_shared_expert_size / cfg.expert_ffn_hidden_size))


def _group_topk(cfg: ModelConfig) -> int | None:
    # Node-limited routing: the same fraction of groups (V3: 4 of 8 -> 1 of 2).
    if cfg.moe_router_num_groups is None:
        return None
    return max(1, NUM_GROUPS * cfg.moe_router_group_topk // cfg.moe_router_num_groups)


SCALE_RULES: dict[str, Any] = {
    "num_layers": _num_layers,
    "hidden_size": HIDDEN,
    "num_attention_heads": HEADS,
    "num_query_groups": _num_query_groups,
    "ffn_hidden_size": FFN,
    "seq_length": SEQ_LENGTH,
    "vocab_size": VOCAB,
    "make_vocab_size_divisible_by": VOCAB_DIVISOR,
    "num_experts": lambda cfg: NUM_EXPERTS if cfg.is_moe else 0,
    "moe_router_topk": lambda cfg: min(cfg.moe_router_topk, MAX_TOPK),
    "moe_ffn_hidden_size": lambda cfg: None if cfg.moe_ffn_hidden_size is None else EXPERT_FFN,
    "moe_shared_expert_size": _shared_expert_size,
    "first_dense_layers": _first_dense_layers,
    "moe_aux_loss_coeff": KEEP,
    # Only moves tokens between expert-parallel ranks (none here); alltoall needs CUDA streams.
    "moe_token_dispatcher_type": "allgather",
    "untie_embeddings_and_output_weights": KEEP,
    "init_method_std": KEEP,
    "rotary_base": KEEP,
    "hidden_dropout": KEEP,
    "attention_dropout": KEEP,
    # Multi-head latent attention: narrower latents and heads (the q LoRA kept or left out as shipped).
    "multi_latent_attention": KEEP,
    "q_lora_rank": lambda cfg: None if cfg.q_lora_rank is None else Q_LORA,
    "kv_lora_rank": KV_LORA,
    "qk_head_dim": QK_HEAD,
    "qk_pos_emb_head_dim": QK_ROPE_HEAD,
    "v_head_dim": V_HEAD,
    "qk_layernorm": KEEP,
    # YaRN: the shipped frequencies and scales.
    "rope_type": KEEP,
    "rotary_scaling_factor": KEEP,
    "original_max_position_embeddings": KEEP,
    "beta_fast": KEEP,
    "beta_slow": KEEP,
    "mscale": KEEP,
    "mscale_all_dim": KEEP,
    # Routing: the shipped rule (score function, bias, scaling, balancing loss, dtype), fewer groups.
    "moe_router_score_function": KEEP,
    "moe_router_pre_softmax": KEEP,
    "moe_router_enable_expert_bias": KEEP,
    "moe_router_bias_update_rate": KEEP,
    "moe_router_num_groups": lambda cfg: None if cfg.moe_router_num_groups is None else NUM_GROUPS,
    "moe_router_group_topk": _group_topk,
    "moe_router_topk_scaling_factor": KEEP,
    "moe_router_load_balancing_type": KEEP,
    "moe_router_dtype": KEEP,
}


def shipped_model_names() -> list[str]:
    """The options of the shipped `model/` group, from the files."""
    from mtp_plugin.train.hydra_app import CONFIG_DIR

    return sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))


def shipped_model_config(name: str) -> ModelConfig:
    """`model=<name>` composed with the shipped config.yaml and turned into the dataclasses, as a run does."""
    from hydra import compose, initialize_config_dir

    from mtp_plugin.train import hydra_app

    hydra_app.register_configs()
    with initialize_config_dir(config_dir=str(hydra_app.CONFIG_DIR), version_base="1.3", job_name="scaled"):
        cfg = compose(config_name=hydra_app.CONFIG_NAME, overrides=[f"model={name}"])
    return hydra_app.to_experiment(cfg).model


def scale_down(cfg: ModelConfig, **overrides: Any) -> ModelConfig:
    """`cfg` with every field set by its `SCALE_RULES` rule, then `overrides`."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    missing = sorted(fields - SCALE_RULES.keys())
    if missing:
        raise KeyError(f"ModelConfig fields without a scale rule: {missing}; add them to SCALE_RULES")
    values = {}
    for name in sorted(fields):
        rule = SCALE_RULES[name]
        if rule is KEEP:
            values[name] = getattr(cfg, name)
        elif callable(rule):
            values[name] = rule(cfg)
        else:
            values[name] = rule
    return ModelConfig(**{**values, **overrides})


def scaled_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The shipped model config `name`, scaled down for CPU (module docstring)."""
    return scale_down(shipped_model_config(name), **overrides)


def scaled_model_overrides(name: str, **overrides: Any) -> list[str]:
    """`scaled_model_config(name, **overrides)` as Hydra command-line overrides (`model=<name>` and each
    field that differs from the shipped config), for the app and the planner."""
    shipped = shipped_model_config(name)
    scaled = scale_down(shipped, **overrides)
    out = [f"model={name}"]
    for f in dataclasses.fields(ModelConfig):
        value = getattr(scaled, f.name)
        if value != getattr(shipped, f.name):
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            out.append(f"model.{f.name}={text}")
    return out


def local_spec_cannot_build(name: str) -> bool:
    """The shipped configs this megatron-core refuses without TransformerEngine: MLA with qk_layernorm and
    no q LoRA (deepseek_v2_lite) on >= 0.19 (`check_supported` says so in one line)."""
    from importlib.metadata import version

    from packaging.version import Version

    cfg = shipped_model_config(name)
    newer = Version(version("megatron-core")).release[:2] >= (0, 19)
    return newer and cfg.multi_latent_attention and cfg.qk_layernorm and cfg.q_lora_rank is None
