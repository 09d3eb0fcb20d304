"""The Hugging Face DeepSeek-V3 layout of a plugin model: config.json and the tensor names.

DeepSeek-V3's published checkpoint (and vLLM's `deepseek_mtp` / SGLang's NextN loaders) keep the trunk at
`model.layers.0 .. L-1` and MTP depth k at `model.layers.{L+k-1}`: `enorm`, `hnorm`, `eh_proj`, the
depth's decoder block (`input_layernorm`, `self_attn.*`, `post_attention_layernorm`, `mlp.*`),
`shared_head.norm` (the depth's final norm) and copies of the shared `embed_tokens` and `shared_head.head`.

Megatron side: the keys of the plugin's `dist_checkpointing` checkpoints (`MTPGPTModel.sharded_state_dict`),
which are global (the same names and full shapes at every tp / pp / ep layout): `decoder.layers.{i}.*`,
`mtp_stack.depths.{k-1}.{enorm,hnorm,eh_proj.linear,final_norm}`, `mtp_stack.depths.{k-1}.block.layer.*`,
routed experts stacked as `mlp.experts.experts.linear_fc{1,2}.weight` [E, ...], gated fc1 as [gate; up].

`RULES` is one table read in both directions (export and import), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from mtp_plugin.config import ModelConfig

MODEL_TYPE = "deepseek_v3"
NORM_EPS = 1e-6  # the plugin's RMSNorm epsilon (mtp_plugin.megatron.config: layernorm_epsilon)


class UnsupportedModel(ValueError):
    """The model has a field no Hugging Face layout with MTP layers expresses (the message names it)."""


def check_exportable(model: ModelConfig) -> None:
    """Raise UnsupportedModel naming the first field DeepSeek-V3's layout cannot express."""

    def refuse(field: str, why: str) -> None:
        raise UnsupportedModel(f"model.{field}={getattr(model, field)!r}: {why}")

    if not model.multi_latent_attention:
        # The closest layout with MTP layers under the same names for grouped-query attention is GLM-4.5's
        # glm4_moe, whose router is sigmoid with the correction bias as DeepSeek-V3's.
        if model.moe_router_score_function == "sigmoid":
            why = (
                "grouped-query attention with sigmoid routing would be GLM-4.5's glm4_moe layout, which this "
            )
            why += "converter does not write yet"
        else:
            why = (
                "the closest layout with MTP layers for grouped-query attention (GLM-4.5's glm4_moe) routes "
            )
            why += f"with sigmoid scores, not {model.moe_router_score_function}"
        refuse("multi_latent_attention", f"the DeepSeek-V3 layout needs multi-head latent attention; {why}")
    if not model.is_moe:
        refuse("num_experts", "the DeepSeek-V3 layout has MoE layers after first_k_dense_replace")
    if model.moe_router_score_function != "sigmoid":
        refuse(
            "moe_router_score_function",
            "DeepSeek-V3 (and glm4_moe) route with sigmoid scores and the e_score_correction_bias; "
            "softmax routing has no Hugging Face layout with MTP layers",
        )
    if not model.qk_layernorm:
        refuse("qk_layernorm", "DeepSeek-V3 always normalises its latents (q_a_layernorm, kv_a_layernorm)")
    if not model.moe_shared_expert_size or model.moe_shared_expert_size % model.expert_ffn_hidden_size:
        refuse(
            "moe_shared_expert_size",
            f"DeepSeek-V3 counts shared experts of moe_intermediate_size={model.expert_ffn_hidden_size}; "
            "it must be a positive multiple of that",
        )
    groups = model.moe_router_num_groups or 1
    if groups > 1 and model.moe_router_topk // model.moe_router_group_topk != 2:
        refuse(
            "moe_router_group_topk",
            f"Megatron scores an expert group by its top moe_router_topk / moe_router_group_topk = "
            f"{model.moe_router_topk // model.moe_router_group_topk} experts, DeepSeek-V3's layout (transformers, "
            "vLLM, SGLang) by its top 2; set them so that the ratio is 2 (V3: 8 / 4)",
        )
    if model.num_experts // groups < 2:
        refuse("moe_router_num_groups", "DeepSeek-V3's layout needs at least 2 experts per group")


