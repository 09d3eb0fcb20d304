"""Megatron-Core adapter: the plugin's MTP inside GPTModel pipeline stages.

Importing this package imports megatron.core; `mtp_plugin.megatron.placement` alone does not.
"""

from mtp_plugin.megatron.config import check_supported, plan_from_config, transformer_config_from
from mtp_plugin.megatron.model import (
    MTPGPTModel,
    build_mtp_gpt_model,
    last_decoder_layer_spec,
    trunk_layer_spec,
)
from mtp_plugin.megatron.placement import PipelinePlan, parse_layout, plan_pipeline
from mtp_plugin.megatron.step import MTPMetrics, mtp_forward_step, mtp_loss_func

__all__ = [
    "MTPGPTModel",
    "MTPMetrics",
    "PipelinePlan",
    "build_mtp_gpt_model",
    "check_supported",
    "last_decoder_layer_spec",
    "mtp_forward_step",
    "mtp_loss_func",
    "parse_layout",
    "plan_from_config",
    "plan_pipeline",
    "transformer_config_from",
    "trunk_layer_spec",
]
