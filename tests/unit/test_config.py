import pytest

from mtp_plugin.config import LambdaScheduleConfig, ModelConfig, MTPConfig
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
        (dict(placement="middle"), "use 'last' or 'stage'"),
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden_size=130, num_attention_heads=4), "divisible by model.num_attention_heads"),
        (dict(num_experts=4, moe_router_topk=5), "moe_router_topk=5"),
        (dict(num_experts=4, first_dense_layers=4), "at least one layer is MoE"),
        (dict(num_layers=0), "num_layers must be >= 1"),
        (dict(hidden_dropout=1.0), "model.hidden_dropout must be in \\[0, 1\\), got 1.0"),
        (dict(attention_dropout=-0.1), "model.attention_dropout must be in"),
    ],
)
def test_model_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_padded_vocab():
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50304
