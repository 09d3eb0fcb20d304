"""Megatron-Core adapter: the plugin's MTP inside GPTModel pipeline stages.

Attributes resolve lazily, so `mtp_plugin.megatron.placement` and config validation work (and fail fast)
without importing megatron.core, which takes seconds.
"""

from importlib import import_module

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

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"mtp_plugin.megatron.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mtp_plugin.megatron' has no attribute {name!r}")
