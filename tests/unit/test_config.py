import pytest

from mtp_plugin.config import ClusterConfig, LambdaScheduleConfig, ModelConfig, MTPConfig, ParallelConfig
from mtp_plugin.core import PiecewiseLambda


def test_defaults_are_valid():
    cfg = MTPConfig(num_depths=3)
    assert cfg.weights == pytest.approx((1 / 3,) * 3)
    cfg.check_sequence_length(4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_depths=-1), "num_depths must be >= 1"),
        (dict(num_depths=2, depth_weights=[1.0]), "give one weight per depth"),
        (dict(num_depths=2, depth_weights=[1.5, -0.5]), "must be non-negative"),
        (dict(num_depths=2, depth_weights=[0.5, 0.6]), "must sum to 1"),
        (dict(loss_chunk_tokens=-4), "loss_chunk_tokens must be >= 0"),
        (dict(placement="middle"), "unknown; use 'last', 'stage'"),
        (dict(placement="stage"), "needs mtp.mtp_stage"),
        (dict(placement="stage", mtp_stage=0), "use a stage >= 1"),
    ],
)
def test_mtp_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MTPConfig(**kwargs)


def test_depth_below_sequence_length():
    with pytest.raises(ValueError, match="must be below the sequence length 4"):
        MTPConfig(num_depths=4).check_sequence_length(4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="step"), "kind='step' is unknown"),
        (dict(kind="constant", value=-0.1), "finite λ >= 0"),
        (dict(kind="piecewise", boundaries_tokens=[10, 5], values=[0.3, 0.2, 0.1]), "strictly increasing"),
        (dict(kind="piecewise", boundaries_tokens=[10], values=[0.3]), "len\\(values\\) == len"),
        (dict(kind="linear", start_tokens=10, end_tokens=10), "end_tokens > start_tokens"),
        (dict(kind="cosine", start_value=float("nan")), "finite λ >= 0"),
    ],
)
def test_lambda_schedule_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LambdaScheduleConfig(**kwargs)


def test_lambda_schedule_config_builds():
    s = LambdaScheduleConfig(kind="piecewise", boundaries_tokens=[1e6], values=[0.3, 0.1]).build()
    assert s == PiecewiseLambda(boundaries_tokens=(1e6,), values=(0.3, 0.1))


def test_mtp_config_accepts_mapping_for_schedule():
    cfg = MTPConfig(num_depths=1, lambda_schedule={"kind": "constant", "value": 0.2})
    assert cfg.lambda_schedule.build()(0) == 0.2


MLA = dict(multi_latent_attention=True, kv_lora_rank=64)  # fits the default hidden size 128


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden_size=130, num_attention_heads=4), "divisible by model.num_attention_heads"),
        (dict(num_experts=4, moe_router_topk=5), "moe_router_topk=5"),
        (dict(num_experts=4, first_dense_layers=4), "at least one layer is MoE"),
        (dict(num_layers=0), "num_layers must be >= 1"),
        (dict(hidden_dropout=1.0), "model.hidden_dropout must be in \\[0, 1\\), got 1.0"),
        (dict(attention_dropout=-0.1), "model.attention_dropout must be in"),
        # MLA dimensions that do not fit the heads / hidden size, and RoPE options
        (
            dict(multi_latent_attention=True, kv_lora_rank=256),
            "kv_lora_rank=256 exceeds model.hidden_size=128",
        ),
        (dict(**MLA, q_lora_rank=0), "q_lora_rank must be >= 1 or null"),
        (
            dict(
                multi_latent_attention=True,
                kv_lora_rank=64,
                qk_head_dim=4,
                qk_pos_emb_head_dim=2,
                v_head_dim=4,
            ),
            "wider than the heads it expands to",
        ),
        (dict(**MLA, qk_pos_emb_head_dim=7), "qk_pos_emb_head_dim=7 must be even"),
        (dict(**MLA, num_query_groups=2), "num_query_groups=2 has no meaning"),
        (dict(rope_type="yarn"), "rope_type='yarn' needs model.multi_latent_attention=true"),
        (dict(**MLA, rope_type="ntk"), "rope_type='ntk'; use rope or yarn"),
        # routing
        (dict(num_experts=8, moe_router_score_function="relu"), "moe_router_score_function='relu'"),
        (
            dict(num_experts=8, moe_router_enable_expert_bias=True),
            "needs model.moe_router_score_function=sigmoid",
        ),
        (dict(num_experts=8, moe_router_num_groups=4), "moe_router_group_topk go together"),
        (dict(num_experts=8, moe_router_num_groups=3, moe_router_group_topk=1), "num_groups=3 must divide"),
        (dict(num_experts=8, moe_router_num_groups=4, moe_router_group_topk=5), "group_topk=5 must be in"),
        (
            dict(num_experts=8, moe_router_topk=3, moe_router_num_groups=4, moe_router_group_topk=2),
            "moe_router_topk=3 must be a multiple of moe_router_group_topk=2",
        ),
        (dict(num_experts=8, moe_router_load_balancing_type="sinkhorn"), "load_balancing_type='sinkhorn'"),
        (dict(num_experts=8, moe_router_topk=1), "moe_router_pre_softmax=true"),
    ],
)
def test_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_padded_vocab():
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(recompute_granularity="some"), "recompute_granularity='some'"),
        (dict(recompute_granularity="full"), "recompute_method=None with recompute_granularity=full"),
        (dict(recompute_granularity="full", recompute_method="uniform"), "recompute_num_layers must be >= 1"),
        (dict(recompute_method="block"), "apply to recompute_granularity=full only"),
        (dict(recompute_granularity="selective", recompute_modules=["attn"]), "unknown \\['attn'\\]"),
        (dict(recompute_modules=["core_attn"]), "needs recompute_granularity=selective"),
    ],
)
def test_parallel_recompute_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(launcher="k8s"), "cluster.launcher='k8s'"),
        (dict(num_nodes=4), "num_nodes=4 with launcher=local"),
        (dict(launcher="slurm", gpus_per_node=0), "gpus_per_node must be >= 1"),
        (dict(device_memory_gib=0), "device_memory_gib must be > 0"),
    ],
)
def test_cluster_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**kwargs)


def test_cluster_world_size():
    assert ClusterConfig(launcher="slurm", num_nodes=256, gpus_per_node=8).world_size == 2048
