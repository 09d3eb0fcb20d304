"""Multi-head latent attention on Megatron-Core's local (no TransformerEngine) spec.

Megatron's `MLASelfAttention` builds its core attention with `k_channels` (the q/k head width, no-RoPE +
RoPE parts) and `v_channels` (the value head width), which differ in DeepSeek-V2/V3 (192 vs 128). In
megatron-core 0.16-0.19 only `TEDotProductAttention` takes those arguments; the local spec's
`DotProductAttention` does not, so a local-spec MLA model fails to build ("unexpected keyword argument
'k_channels'"). Its math is width-agnostic (batched q·kᵀ and a·v): only its output width (heads x
kv_channels) and its default softmax scale read `kv_channels`. `MLADotProductAttention` is that module
with `kv_channels` set to the value width, swapped in through the layer spec (`with_local_mla_attention`).
"""

from __future__ import annotations

import copy
import dataclasses
import math

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules


class MLADotProductAttention(DotProductAttention):
    """Megatron's local DotProductAttention for q/k heads of `k_channels` and value heads of `v_channels`."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        if softmax_scale is None and k_channels is not None:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        if v_channels is not None and v_channels != config.kv_channels:
            # A shallow copy: the output width is heads x v_channels; the layer's own config is untouched.
            config = copy.copy(config)
            config.kv_channels = v_channels
        super().__init__(
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )


def with_local_mla_attention(spec):
    """A copy of a layer (or block) spec whose local-spec MLA layers use `MLADotProductAttention`."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(spec, layer_specs=[with_local_mla_attention(s) for s in spec.layer_specs])
    attention = spec.submodules.self_attention
    if (
        attention.module is not MLASelfAttention
        or attention.submodules.core_attention is not DotProductAttention
    ):
        return spec
    attention = ModuleSpec(
        module=attention.module,
        params=attention.params,
        submodules=dataclasses.replace(attention.submodules, core_attention=MLADotProductAttention),
    )
    submodules = dataclasses.replace(spec.submodules, self_attention=attention)
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)