def hf_config(model: ModelConfig, num_depths: int, *, dtype: torch.dtype) -> dict:
    """config.json of DeepseekV3ForCausalLM for `model` with `num_depths` MTP layers."""
    check_exportable(model)
    rope_scaling = None
    max_positions = model.seq_length
    if model.rope_type == "yarn":
        rope_scaling = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": float(model.rotary_scaling_factor),
            "original_max_position_embeddings": model.original_max_position_embeddings,
            "beta_fast": float(model.beta_fast),
            "beta_slow": float(model.beta_slow),
            "mscale": float(model.mscale),
            "mscale_all_dim": float(model.mscale_all_dim),
        }
        max_positions = max(
            model.seq_length, int(model.original_max_position_embeddings * model.rotary_scaling_factor)
        )
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": model.padded_vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "moe_intermediate_size": model.expert_ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_nextn_predict_layers": num_depths,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_attention_heads,
        "n_shared_experts": model.moe_shared_expert_size // model.expert_ffn_hidden_size,
        "n_routed_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "routed_scaling_factor": float(model.moe_router_topk_scaling_factor or 1.0),
        "n_group": model.moe_router_num_groups or 1,
        "topk_group": model.moe_router_group_topk or 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        # Megatron normalises the chosen sigmoid scores only when it picks more than one expert.
        "norm_topk_prob": model.moe_router_topk > 1,
        "first_k_dense_replace": model.first_dense_layers,
        "moe_layer_freq": 1,
        "ep_size": 1,
        "kv_lora_rank": model.kv_lora_rank,
        "q_lora_rank": model.q_lora_rank,
        "qk_nope_head_dim": model.qk_head_dim,
        "qk_rope_head_dim": model.qk_pos_emb_head_dim,
        "v_head_dim": model.v_head_dim,
        "head_dim": model.qk_pos_emb_head_dim,
        # Megatron's MLA de-interleaves the RoPE channels before rotating (rope_utils, multi_latent_attention).
        "rope_interleave": True,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_positions,
        "hidden_act": "silu",
        "rms_norm_eps": NORM_EPS,
        "attention_bias": False,
        "attention_dropout": model.attention_dropout,
        "initializer_range": model.init_method_std,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def expected_hf_fields(model: ModelConfig, config: dict) -> dict[str, object]:
    """The config.json values `model` implies, for every key whose value `config` must match."""
    expected = hf_config(model, config.get("num_nextn_predict_layers", 0), dtype=torch.float32)
    skip = {"torch_dtype", "num_nextn_predict_layers", "use_cache", "architectures", "initializer_range"}
    skip |= {"attention_dropout", "max_position_embeddings", "head_dim", "pretraining_tp", "ep_size"}
    return {k: v for k, v in expected.items() if k not in skip}


# transformers' DeepseekV3Config defaults for keys a published config.json may leave out (DeepSeek-V3's own
# config.json has no rope_interleave: its weights are interleaved, as Megatron's MLA reads them).
HF_DEFAULTS = {
    "rope_interleave": True,
    "attention_bias": False,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "q_lora_rank": None,
    "moe_layer_freq": 1,
}


def config_differences(model: ModelConfig, config: dict) -> list[str]:
    """ "hidden_size=256 (the run's model implies 128)" for each config.json field that differs from what
    `model` implies."""
    out = []
    for key, want in expected_hf_fields(model, config).items():
        have = config.get(key, HF_DEFAULTS.get(key))
        if key == "rope_scaling" and isinstance(have, dict) and isinstance(want, dict):
            have = {k: have.get(k) for k in want if k not in ("type", "rope_type")}
            want = {k: v for k, v in want.items() if k not in ("type", "rope_type")}
        if isinstance(want, float) and isinstance(have, int | float):
            same = abs(float(have) - want) <= 1e-9 * max(1.0, abs(want))
        else:
            same = have == want
        if not same:
            out.append(f"{key}={have!r} (the run's model implies {want!r})")
    return out


