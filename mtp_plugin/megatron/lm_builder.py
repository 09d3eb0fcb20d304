"""core_v0.19's config-container extension point: a GPTModelConfig whose builder adds the plugin's MTP.

Megatron-LM core_v0.19's `setup_model_and_optimizer` builds the model from `cfg_container.model`'s
builder and ignores `model_provider`. Its own custom-model example (megatron/post_training/model_builder.py,
`ModelOptModelConfig`) overrides only `builder` and the builder's `build_model`; this mirrors it, and the
builder's `build_model` is Megatron's own (spec choice, vocab padding, native MTP block spec, flags) followed
by the plugin taking over the MTP layers. Needs megatron-core >= 0.17 (`megatron.training.models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from mtp_plugin.config import MTPConfig
from mtp_plugin.megatron.lm_model import to_mtp_model


@dataclass(kw_only=True)
class MTPGPTModelConfig(GPTModelConfig):
    """GPTModelConfig plus the plugin's MTP settings (λ schedule, depth weights, chunking)."""

    builder: ClassVar[str] = "mtp_plugin.megatron.lm_builder.MTPGPTModelBuilder"
    mtp_plugin: MTPConfig | None = None


class MTPGPTModelBuilder(GPTModelBuilder):
    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        mtp = self._model_config.mtp_plugin
        if mtp is None:
            raise ValueError(
                "MTPGPTModelConfig.mtp_plugin is unset; build the config with lm_patch.mtp_gpt_config_from_args(args)"
            )
        model = super().build_model(
            pg_collection, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )
        return to_mtp_model(model, mtp)
