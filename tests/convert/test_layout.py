"""The HF layout without any tensor (no Megatron): the shipped `model=deepseek_v3` is DeepSeek-V3's published
config.json field for field; the shipped models no layout expresses are refused naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scaled_models import shipped_model_config

from mtp_plugin.convert.layout import UnsupportedModel, check_exportable, config_differences, hf_config

# deepseek-ai/DeepSeek-V3 config.json (the architecture fields; quantization and auto_map left out).
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-06,
    "use_cache": True,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
    "ep_size": 1,
    "torch_dtype": "bfloat16",
}


def test_the_shipped_deepseek_v3_model_is_the_published_config():
    model = shipped_model_config("deepseek_v3")
    assert config_differences(model, DEEPSEEK_V3_CONFIG) == []
    ours = hf_config(model, 1, dtype=torch.bfloat16)
    same = {k for k in DEEPSEEK_V3_CONFIG if k in ours and ours[k] == DEEPSEEK_V3_CONFIG[k]}
    # Written differently only: rope_scaling gains rope_type and float values; initializer_range is the
    # trunk's init std (0.006 in model/deepseek_v3.yaml, the paper's), not the published 0.02.
    assert set(DEEPSEEK_V3_CONFIG) - same == {"rope_scaling", "initializer_range"}
    # A changed field is named, with what the run implies.
    other = {**DEEPSEEK_V3_CONFIG, "n_routed_experts": 128}
    assert config_differences(model, other) == ["n_routed_experts=128 (the run's model implies 256)"]


@pytest.mark.parametrize(
    ("name", "overrides", "field"),
    [
        ("toy", {}, "model.multi_latent_attention=False"),
        ("small", {}, "model.multi_latent_attention=False"),
        ("small", {"moe_router_score_function": "sigmoid"}, "model.multi_latent_attention=False"),
        (
            "deepseek_v3_tiny",
            {"moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False},
            "model.moe_router_score_function='softmax'",
        ),
        (
            "deepseek_v3_tiny",
            {"moe_router_group_topk": 2, "moe_router_num_groups": 2},
            "model.moe_router_group_topk=2",
        ),
        ("deepseek_v3_tiny", {"moe_shared_expert_size": 64}, "model.moe_shared_expert_size=64"),
        ("deepseek_v3_tiny", {"qk_layernorm": False}, "model.qk_layernorm=False"),
    ],
)
def test_a_model_no_layout_expresses_is_refused_naming_the_field(name, overrides, field):
    model = dataclasses.replace(shipped_model_config(name), **overrides)
    with pytest.raises(UnsupportedModel) as err:
        check_exportable(model)
    assert str(err.value).startswith(field + ": ")
    assert "\n" not in str(err.value)
    if field == "model.multi_latent_attention=False":
        assert "glm4_moe" in str(err.value)
