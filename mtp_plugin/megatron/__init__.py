"""Megatron-Core adapter: the plugin's MTP inside GPTModel pipeline stages.

Attributes resolve lazily, so `mtp_plugin.megatron.placement` and config validation work (and fail fast)
without importing megatron.core, which takes seconds.
"""

from mtp_plugin._lazy import lazy_exports

_EXPORTS = {
    "check_supported": "config",
    "plan_from_config": "config",
    "transformer_config_from": "config",
    "MTPGPTModel": "model",
    "build_mtp_gpt_model": "model",
    "last_decoder_layer_spec": "model",
    "trunk_layer_spec": "model",
    "PipelinePlan": "placement",
    "parse_layout": "placement",
    "plan_pipeline": "placement",
    "GlobalTargetCounts": "step",
    "MTPMetrics": "step",
    "global_target_counts": "step",
    "RhoMeter": "meter",
    "mtp_forward_step": "step",
    "mtp_loss_func": "step",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