# ----------------------------------------------------------------------------------- the name table


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor (suffix under a layer prefix) and its Hugging Face tensor(s).

    kind: "copy" (one to one), "glu" (Megatron's [gate; up] fc1 -> gate_proj, up_proj), "experts" (the
    stacked [E, ...] tensor -> one tensor per expert, `{e}` in the HF name), "experts_glu" (both).
    """

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"


def _attention_rules(model: ModelConfig) -> list[Rule]:
    rules = [
        Rule("input_layernorm.weight", ("input_layernorm.weight",)),
        Rule("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",)),
        Rule("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",)),
        Rule("self_attention.linear_kv_up_proj.weight", ("self_attn.kv_b_proj.weight",)),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    ]
    if model.q_lora_rank is None:
        rules.append(Rule("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",)))
    else:
        rules += [
            Rule("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",)),
            Rule("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",)),
            Rule("self_attention.linear_q_up_proj.weight", ("self_attn.q_b_proj.weight",)),
        ]
    return rules


DENSE_MLP = [
    Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
]
MOE_MLP = [
    Rule("mlp.router.weight", ("mlp.gate.weight",)),
    Rule("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",)),
    Rule(
        "mlp.experts.experts.linear_fc1.weight",
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        "experts_glu",
    ),
    Rule("mlp.experts.experts.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), "experts"),
    Rule(
        "mlp.shared_experts.linear_fc1.weight",
        ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
        "glu",
    ),
    Rule("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_experts.down_proj.weight",)),
]
DEPTH_EXTRAS = [
    Rule("enorm.weight", ("enorm.weight",)),
    Rule("hnorm.weight", ("hnorm.weight",)),
    Rule("eh_proj.linear.weight", ("eh_proj.weight",)),
    Rule("final_norm.weight", ("shared_head.norm.weight",)),
]
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
# HF names of the shared embedding, final norm and head; every MTP layer holds copies of the embedding and
# head under its own prefix (DeepSeek-V3's checkpoint does; vLLM and SGLang read them there).
HF_EMBED, HF_HEAD, HF_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
HF_DEPTH_EMBED, HF_DEPTH_HEAD = "embed_tokens.weight", "shared_head.head.weight"


@dataclass(frozen=True)
class Unit:
    """What the export streams as one piece: a layer's Megatron prefix, its HF prefix and its rules."""

    name: str
    megatron_prefix: str
    hf_prefix: str
    rules: tuple[Rule, ...]
    depth: int = 0  # 1..D for an MTP depth, 0 otherwise


def units(model: ModelConfig, num_depths: int) -> list[Unit]:
    """The trunk layers, the top-level tensors and the MTP depths, in the order they are written."""
    attention = _attention_rules(model)
    out = [
        Unit(
            f"layer {i}",
            f"decoder.layers.{i}.",
            f"model.layers.{i}.",
            tuple(attention + (DENSE_MLP if i < model.first_dense_layers else MOE_MLP)),
        )
        for i in range(model.num_layers)
    ]
    top = [Rule(EMBEDDING, (HF_EMBED,)), Rule(FINAL_NORM, (HF_NORM,)), Rule(OUTPUT, (HF_HEAD,))]
    if not model.untie_embeddings_and_output_weights:
        top = top[:2]
    out.append(Unit("embedding, final norm, head", "", "", tuple(top)))
    # Every depth's block is built from the trunk's last-layer spec, which is MoE (check_exportable).
    for k in range(1, num_depths + 1):
        layer_rules = tuple(Rule(f"block.layer.{r.megatron}", r.hf, r.kind) for r in attention + MOE_MLP)
        out.append(
            Unit(
                f"MTP depth {k}",
                f"mtp_stack.depths.{k - 1}.",
                f"model.layers.{model.num_layers + k - 1}.",
                tuple(DEPTH_EXTRAS) + layer_rules,
                depth=k,
            )
        )
    return out


def head_name(model: ModelConfig) -> str:
    """The Megatron tensor the output head reads (the embedding when tied)."""
    return OUTPUT if model.untie_embeddings_and_output_weights else EMBEDDING


def to_hf(rule: Rule, hf_prefix: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of one Megatron tensor."""
    if rule.kind == "copy":
        yield hf_prefix + rule.hf[0], tensor
    elif rule.kind == "glu":
        for name, part in zip(rule.hf, tensor.chunk(2, dim=0)):
            yield hf_prefix + name, part
    else:
        for e, expert in enumerate(tensor.unbind(0)):
            parts = expert.chunk(2, dim=0) if rule.kind == "experts_glu" else (expert,)
            for name, part in zip(rule.hf, parts):
                yield hf_prefix + name.format(e=e), part


def hf_names(rule: Rule, hf_prefix: str, num_experts: int) -> list[str]:
    """Every HF name `rule` covers."""
    if rule.kind in ("copy", "glu"):
        return [hf_prefix + name for name in rule.hf]
    return [hf_prefix + name.format(e=e) for e in range(num_experts) for name in rule.hf]


def from_hf(rule: Rule, hf_prefix: str, get: Callable[[str], torch.Tensor], num_experts: int) -> torch.Tensor:
    """The Megatron tensor of `rule`, assembled from HF tensors `get(name)` returns."""
    if rule.kind == "copy":
        return get(hf_prefix + rule.hf[0])
    if rule.kind == "glu":
        return torch.cat([get(hf_prefix + name) for name in rule.hf], dim=0)
    experts = [
        torch.cat([get(hf_prefix + name.format(e=e)) for name in rule.hf], dim=0) for e in range(num_experts)
    ]
    return torch.stack(experts)
