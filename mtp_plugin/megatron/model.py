"""MTP inside a Megatron-Core GPTModel pipeline stage, through Megatron's own extension points.

`MTPGPTModel` is a GPTModel subclass: the trunk, embedding, output layer, pipeline layout and the
embedding group are Megatron's, and so are the MTP layers' modules: GPTModel builds them from its
`mtp_block_spec` (the trunk's last-layer spec, MoE when the trunk is), in Megatron's own construction
order. The plugin then moves those modules into its core `MTPStack` and drops Megatron's
`MultiTokenPredictionBlock`, so Megatron's MTP forward, its loss hook (`MTPLossAutoScaler`) and its
process-global loss tracker are never used: the loss is returned to the caller's loss function.

The config keeps `mtp_num_layers = D` so that Megatron's pipeline machinery treats the plugin's depths
as MTP layers: the trunk's final norm sits on the stage of its last layer, a layout with `m` and `L`
builds and communicates the (1 + D)-times longer hidden states, and the MTP stage gets its embedding
copy and joins the embedding group whose gradients `finalize_model_grads` sums every step. Under a split
plan (docs/placement.md) each depth stage builds and runs only its own depths (`depths`), receiving
[h^0; ...; h^j] and sending [h^0; ...; h^k] on.

Post-process output (when labels are given): `(main_loss_bs, depth_loss_sums_d, depth_counts_d3)` with the
per-token main loss [b, s] (unmasked, as GPTModel returns it), each depth's summed CE over its valid
targets (differentiable) and, per depth, (valid targets, top-1 hits, chain hits: depths 1..k all right). See `mtp_plugin.megatron.step`.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer, get_mtp_layer_offset
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor

from mtp_plugin.config import ModelConfig, MTPConfig
from mtp_plugin.core import (
    MTPDepth,
    MTPStack,
    check_labels,
    depth_count_rows,
    depth_targets,
    linear_cross_entropy,
    linear_cross_entropy_per_token,
    shift_left,
)
from mtp_plugin.megatron.compat import ensure_mla_without_te, ensure_moe_router_without_te
from mtp_plugin.megatron.mla import with_local_mla_attention


class MTPProjection(MegatronModule):
    """eh_proj: [enorm(emb); hnorm(h)] (2h) -> h, column-parallel, gathered back to full hidden width.

    Wraps the column-parallel linear Megatron's MTP layer builds from its spec (local or TE), so the
    weight, its init and its place in the RNG stream are Megatron's own.
    """

    def __init__(self, linear: torch.nn.Module, config: TransformerConfig, tp_group) -> None:
        super().__init__(config=config)
        self.linear = linear
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear(x)
        # gather (not all-gather-with-reduce) keeps the backward a split, as upstream fixed it in MTP.
        y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        if self.config.sequence_parallel:
            y = scatter_to_sequence_parallel_region(y, group=self.tp_group)
        return y


class MTPTransformerBlock(MegatronModule):
    """The MTP layer's TransformerLayer (built by Megatron from the trunk's last-layer spec) as tensor -> tensor."""

    def __init__(self, config: TransformerConfig, layer: torch.nn.Module) -> None:
        super().__init__(config=config)
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out, _ = self.layer(hidden_states=hidden_states, **kwargs)
        return out


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm whose weight Megatron treats as sequence-parallel.

    Megatron's local-spec torch norm (WrappedTorchNorm) refuses sequence parallel; upstream's answer is
    TransformerEngine's norm. Under sequence parallel each tensor-parallel rank normalises its own slice of
    the sequence, so the weight gradient is partial: `finalize_model_grads` sums the gradients of params
    marked `sequence_parallel` over the tensor-parallel group, which is all this class adds.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(
                f"SequenceParallelRMSNorm needs normalization='RMSNorm', got {config.normalization!r}"
            )
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _with_norm(spec, norm):
    """A copy of a local-spec layer (or block) spec with its norms swapped for `norm`, through the spec."""
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(
            spec, layer_specs=[_with_norm(s, norm) for s in spec.layer_specs], layer_norm=norm
        )
    submodules = dataclasses.replace(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm)
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)


def trunk_layer_spec(config: TransformerConfig, *, vp_stage=None):
    """The trunk's spec: a per-layer block spec for MoE (dense first layers, then MoE), else one local spec.

    Megatron's block spec reads `multi_latent_attention` and `qk_layernorm` from the config, so an MLA
    config gets MLASelfAttention layers. With sequence parallel, every norm (each layer's and the block's
    final one) is `SequenceParallelRMSNorm`.
    """
    if config.num_moe_experts or config.sequence_parallel or config.multi_latent_attention:
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=config.normalization, vp_stage=vp_stage
        )
        block = with_local_mla_attention(block)
        return _with_norm(block, SequenceParallelRMSNorm) if config.sequence_parallel else block
    return get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)


def last_decoder_layer_spec(config: TransformerConfig) -> ModuleSpec:
    """The spec of the trunk's last decoder layer (MoE when the trunk ends in MoE, MLA when it has MLA),
    for every MTP depth."""
    freq = config.moe_layer_freq
    last_is_moe = bool(config.num_moe_experts) and (
        (isinstance(freq, int) and (config.num_layers - 1) % freq == 0)
        or (isinstance(freq, list) and freq[-1] == 1)
    )
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts if last_is_moe else None,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
        normalization=config.normalization,
    )
    spec = with_local_mla_attention(spec)
    return _with_norm(spec, SequenceParallelRMSNorm) if config.sequence_parallel else spec


class MTPLayerAtDepth(MultiTokenPredictionLayer):
    """Megatron's MTP layer, numbered by its global depth on a stage of a split plan.

    Megatron numbers a stage's MTP layers from the count of `m` on the stages before it in its layout; the
    layout a split plan's depth stage builds with has none before it (`_config_running_depths_here`), so
    depth k would be numbered 1, and the MoE router indexes its aux-loss tracker by that number.
    """

    def __init__(self, config, *args, layer_number: int = 1, vp_stage=None, first_depth: int = 1, **kwargs):
        layer_number += first_depth - 1 - get_mtp_layer_offset(config, vp_stage)
        super().__init__(config, *args, layer_number=layer_number, vp_stage=vp_stage, **kwargs)


def native_mtp_block_spec(config: TransformerConfig, layer_spec: ModuleSpec, depths: range | None = None):
    """Megatron's MTP block spec (local backend) for the depths `depths` (default all D) with layer `layer_spec`.

    Built directly rather than through `get_gpt_mtp_block_spec`, which answers None off the stage that
    Megatron's own layout rule picks: the plugin's placement planner decides the stage. With sequence
    parallel the MTP norms are swapped, through the spec, for `SequenceParallelRMSNorm` as in the trunk.
    A subset of the depths (a split plan's stage) is numbered from its first depth (`MTPLayerAtDepth`).
    """
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        get_mtp_layer_spec_for_backend,
    )

    # Positional: the keyword is `transformer_layer_spec` on 0.16 and `mtp_model_layer_spec` on 0.19.
    layer = get_mtp_layer_spec_for_backend(layer_spec, LocalSpecProvider())
    if config.sequence_parallel:
        norms = dict(
            enorm=SequenceParallelRMSNorm, hnorm=SequenceParallelRMSNorm, layer_norm=SequenceParallelRMSNorm
        )
        layer = ModuleSpec(
            module=layer.module,
            params=layer.params,
            submodules=dataclasses.replace(layer.submodules, **norms),
        )
    if depths is None:
        depths = range(1, config.mtp_num_layers + 1)
    if depths.start > 1:
        layer = ModuleSpec(
            module=MTPLayerAtDepth,
            params={**layer.params, "first_depth": depths.start},
            submodules=layer.submodules,
        )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * len(depths))


def _config_running_depths_here(config: TransformerConfig, pp_rank: int) -> TransformerConfig:
    """`config`, or for a later stage of a split plan a shallow copy whose layout holds the MTP layers here.

    A split plan gives Megatron every `m` on the first depth stage (placement.py), and Megatron (>= 0.17)
    builds MTP layers only where its layout has them (`mtp_on_this_rank`); the copy, used to build this
    stage only, moves them here (then Megatron numbers them from 0 on this stage: `MTPLayerAtDepth`).
    """
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    layout = config.pipeline_model_parallel_layout
    if layout is None or LayerType.mtp in layout.layout[pp_rank][0]:
        return config
    rows = [[t for t in stage[0] if t != LayerType.mtp] for stage in layout.layout]
    here = [t for t in rows[pp_rank] if t != LayerType.loss] + [LayerType.mtp] * config.mtp_num_layers
    rows[pp_rank] = here + [LayerType.loss] * (LayerType.loss in rows[pp_rank])
    stage_config = copy.copy(config)
    stage_config.pipeline_model_parallel_layout = PipelineParallelLayerLayout(
        rows, config.pipeline_model_parallel_size
    )
    return stage_config


def _depths_here(config: TransformerConfig, mtp_stage: int, depths: range | None, pp_rank: int) -> range:
    """The 1-based depths this stage runs: `depths` (a split plan's), else all D on `mtp_stage`."""
    if depths is not None:
        return depths
    num_depths = config.mtp_num_layers or 0
    return range(1, num_depths + 1) if num_depths and pp_rank == mtp_stage else range(1, 1)


def _mtp_stage_of(config: TransformerConfig) -> int:
    """The pipeline stage Megatron's own rule puts the MTP layers on (the layout's `m`, else the last)."""
    from megatron.core.transformer.multi_token_prediction import get_mtp_num_layers_to_build

    pp = config.pipeline_model_parallel_size
    if pp == 1:
        return 0
    for rank in range(pp):
        if get_mtp_num_layers_to_build(config, vp_stage=None, pp_rank=rank) > 0:
            return rank
    return pp - 1


class MTPGPTModel(GPTModel):
    """GPTModel whose MTP stage runs the plugin's MTP depths and whose last stage scores them.

    Megatron builds everything, MTP layers included (`mtp_block_spec`, the same spec a native MTP model
    gets: from the trunk's last layer, local or TE), in its own order, so the initial weights equal a native
    MTP model's with the same seed. The plugin then takes the MTP layers' modules into its core `MTPStack`
    and replaces Megatron's MTP forward and loss (`_postprocess`). `from_gpt_model` does the same to a
    GPTModel someone else built (Megatron-LM's own model builders in the drop-in).
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec,
        vocab_size: int,
        max_sequence_length: int,
        *,
        mtp_stage: int | None = None,
        depths: range | None = None,
        mtp_layer_spec: ModuleSpec | None = None,
        mtp_block_spec=None,
        loss_chunk_tokens: int = 0,
        loss_kernel: str = "auto",
        eod_id: int | None = None,
        trunk_gradients: str = "joint",
        train_depths: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "rope",
        rotary_base: int = 10000,
        vp_stage: int | None = None,
        **gpt_kwargs,
    ) -> None:
        if config.num_moe_experts:
            ensure_moe_router_without_te()
        if config.multi_latent_attention:
            ensure_mla_without_te()
        if mtp_stage is None:
            mtp_stage = _mtp_stage_of(config)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        depths = _depths_here(config, mtp_stage, depths, pp_rank)
        if depths and mtp_block_spec is None:
            mtp_block_spec = native_mtp_block_spec(
                config, mtp_layer_spec or last_decoder_layer_spec(config), depths
            )
        super().__init__(
            config=_config_running_depths_here(config, pp_rank) if depths else config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_base=rotary_base,
            mtp_block_spec=mtp_block_spec,
            vp_stage=vp_stage,
            **gpt_kwargs,
        )
        self.config = config  # the run's config (what the schedule and finalize_model_grads read)
        self._adopt_mtp(
            loss_chunk_tokens=loss_chunk_tokens,
            loss_kernel=loss_kernel,
            eod_id=eod_id,
            mtp_stage=mtp_stage,
            trunk_gradients=trunk_gradients,
            train_depths=train_depths,
            depths=depths,
        )

    @classmethod
    def from_gpt_model(
        cls,
        model: GPTModel,
        *,
        loss_chunk_tokens: int = 0,
        loss_kernel: str = "auto",
        eod_id: int | None = None,
        trunk_gradients: str = "joint",
        train_depths: bool = True,
    ) -> MTPGPTModel:
        """Turn a GPTModel stage built with Megatron's MTP block spec into the plugin's model, in place.

        Nothing is rebuilt: parameters, their initial values and their order are the builder's; only the
        MTP forward and loss become the plugin's. A host config with 0.19's `mtp_detach_heads` set means
        `trunk_gradients="detached"`.
        """
        if type(model) is not GPTModel:
            raise TypeError(
                f"expected a megatron.core GPTModel stage, got {type(model).__name__}; the plugin adds MTP to "
                "Megatron's GPTModel only"
            )
        if getattr(model.config, "mtp_detach_heads", False) and trunk_gradients != "detached":
            if trunk_gradients != "joint":
                raise ValueError(
                    f"--mtp-detach-heads asks for detached depths and the plugin for trunk_gradients="
                    f"{trunk_gradients}; give one of them"
                )
            trunk_gradients = "detached"
        model.__class__ = cls
        mtp_stage = _mtp_stage_of(model.config)
        model._adopt_mtp(
            loss_chunk_tokens=loss_chunk_tokens,
            loss_kernel=loss_kernel,
            eod_id=eod_id,
            mtp_stage=mtp_stage,
            trunk_gradients=trunk_gradients,
            train_depths=train_depths,
            depths=_depths_here(model.config, mtp_stage, None, model.pp_group.rank()),
        )
        return model

    def _adopt_mtp(
        self,
        *,
        loss_chunk_tokens: int,
        loss_kernel: str,
        eod_id: int | None,
        mtp_stage: int,
        trunk_gradients: str,
        train_depths: bool,
        depths: range,
    ) -> None:
        from mtp_plugin.config.mtp import TRUNK_GRADIENTS

        config = self.config
        if trunk_gradients not in TRUNK_GRADIENTS:
            raise ValueError(f"trunk_gradients={trunk_gradients!r} is unknown; use one of {TRUNK_GRADIENTS}")
        self.num_mtp_depths = config.mtp_num_layers or 0
        self.trunk_gradients = trunk_gradients
        self.train_depths = train_depths and bool(self.num_mtp_depths)
        self.loss_chunk_tokens = loss_chunk_tokens
        self.loss_kernel = loss_kernel
        self.eod_id = eod_id
        pp_rank = self.pp_group.rank()
        self.mtp_process = bool(self.num_mtp_depths) and getattr(self, "mtp_process", False)
        if self.num_mtp_depths and bool(depths) != self.mtp_process:
            raise ValueError(
                f"pipeline stage {pp_rank}: the plugin places MTP on stage {mtp_stage} but Megatron "
                f"{'built' if self.mtp_process else 'did not build'} MTP layers here; set "
                "pipeline_model_parallel_layout so that its 'm' is on the MTP stage"
            )
        # Depths run before this stage: its input is [h^0; ...; h^j] along the sequence (j of them).
        self.depths_before_this_stage = (
            (depths.start - 1) if depths else self.num_mtp_depths * (pp_rank > mtp_stage)
        )
        self.mtp_before_this_stage = self.depths_before_this_stage > 0
        self.mtp_depths = depths
        if self.mtp_process:
            native_layers = list(self.mtp.layers)
            if len(native_layers) != len(depths):
                raise ValueError(
                    f"Megatron built {len(native_layers)} MTP layer(s) for depths {list(depths)} on this stage "
                    "(mtp_use_repeated_layer?); the plugin needs one layer per depth"
                )
            # Megatron's block goes (its forward and loss are the plugin's now); its layers' modules stay.
            del self.mtp
            self.mtp_stack = MTPStack([self._depth_from_native(layer) for layer in native_layers])
            if self.share_embeddings_and_output_weights and self.post_process and not self.pre_process:
                # A tied head on a later MTP stage scores with this stage's embedding copy (GPTModel's
                # shared_embedding_or_output_weight), yet GPTModel allocates the output layer's weight
                # too; Megatron's sharded_state_dict then refuses to save it (it asserts the key is absent
                # on an MTP stage). Dropped, as GPTModel skips it on stage 0.
                self.output_layer.weight = None
        self._freeze(trunk=trunk_gradients == "frozen", depths=not self.train_depths)

    def _freeze(self, *, trunk: bool, depths: bool) -> None:
        """requires_grad off for what gets no gradient, so Megatron's DDP gives it no gradient buffer and
        its optimizer leaves it out: weight decay never moves a parameter that has nothing to learn."""
        if trunk and self.pp_group.size() > 1:
            raise ValueError(
                "trunk_gradients='frozen' needs pipeline size 1: earlier stages would have nothing to train"
            )
        for name, param in self.named_parameters():
            if depths if name.startswith("mtp_stack.") else trunk:
                param.requires_grad_(False)

    def _depth_from_native(self, layer) -> MTPDepth:
        # 0.19 names the inner layer `mtp_model_layer`; 0.16 - 0.18 `transformer_layer`.
        inner = getattr(layer, "mtp_model_layer", None) or layer.transformer_layer
        return MTPDepth(
            enorm=layer.enorm,
            hnorm=layer.hnorm,
            eh_proj=MTPProjection(layer.eh_proj, self.config, self.pg_collection.tp),
            block=MTPTransformerBlock(self.config, inner),
            final_norm=layer.final_layernorm,
        )

    def _postprocess(
        self,
        hidden_states,
        input_ids,
        position_ids,
        labels,
        rotary_pos_emb,
        rotary_pos_cos,
        rotary_pos_sin,
        mtp_in_postprocess=None,
        loss_mask=None,
        decoder_input=None,
        attention_mask=None,
        inference_params=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        runtime_gather_output=None,
        extra_block_kwargs=None,
        inference_context=None,
        **_,
    ):
        depth_hidden: list[torch.Tensor] = []
        if self.mtp_before_this_stage:
            hidden_states, *depth_hidden = torch.chunk(
                hidden_states, 1 + self.depths_before_this_stage, dim=0
            )
            # Megatron sized the rotary table by this stage's input, (1 + j) sequences long.
            rotary_pos_emb, rotary_pos_cos, rotary_pos_sin = (
                None if r is None else r[: r.shape[0] // (1 + self.depths_before_this_stage)]
                for r in (rotary_pos_emb, rotary_pos_cos, rotary_pos_sin)
            )
        if self.mtp_process:
            # detached / frozen (Megatron-Core 0.19's mtp_detach_heads, multi_token_prediction.py): the
            # depths see the trunk's state and the embeddings as constants; the head is detached in
            # _depth_losses. Depths that never train run without a graph: scored for the log only. On a
            # later split stage the first depth here continues the previous depth's state (already detached
            # from the trunk where that depth ran).
            detach = self.trunk_gradients != "joint" or not self.train_depths
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_depths):
                if depth_hidden:
                    depth_input = depth_hidden[-1]
                else:
                    depth_input = hidden_states.detach() if detach else hidden_states
                depth_hidden += self.mtp_stack(
                    depth_input,
                    input_ids,
                    lambda ids_bs, k: self._depth_embedding(ids_bs, position_ids, k, detach),
                    attention_mask=attention_mask,
                    rotary_pos_emb=rotary_pos_emb,
                    rotary_pos_cos=rotary_pos_cos,
                    rotary_pos_sin=rotary_pos_sin,
                    packed_seq_params=packed_seq_params,
                    sequence_len_offset=sequence_len_offset,
                    first_depth=self.mtp_depths.start,
                )
            if not self.post_process:
                # Later stages receive [h^0; h^1; ...; h^k] along the sequence dim (Megatron's convention).
                return make_viewless_tensor(torch.cat([hidden_states, *depth_hidden], dim=0), True, True)
        if not self.post_process:
            return hidden_states

        output_weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        head_weight = output_weight if output_weight is not None else self.output_layer.weight
        if labels is not None and depth_hidden:
            if loss_mask is None:
                loss_mask = torch.ones_like(labels, dtype=torch.bool)
            # Every depth's counted labels are main-head labels counted by loss_mask (shifted), so one
            # range check (the loss's only host sync) covers all heads.
            check_labels(
                labels.reshape(-1), loss_mask.reshape(-1).bool(), head_weight.shape[0] * self._tp_size()
            )
        if labels is not None and depth_hidden and self.loss_chunk_tokens > 0:
            # The main head on the depths' chunked path: no [s, b, V] logits, the same loss per token.
            main_loss_sb = linear_cross_entropy_per_token(
                self._head_input(hidden_states),
                head_weight,
                labels.t(),
                **self._head_loss_kwargs(head_weight),
            )
            main_loss_bs = main_loss_sb.t().contiguous()  # [s b] -> [b s], as GPTModel
        else:
            logits, _ = self.output_layer(
                hidden_states, weight=output_weight, runtime_gather_output=runtime_gather_output
            )
            if labels is None:
                return logits.transpose(0, 1).contiguous()  # [s b V] -> [b s V], as GPTModel
            main_loss_bs = self.compute_language_model_loss(labels, logits)
            del logits  # free the main head's [s, b, V] before the depths are scored
        if not depth_hidden:
            return main_loss_bs
        sums, counts = self._depth_losses(depth_hidden, head_weight, input_ids, labels, loss_mask)
        return main_loss_bs, sums, counts

    def _depth_embedding(self, ids_bs, position_ids, k: int, detach: bool) -> torch.Tensor:
        emb = self.embedding(
            input_ids=ids_bs, position_ids=None if position_ids is None else shift_left(position_ids, k)
        )
        return emb.detach() if detach else emb

    def _tp_size(self) -> int:
        return self.pg_collection.tp.size()

    def _head_input(self, hidden_sbh: torch.Tensor) -> torch.Tensor:
        """The same input-side communication a ColumnParallelLinear head does."""
        tp_group = self.pg_collection.tp
        if self.config.sequence_parallel:
            return gather_from_sequence_parallel_region(
                hidden_sbh, tensor_parallel_output_grad=True, group=tp_group
            )
        if tp_group.size() > 1:
            return copy_to_tensor_model_parallel_region(hidden_sbh, group=tp_group)
        return hidden_sbh

    def _head_loss_kwargs(self, head_weight: torch.Tensor) -> dict:
        tp_group = self.pg_collection.tp
        return dict(
            chunk_tokens=self.loss_chunk_tokens,
            vocab_start=tp_group.rank() * head_weight.shape[0],
            tp_group=tp_group if tp_group.size() > 1 else None,
            kernel=self.loss_kernel,
        )

    def _depth_losses(self, depth_hidden, head_weight, input_ids, labels, loss_mask):
        if self.trunk_gradients != "joint" or not self.train_depths:
            # Untrained depths (λ ≡ 0) are scored for the log only: no graph through the head either,
            # or the backward would run the depth heads' matmuls for a zero gradient.
            head_weight = head_weight.detach()
        loss_sums, stats_d = [], []
        for k, hidden_sbh in enumerate(depth_hidden, start=1):
            targets = depth_targets(input_ids, labels, loss_mask, k, eod_id=self.eod_id)
            stats = linear_cross_entropy(
                self._head_input(hidden_sbh),
                head_weight,
                targets.labels_bs.t(),
                targets.loss_mask_bs.t(),
                check=False,  # _postprocess checked the labels once for every head
                **self._head_loss_kwargs(head_weight),
            )
            loss_sums.append(stats.loss_sum)
            stats_d.append(stats)
        return torch.stack(loss_sums).float(), depth_count_rows(stats_d)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's, with the MTP stack's Megatron submodules (TP/EP-sharded) sharded by their own rules."""
        from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
        from megatron.core.transformer.utils import sharded_state_dict_default

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.mtp_process:
            return state
        stack_prefix = f"{prefix}mtp_stack."
        for key in [k for k in state if k.startswith(stack_prefix)]:
            del state[key]
        # Sharded under the global depth (the state dict keeps local names, as Megatron's layers do), so a
        # checkpoint moves between placements: a split stage holds depths first_depth.. as 0..
        offset = self.mtp_depths.start - 1
        for i, depth in enumerate(self.mtp_stack.depths):
            for name, child in depth.named_children():
                # The TP group, as MegatronModule passes it: given a dp_cp_group but no tp_group, Megatron
                # marks a plain torch child (the norms) replica 0 on every TP rank and refuses the save.
                child_state = sharded_state_dict_default(
                    child,
                    f"{stack_prefix}depths.{i}.{name}.",
                    sharded_offsets,
                    metadata,
                    tp_group=self.pg_collection.tp,
                )
                if offset:
                    replace_prefix_for_sharding(
                        child_state, f"{stack_prefix}depths.{i}.", f"{stack_prefix}depths.{i + offset}."
                    )
                state.update(child_state)
        return state


def build_mtp_gpt_model(
    model_cfg: ModelConfig,
    mtp_cfg: MTPConfig,
    config: TransformerConfig,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    mtp_stage: int | None = None,
    eod_id: int | None = None,
    transformer_layer_spec=None,
    mtp_layer_spec: ModuleSpec | None = None,
    plan=None,
) -> MTPGPTModel:
    """A model provider body: GPTModel with the plugin's MTP on `mtp_stage` (default: as `config` plans it).

    plan: the run's `PipelinePlan` (`check_supported`'s); a split plan needs it, since `config` holds only
    the layout Megatron accepts (every depth on one stage).
    """
    from mtp_plugin.megatron.config import plan_from_config

    if plan is None:
        plan = plan_from_config(model_cfg, mtp_cfg, config)
    if mtp_stage is None:
        mtp_stage = plan.mtp_stage or 0
    depths = plan.depths_on(parallel_state.get_pipeline_model_parallel_rank()) if plan.is_split else None
    return MTPGPTModel(
        config,
        transformer_layer_spec or trunk_layer_spec(config, vp_stage=vp_stage),
        model_cfg.padded_vocab_size,
        model_cfg.seq_length,
        mtp_stage=mtp_stage,
        depths=depths,
        mtp_layer_spec=mtp_layer_spec,
        loss_chunk_tokens=mtp_cfg.loss_chunk_tokens,
        loss_kernel=mtp_cfg.loss_kernel,
        eod_id=eod_id if mtp_cfg.mask_across_eod else None,
        trunk_gradients=mtp_cfg.trunk_gradients,
        train_depths=mtp_cfg.trains_depths,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model_cfg.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
        vp_stage=vp_stage,
    )
