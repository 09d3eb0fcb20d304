"""DeepSpeed adapter: the plugin's MTP in a DeepSpeed PipelineModule MoE GPT (`backend=deepspeed`).

Attributes resolve lazily, so config checks work (and fail fast) without importing deepspeed.
"""

from importlib import import_module

_EXPORTS = {
    "MTPLoss": "model",
    "build_pipeline_module": "model",
    "check_supported": "model",
    "create_expert_groups": "model",
    "layer_specs": "model",
    "stage_boundaries": "model",
    "build_ds_config": "ds_config",
    "generated_ds_config": "ds_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"mtp_plugin.deepspeed.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mtp_plugin.deepspeed' has no attribute {name!r}")
