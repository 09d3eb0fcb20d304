"""The GPTModel stage Megatron-LM's own builder returned -> the plugin's MTPGPTModel.

Shared by both drop-in routes: `lm_patch.mtp_gpt_builder` (core_v0.16 – v0.18, wrapping `gpt_builder`) and
`lm_builder.MTPGPTModelBuilder` (core_v0.19's config container). It sits below both so that `lm_patch`
may import `lm_builder` and neither imports the other back.
"""

from __future__ import annotations

from mtp_plugin.config import MTPConfig


def _eod_id(mtp: MTPConfig) -> int | None:
    if not mtp.mask_across_eod:
        return None
    from megatron.training import get_tokenizer

    return get_tokenizer().eod


def to_mtp_model(model, mtp: MTPConfig):
    """A GPTModel stage that Megatron-LM built with its native MTP block -> the plugin's MTPGPTModel."""
    from mtp_plugin.megatron.model import MTPGPTModel

    model = MTPGPTModel.from_gpt_model(
        model,
        loss_chunk_tokens=mtp.loss_chunk_tokens,
        loss_kernel=mtp.loss_kernel,
        eod_id=_eod_id(mtp),
        trunk_gradients=mtp.trunk_gradients,
        train_depths=mtp.trains_depths,
    )
    model.mtp_config = mtp
    return model
