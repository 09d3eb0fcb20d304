"""backend=deepspeed configuration: the generated ds_config, a user ds_config that contradicts the plugin's
config (one line naming both values), model features DeepSpeed's layers cannot express, stage plans."""

from __future__ import annotations

import pytest

from mtp_plugin.config import (
    BackendConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    MTPConfig,
    ParallelConfig,
    TrainingConfig,
)
from mtp_plugin.deepspeed.config import check_experiment
from mtp_plugin.deepspeed.ds_config import build_ds_config
from mtp_plugin.deepspeed.model import stage_boundaries

pytestmark = pytest.mark.deepspeed


def _experiment(**backend) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=512, num_experts=4),
        mtp=MTPConfig(num_depths=2),
        parallel=ParallelConfig(pipeline_model_parallel_size=2),
        training=TrainingConfig(global_batch_size=16, micro_batch_size=2, clip_grad=1.0),
        data=DataConfig(train_prefix="unused", eod_id=0),
        backend=BackendConfig(name="deepspeed", **backend),
    )


def test_generated_ds_config_follows_the_plugin_config():
    ds = build_ds_config(_experiment(), data_parallel_size=2, user={})
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (
        16,
        2,
        4,
    )
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": False}
    assert ds["optimizer"]["params"]["torch_adam"] is True
    merged = build_ds_config(
        _experiment(), data_parallel_size=2, user={"zero_optimization": {"reduce_bucket_size": 1000}}
    )
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}


@pytest.mark.parametrize(
    ("user", "names"),
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            ("train_micro_batch_size_per_gpu=4", "training.micro_batch_size (= 2"),
        ),
        ({"train_batch_size": 32}, ("train_batch_size=32", "training.global_batch_size (= 16")),
        ({"zero_optimization": {"stage": 2}}, ("zero_optimization.stage=2", "backend.zero_stage (= 1")),
        ({"bf16": {"enabled": True}}, ("bf16.enabled=True", "backend.params_dtype (= False")),
        ({"gradient_clipping": 0.5}, ("gradient_clipping=0.5", "training.clip_grad (= 1.0")),
    ],
)
def test_a_contradicting_ds_config_is_one_line_naming_both_values(user, names):
    with pytest.raises(ValueError) as err:
        build_ds_config(_experiment(), data_parallel_size=2, user=user)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in names), message


def test_zero_2_with_the_pipeline_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match=r"backend.zero_stage=2: DeepSpeed's pipeline engine supports ZeRO"):
        BackendConfig(name="deepspeed", zero_stage=2)
    with pytest.raises(ValueError, match=r"backend.zero_stage=0 applies to backend=deepspeed only"):
        BackendConfig(name="megatron", zero_stage=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("multi_latent_attention", True), ("moe_router_score_function", "sigmoid"), ("hidden_dropout", 0.1)],
)
def test_model_features_deepspeed_cannot_express_are_refused_by_name(field, value):
    cfg = _experiment()
    setattr(cfg.model, field, value)
    with pytest.raises(ValueError, match=rf"model.{field}={value!r} is not supported by backend=deepspeed"):
        check_experiment(cfg)


def test_a_stage_of_dense_layers_only_is_refused_under_zero_1():
    cfg = _experiment()
    cfg.model.num_layers, cfg.model.first_dense_layers = 2, 1
    with pytest.raises(ValueError, match=r"pipeline stage 0 of 2 holds no MoE layer"):
        check_experiment(cfg)
    cfg.backend.zero_stage = 0
    check_experiment(cfg)


def test_stage_plans_put_the_depths_and_the_head_where_placement_says():
    model = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=512)
    # Layers: embedding, 4 trunk, final norm, 2 x (lookup, depth), head = 11.
    assert stage_boundaries(model, MTPConfig(num_depths=2), 2) == [0, 3, 11]
    assert stage_boundaries(model, MTPConfig(num_depths=2), 4) == [0, 2, 3, 4, 11]
    assert stage_boundaries(model, MTPConfig(num_depths=2, placement="stage", mtp_stage=1), 3) == [
        0,
        3,
        10,
        11,
    ]
    with pytest.raises(ValueError, match=r"mtp.mtp_stage=1 with 4 stages leaves stages holding no layer"):
        stage_boundaries(model, MTPConfig(num_depths=2, placement="stage", mtp_stage=1), 4)
    # split: (lookup, depth) pairs on consecutive stages after the trunk, the head with the last depth.
    assert stage_boundaries(model, MTPConfig(num_depths=2, placement="split"), 3) == [0, 3, 8, 11]
    assert stage_boundaries(model, MTPConfig(num_depths=3, placement="split"), 4) == [0, 3, 8, 10, 13]
    assert stage_boundaries(model, MTPConfig(num_depths=3, placement="split"), 3) == [0, 3, 10, 13]
    with pytest.raises(ValueError, match="more depth stages than depths"):
        stage_boundaries(model, MTPConfig(num_depths=2, placement="split", mtp_stage=1), 4)
