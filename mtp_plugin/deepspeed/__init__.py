"""DeepSpeed adapter: the plugin's MTP in a DeepSpeed PipelineModule MoE GPT (`backend=deepspeed`).

Attributes resolve lazily, so config checks work (and fail fast) without importing deepspeed.
"""

from mtp_plugin._lazy import lazy_exports

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

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
