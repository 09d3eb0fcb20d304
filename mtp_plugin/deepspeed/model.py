"""MTP in a DeepSpeed `PipelineModule`: a flat list of layer specs, the loss in `loss_fn`.

    layers = [ TiedLayerSpec("embed", Embedding)               ids -> (h, ids, aux)
               LayerSpec(TrunkLayerPipe, i)  for i < L          (h, ids, aux) -> (h, ids, aux)
               LayerSpec(FinalNormPipe)                         h^0 = final_norm(h)
               TiedLayerSpec("embed", forward_fn=Emb(t_{i+k}))  appends Emb(shift_left(ids, k))   } k = 1..D
               LayerSpec(MTPDepthPipe, k)                       appends h^k = MTP_k(h^{k-1}, Emb) }
               TiedLayerSpec("embed" | "head", forward_fn=head) ]  the output head's stage
    loss_fn((h^0, h^1..h^D, ids, aux), (labels, loss_mask)) = L_main + λ Σ_k w_k L_k + aux

The pipe carries a tuple (DeepSpeed pipeline tutorial): every floating tensor in it gets a gradient on the
way back, integer tensors carry none, so the token ids travel with the hidden states to the stage that
runs the MTP depths (DeepSpeed's engine hands the labels to the last stage only, and only to `loss_fn`).
`aux` is the running sum of DeepSpeed's MoE gate losses times `moe_aux_loss_coeff` (Megatron-DeepSpeed's
convention: the MoE loss travels in the tuple and joins the loss on the last stage).

Tied weights (`TiedLayerSpec`): the embedding table is one module keyed "embed" on every stage that holds
a layer with that key, the copies initialised from the first stage and kept identical by DeepSpeed, which
sums their gradients over the stages that hold them every step. The MTP depths' Emb(t_{i+k}) comes from
that module on the MTP stage. With `untie_embeddings_and_output_weights` the head is its own module
("head"), otherwise the head is the embedding table itself. The head layer is the last layer, so its module
exists on the last stage, where `loss_fn` scores every head with it through the core chunked linear +
cross-entropy (no [tokens x vocab] logits kept: memory-flat), exactly like the Megatron path.

MTP placement (`stage_boundaries`): `last` puts the depths on the last stage with the head; `stage` puts
them on `mtp_stage`, with a last stage that only scores (Megatron's `... t m | L`); `split` spreads them
over consecutive stages from `mtp_stage` to the last (each stage's (lookup, depth) pairs; the tuple grows
by one hidden state per depth on the way, and each stage holding a lookup holds the tied "embed" module).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mtp_plugin.config import ModelConfig, MTPConfig
from mtp_plugin.core import (
    MTPDepth,
    depth_count_rows,
    depth_targets,
    linear_cross_entropy,
    shift_left,
    weighted_depth_loss,
)
from mtp_plugin.deepspeed.layers import NORM_EPS, MoEMLP, MoESettings, TransformerBlockOnly, TransformerLayer

EMBED_KEY = "embed"
HEAD_KEY = "head"


class Embedding(nn.Module):
    """The token embedding table [V_padded, h]; also the output head when the weights are tied.

    Its own forward is the first layer (token ids -> (h, ids, aux)): DeepSpeed saves and loads a tied
    module only through a layer that calls it without a `forward_fn`, and then copies it to the other
    stages, so the first occurrence of each tied key must be such a layer.
    """

    def __init__(self, vocab_size: int, hidden_size: int, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=std)

    def lookup(self, ids_bs: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids_bs, self.weight)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        """token ids -> (h, ids, aux); `aux` is a leaf that needs a gradient (the pipe sends one back)."""
        ids_bs = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        h_bsh = self.lookup(ids_bs)
        aux = torch.zeros(1, dtype=h_bsh.dtype, device=h_bsh.device, requires_grad=True)
        return h_bsh, ids_bs, aux


class OutputHead(nn.Module):
    """The untied output head's weight [V_padded, h]; its layer passes the tuple on to `loss_fn`."""

    def __init__(self, vocab_size: int, hidden_size: int, std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        nn.init.normal_(self.weight, std=std)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        return inputs


def embed_for_depth(depth: int):
    """forward_fn for depth k's embedding lookup: appends Emb(t_{i+k}) to the tuple."""

    def forward_fn(embedding: Embedding, inputs) -> tuple[torch.Tensor, ...]:
        ids_bs = inputs[-2]
        return (*inputs, embedding.lookup(shift_left(ids_bs, depth)))

    forward_fn.__name__ = f"embed_for_mtp_{depth}"
    return forward_fn


def output_head(module: nn.Module, inputs) -> tuple[torch.Tensor, ...]:
    """The tied head's layer passes the tuple on; `loss_fn` applies the head weight chunk by chunk."""
    return inputs


class TrunkLayerPipe(nn.Module):
    """Trunk layer i: (h, ids, aux) -> (h', ids, aux + coeff * its MoE gate loss)."""

    def __init__(self, model: ModelConfig, moe: MoESettings | None) -> None:
        super().__init__()
        self.layer = transformer_layer(model, moe)
        self.aux_coeff = model.moe_aux_loss_coeff

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        h_bsh, ids_bs, aux = inputs
        h_bsh, layer_aux = self.layer(h_bsh)
        return h_bsh, ids_bs, aux + self.aux_coeff * layer_aux


class FinalNormPipe(nn.Module):
    """The trunk's final norm: h^0, which feeds both the main head and MTP depth 1 (as in Megatron)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=NORM_EPS)

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        h_bsh, ids_bs, aux = inputs
        return self.norm(h_bsh), ids_bs, aux


class MTPDepthPipe(nn.Module):
    """Depth k: the core `MTPDepth` (enorm, hnorm, eh_proj, a block like the trunk's last layer, final norm).

    inputs: (h^0, .., h^{k-1}, ids, aux, Emb(t_{i+k})) -> (h^0, .., h^k, ids, aux).
    """

    def __init__(self, model: ModelConfig, depth: int, moe: MoESettings | None) -> None:
        super().__init__()
        hidden = model.hidden_size
        self.depth_index = depth
        self.aux_coeff = model.moe_aux_loss_coeff
        eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        eh_proj._is_eh_proj = True  # the ρ meter counts it as an MTP projection
        nn.init.normal_(eh_proj.weight, std=model.init_method_std)
        self.mtp = MTPDepth(
            enorm=nn.RMSNorm(hidden, eps=NORM_EPS),
            hnorm=nn.RMSNorm(hidden, eps=NORM_EPS),
            eh_proj=eh_proj,
            # Registered once, inside the core MTPDepth: a second attribute would give the MoE experts two
            # state-dict names, and DeepSpeed's MoE checkpointing saves per-expert files under one of them only.
            block=TransformerBlockOnly(transformer_layer(model, moe)),
            final_norm=nn.RMSNorm(hidden, eps=NORM_EPS),
        )

    def forward(self, inputs) -> tuple[torch.Tensor, ...]:
        *hiddens, ids_bs, aux, emb_bsh = inputs
        h_bsh = self.mtp(hiddens[-1], emb_bsh)
        aux = aux + self.aux_coeff * self.mtp.block.last_aux
        return (*hiddens, h_bsh, ids_bs, aux)


def transformer_layer(model: ModelConfig, moe: MoESettings | None) -> TransformerLayer:
    return TransformerLayer(
        hidden_size=model.hidden_size,
        num_heads=model.num_attention_heads,
        num_groups=model.num_query_groups or model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        rotary_base=model.rotary_base,
        std=model.init_method_std,
        num_layers=model.num_layers,
        moe=moe,
    )


@dataclasses.dataclass(kw_only=True)
class MTPLoss:
    """`loss_fn` of the pipeline: L_main + λ Σ_k w_k L_k + aux, per micro-batch (DeepSpeed averages them
    over gradient-accumulation steps and data-parallel ranks, as the Megatron path's default mode does).

    The trainer owns this object and sets `lam` (from the λ schedule at the tokens consumed so far) before
    each step, and `metrics` (an `MTPMetrics`) to collect the per-depth sums of the step.
    """

    num_depths: int
    depth_weights: tuple[float, ...]
    chunk_tokens: int
    eod_id: int | None
    lam: float = 0.0
    metrics: object | None = None
    head_weight_fn: object = None  # set by the PipelineModule: () -> the head's weight on this stage
    # Rows the heads ran on in differentiated calls (main, all depths), for the ρ meter's head FLOPs.
    scored_tokens: tuple[int, int] = (0, 0)

    def __call__(self, outputs, labels) -> torch.Tensor:
        *hiddens, ids_bs, aux = outputs
        labels_bs, loss_mask_bs = labels
        loss_mask_bs = loss_mask_bs.bool()
        weight = self.head_weight_fn()
        main = linear_cross_entropy(
            hiddens[0], weight, labels_bs, loss_mask_bs, chunk_tokens=self.chunk_tokens
        )
        loss = main.loss_sum / main.num_tokens.clamp(min=1)
        depth_sums, depth_counts = None, None
        if self.num_depths:
            stats = []
            for k in range(1, self.num_depths + 1):
                t = depth_targets(ids_bs, labels_bs, loss_mask_bs, k, eod_id=self.eod_id)
                stats.append(
                    linear_cross_entropy(
                        hiddens[k], weight, t.labels_bs, t.loss_mask_bs, chunk_tokens=self.chunk_tokens
                    )
                )
            loss = loss + weighted_depth_loss(
                depth_loss_sums=[s.loss_sum for s in stats],
                depth_num_tokens=[s.num_tokens for s in stats],
                lam=self.lam,
                depth_weights=self.depth_weights,
            )
            depth_sums = torch.stack([s.loss_sum.detach() for s in stats])
            depth_counts = depth_count_rows(stats).to(torch.float64)
        if torch.is_grad_enabled():
            rows = hiddens[0].numel() // hiddens[0].shape[-1]
            self.scored_tokens = (
                self.scored_tokens[0] + rows,
                self.scored_tokens[1] + rows * self.num_depths,
            )
        if self.metrics is not None:
            self.metrics.update(main.loss_sum.detach(), main.num_tokens.detach(), depth_sums, depth_counts)
        return loss + aux.reshape(())


def check_supported(
    model: ModelConfig, mtp: MTPConfig, *, num_stages: int = 1, tensor_parallel: int = 1, zero_stage: int = 1
) -> None:
    """Refuse, before any process group, what this backend cannot build (one line naming the field)."""
    defaults = ModelConfig()
    for field in dataclasses.fields(ModelConfig):
        if field.name in SUPPORTED_MODEL_FIELDS:
            continue
        value = getattr(model, field.name)
        if value != getattr(defaults, field.name):
            raise ValueError(
                f"model.{field.name}={value!r} is not supported by backend=deepspeed (DeepSpeed's softmax top-k "
                "MoE layer and the plugin's DeepSpeed GPT cannot express it); use backend=megatron, or "
                f"model.{field.name}={getattr(defaults, field.name)!r}"
            )
    if tensor_parallel > 1:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tensor_parallel}: backend=deepspeed has no tensor "
            "parallelism here (pipeline, data and expert parallel only); set it to 1"
        )
    if mtp.enabled:
        mtp.check_sequence_length(model.seq_length)
    if mtp.trunk_gradients != "joint" or (mtp.enabled and not mtp.trains_depths):
        what = (
            f"mtp.trunk_gradients={mtp.trunk_gradients}"
            if mtp.trunk_gradients != "joint"
            else "a constant λ of 0 with MTP depths (leaving them as they are)"
        )
        raise ValueError(
            f"{what} is not supported by backend=deepspeed (its engine trains and decays every parameter); "
            "use backend=megatron"
        )
    parts = stage_boundaries(model, mtp, num_stages)
    if model.is_moe and zero_stage >= 1 and num_stages > 1:
        # Which layer indices are MoE: trunk layer i is spec 1 + i; depth k's block is spec L + 2 + 2k - 1.
        moe_specs = {1 + i for i in range(model.first_dense_layers, model.num_layers)}
        moe_specs |= {model.num_layers + 2 * k + 1 for k in range(1, mtp.num_depths + 1)}
        for stage in range(num_stages):
            if not any(parts[stage] <= i < parts[stage + 1] for i in moe_specs):
                raise ValueError(
                    f"pipeline stage {stage} of {num_stages} holds no MoE layer (model.first_dense_layers="
                    f"{model.first_dense_layers}, {model.num_layers} layers): DeepSpeed's ZeRO optimizer then "
                    "builds another number of parameter groups there and its grad-norm reductions across stages "
                    "hang; lower model.first_dense_layers, use fewer stages, or backend.zero_stage=0"
                )


# ModelConfig fields this backend builds; any other field set away from its default is refused by name
# (e.g. multi-latent attention or sigmoid / expert-bias routing: DeepSpeed's gate is softmax top-k only).
SUPPORTED_MODEL_FIELDS = frozenset(
    {
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "ffn_hidden_size",
        "seq_length",
        "vocab_size",
        "make_vocab_size_divisible_by",
        "num_experts",
        "moe_router_topk",
        "moe_ffn_hidden_size",
        "moe_shared_expert_size",
        "first_dense_layers",
        "moe_aux_loss_coeff",
        # Megatron's dispatcher choice has no DeepSpeed counterpart (always all-to-all); it changes no math.
        "moe_token_dispatcher_type",
        "untie_embeddings_and_output_weights",
        "init_method_std",
        "rotary_base",
    }
)


def moe_settings(model: ModelConfig, *, ep_size: int, capacity_factor: float, min_capacity: int):
    if not model.is_moe:
        return None
    return MoESettings(
        num_experts=model.num_experts,
        topk=model.moe_router_topk,
        ffn_hidden_size=model.expert_ffn_hidden_size,
        shared_expert_size=model.moe_shared_expert_size,
        ep_size=ep_size,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
    )


def layer_specs(model: ModelConfig, mtp: MTPConfig, moe: MoESettings | None) -> list:
    """The flat layer list (module docstring). MoE layers after `first_dense_layers`; every MTP depth's
    block is built like the trunk's last layer (MoE when it is), as Megatron builds MTP from that spec."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    vocab, hidden, std = model.padded_vocab_size, model.hidden_size, model.init_method_std
    trunk_moe = [
        moe if (moe is not None and i >= model.first_dense_layers) else None for i in range(model.num_layers)
    ]
    specs: list = [TiedLayerSpec(EMBED_KEY, Embedding, vocab, hidden, std)]
    specs += [LayerSpec(TrunkLayerPipe, model, trunk_moe[i]) for i in range(model.num_layers)]
    specs.append(LayerSpec(FinalNormPipe, hidden))
    for k in range(1, mtp.num_depths + 1):
        specs.append(TiedLayerSpec(EMBED_KEY, Embedding, vocab, hidden, std, forward_fn=embed_for_depth(k)))
        specs.append(LayerSpec(MTPDepthPipe, model, k, trunk_moe[-1]))
    if model.untie_embeddings_and_output_weights:
        specs.append(TiedLayerSpec(HEAD_KEY, OutputHead, vocab, hidden, std))
    else:
        specs.append(TiedLayerSpec(EMBED_KEY, Embedding, vocab, hidden, std, forward_fn=output_head))
    return specs


def stage_boundaries(model: ModelConfig, mtp: MTPConfig, num_stages: int) -> list[int]:
    """DeepSpeed's `parts` for `layer_specs` (stage s holds layers [parts[s], parts[s+1])).

    The embedding starts stage 0; the trunk layers are split evenly over the stages up to the MTP stage
    (all stages without MTP); the final norm follows the last trunk layer; the D depths, each with its
    embedding lookup, sit on the MTP stage (`last`: the last stage; `stage`: `mtp_stage`, then a stage that
    only scores, Megatron's `... t m | L`); the head is the last layer.
    """
    num_layers, num_depths = model.num_layers, mtp.num_depths
    depths_per_stage = _split_depths(mtp, num_stages) if mtp.enabled and mtp.placement == "split" else None
    if depths_per_stage:
        mtp_stage = num_stages - len(depths_per_stage)
    else:
        mtp_stage = mtp.mtp_stage if (mtp.enabled and mtp.placement == "stage") else num_stages - 1
        depths_per_stage = [num_depths]
    trunk_stages = mtp_stage + 1
    if num_layers < trunk_stages:
        raise ValueError(
            f"model.num_layers={num_layers} cannot fill the {trunk_stages} pipeline stages up to the MTP stage; "
            "use fewer stages or more layers"
        )
    if mtp_stage < num_stages - 1 - len(depths_per_stage):
        raise ValueError(
            f"mtp.mtp_stage={mtp_stage} with {num_stages} stages leaves stages holding no layer (DeepSpeed's "
            f"pipeline needs a layer on every stage); use mtp.mtp_stage={num_stages - 2} or {num_stages - 1}"
        )
    per_stage, extra = divmod(num_layers, trunk_stages)
    parts, index = [0], 1  # index 0 is the embedding
    for stage in range(trunk_stages):
        index += per_stage + (1 if stage < extra else 0)
        if stage == trunk_stages - 1:
            index += 1 + 2 * depths_per_stage[0]  # final norm, then (embedding lookup, depth) per depth
        parts.append(index)
    for depths in depths_per_stage[1:]:  # a split's later depth stages
        index += 2 * depths
        parts.append(index)
    total = 1 + num_layers + 1 + 2 * num_depths + 1
    if len(parts) == num_stages:  # a scoring-only stage after the MTP stage
        parts.append(total)
    parts[-1] = total
    return parts


def _split_depths(mtp: MTPConfig, num_stages: int) -> list[int]:
    """Depths per stage of `split`, from its first depth stage to the last: one each by default (as many
    stages as depths, at most num_stages - 1); more depths than stages go one more to the earlier ones."""
    last = num_stages - 1
    first = mtp.mtp_stage if mtp.mtp_stage is not None else num_stages - min(mtp.num_depths, last)
    if not 1 <= first <= last:
        raise ValueError(
            f"mtp.placement='split' with mtp.mtp_stage={first}: the first depth stage must be in 1..{last}; use "
            "at least 2 pipeline stages and an mtp_stage >= 1"
        )
    if num_stages - first > mtp.num_depths:
        raise ValueError(
            f"mtp.placement='split' with mtp.mtp_stage={first} spreads {mtp.num_depths} depth(s) over "
            f"{num_stages - first} stages: more depth stages than depths; use mtp_stage >= {num_stages - mtp.num_depths}"
        )
    per, extra = divmod(mtp.num_depths, num_stages - first)
    return [per + (1 if i < extra else 0) for i in range(num_stages - first)]


def _pipeline_module_cls():
    from deepspeed.pipe import PipelineModule

    class MTPGPTPipe(PipelineModule):
        """PipelineModule of `layer_specs`, with `stage_boundaries` as its partition and `loss` as loss_fn.

        Why the partition is set here: DeepSpeed's partitioners weigh layers by parameters or by a type
        regex and settle ties of weightless layers (embedding lookups, norms, the head) by position, which
        can put the head before the MTP depths' stage or split a depth from its embedding lookup. The plan
        is the placement `mtp.placement` asks for, so `_partition_layers` takes it instead of a method.
        """

        def __init__(
            self,
            *,
            model: ModelConfig,
            mtp: MTPConfig,
            loss: MTPLoss,
            moe,
            num_stages,
            topology=None,
            **kwargs,
        ):
            self._plan = stage_boundaries(model, mtp, num_stages)
            self._head_key = HEAD_KEY if model.untie_embeddings_and_output_weights else EMBED_KEY
            super().__init__(
                layers=layer_specs(model, mtp, moe),
                num_stages=None if topology is not None else num_stages,
                topology=topology,
                loss_fn=loss,
                **kwargs,
            )
            loss.head_weight_fn = self.head_weight
            self.model_config, self.mtp_config = model, mtp
            if moe is not None and moe.ep_size > 1:
                ep_rank = self._grid.get_data_parallel_rank() % moe.ep_size
                for module in self.modules():
                    if isinstance(module, MoEMLP):
                        module.init_local_experts(ep_rank)
            elif moe is not None:
                for module in self.modules():
                    if isinstance(module, MoEMLP):
                        module.init_local_experts(0)

        def _partition_layers(self, method="uniform"):
            self.parts = list(self._plan)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

        def head_weight(self) -> torch.Tensor:
            return self.tied_modules[self._head_key].weight

    return MTPGPTPipe


def build_pipeline_module(
    model: ModelConfig,
    mtp: MTPConfig,
    *,
    num_stages: int,
    loss: MTPLoss,
    ep_size: int = 1,
    capacity_factor: float = 0.0,
    min_capacity: int = 4,
    seed: int = 1234,
    topology=None,
    zero_stage: int = 1,
):
    """The MTP GPT as a DeepSpeed PipelineModule on this rank (torch.distributed must be initialised).

    Layer i is built right after `torch.manual_seed(seed + i)` (`seed_layers`), so the initial weights do
    not depend on the number of stages: one stage and two stages start from the same model.
    """
    check_supported(model, mtp, num_stages=num_stages, zero_stage=zero_stage)
    moe = moe_settings(model, ep_size=ep_size, capacity_factor=capacity_factor, min_capacity=min_capacity)
    return _pipeline_module_cls()(
        model=model,
        mtp=mtp,
        loss=loss,
        moe=moe,
        num_stages=num_stages,
        topology=topology,
        seed_layers=True,
        seed_fn=_manual_seed,
        base_seed=seed,
    )


def _manual_seed(seed) -> None:
    torch.manual_seed(int(seed))


def create_expert_groups(pipe, ep_size: int) -> None:
    """Create DeepSpeed's expert-parallel groups on every rank before `deepspeed.initialize`.

    DeepSpeed creates them (collective `new_group` calls over the whole world) from inside the engine, only
    on ranks that hold an MoE layer: a stage of dense layers only (the first stage, with
    `first_dense_layers`) would never join, and the ranks that do would wait for it forever. A throwaway
    MoE layer's public `set_deepspeed_parallelism` makes every rank create the same groups, in the same
    order; the engine then finds them and only attaches them to the real layers. `groups.mpu` is set to the
    pipeline grid first, as the engine itself does, so that the groups stay within each stage.
    """
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    groups.mpu = pipe.mpu()
    probe = MoE(hidden_size=1, expert=nn.Linear(1, 1), num_experts=ep_size, ep_size=ep_size)
    probe.set_deepspeed_parallelism()


def optimizer_param_groups(pipe, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on norms (Megatron's default), experts in DeepSpeed's
    MoE group (`moe`: True, named by the expert group) so ZeRO reduces them over the expert-data-parallel
    ranks. Every stage builds the same groups in the same order (DeepSpeed reduces per group across stages)."""
    from deepspeed.moe.utils import is_moe_param

    dense = [p for p in pipe.parameters() if not is_moe_param(p)]
    groups = [
        {"name": "decay", "params": [p for p in dense if p.dim() > 1], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in dense if p.dim() <= 1], "weight_decay": 0.0},
    ]
    experts = [p for p in pipe.parameters() if is_moe_param(p)]
    if experts:
        groups.append(
            {"name": experts[0].group_name, "moe": True, "params": experts, "weight_decay": weight_decay}
        )
    return groups


def initialize_engine(pipe, ds_config: dict, *, weight_decay: float, ep_size: int | None = None):
    """`deepspeed.initialize` of the pipeline module; returns DeepSpeed's PipelineEngine."""
    import deepspeed

    if ep_size is not None:
        create_expert_groups(pipe, ep_size)
    engine, _, _, _ = deepspeed.initialize(
        model=pipe, model_parameters=optimizer_param_groups(pipe, weight_decay), config=ds_config
    )
    return engine
