"""The planner's arithmetic: parameters per pipeline stage, per-GPU memory, FLOPs, ρ and 1F1B step times.

Pure functions of the experiment's dataclasses and of a parameter table (`ParamRecord`s, taken from the
model built on the meta device by `mtp_plugin.plan.build`); no Megatron import here.

Parameters per stage follow Megatron's rules for what a GPTModel stage holds: the word embedding on the
stage with `E` and on every stage running a depth (its copy), decoder layer i where the layout puts it, the
trunk's final norm with its last layer when MTP is on (else on the loss stage), depth k where its `m` is,
the output layer on the loss stage (a tied head there is one more copy of the embedding unless the stage
holds the table already, for `E` or for MTP). Per GPU, tensor-parallel weights divide by the tensor-parallel size and routed experts
by the expert-parallel size.

Memory per GPU (bytes per parameter): weights 2 (bf16) or 4, gradients 4 (Megatron DDP reduces in fp32),
Adam 8 plus 4 for bf16's fp32 main copy, sharded over the data-parallel ranks under the distributed
optimizer (routed experts over their own, expert data-parallel ranks). Activations: what the
plugin's local-spec layers keep for backward per micro-batch (unfused attention keeps the fp32 softmax
and its bf16 copy, b·heads·s² each; SwiGLU keeps its input, the silu output and the product; torch
RMSNorm its input and normalised output), times the micro-batches a 1F1B stage holds at once
(pipeline size - stage index, at most the number of micro-batches), less what the recompute choices
drop, plus one layer's backward transient and the head's logits.

Stage cost: training FLOPs of one micro-batch (forward x3, plus the forward again of what is recomputed),
or, from a costs file that `benchmarks/layer_costs.py` measured (`measured_item_costs`), milliseconds of
forward + backward of one micro-batch per piece (plus the forward again of a recomputed layer).
A 1F1B step over m micro-batches then takes Σ_s c_s + (m - 1) · max_s c_s (fill and drain, the bubble,
plus the steady state paced by the slowest stage); `placements` evaluates that for each MTP placement with
the trunk layers balanced by a contiguous partition that minimises the slowest stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtp_plugin.accounting.flops import (
    LayerShape,
    attention_score_flops,
    linear_flops,
    output_head_flops,
    transformer_layer_flops,
)
from mtp_plugin.accounting.model_flops import TokenFlops, model_shape
from mtp_plugin.config import ExperimentConfig, ModelConfig

GIB = 1024**3


@dataclass(frozen=True)
class ParamRecord:
    """One parameter of the built model (pp = tp = ep = 1): its name, size and how parallelism splits it."""

    name: str
    numel: int
    expert: bool  # a routed expert's weight: split over the expert-parallel ranks
    tp_sharded: bool  # split over the tensor-parallel ranks


# ------------------------------------------------------------------------------------------ shapes


def layer_is_moe(model: ModelConfig, index: int) -> bool:
    return model.is_moe and index >= model.first_dense_layers


# ------------------------------------------------------------------------------------------ parameters


@dataclass
class ParamTotals:
    """Parameter counts of the whole model (every shard), split as the report needs them."""

    main: int  # embedding + trunk + output head, each counted once
    active: int  # main with routed experts counted top_k / num_experts (what one token touches)
    mtp_unique: int  # the MTP depths' own parameters
    embedding: int
    head: int  # the output layer's own weight (0 when tied)

    @property
    def mtp_with_shared(self) -> int:
        """The MTP modules as a standalone checkpoint holds them: plus the embedding and head they share."""
        return self.mtp_unique + self.embedding + (self.head or self.embedding)


def param_totals(records: list[ParamRecord], model: ModelConfig) -> ParamTotals:
    main = sum(r.numel for r in records if not r.name.startswith("mtp_stack."))
    experts = sum(r.numel for r in records if r.expert and not r.name.startswith("mtp_stack."))
    active_experts = experts * model.moe_router_topk // model.num_experts if model.is_moe else 0
    return ParamTotals(
        main=main,
        active=main - experts + active_experts,
        mtp_unique=sum(r.numel for r in records if r.name.startswith("mtp_stack.")),
        embedding=sum(r.numel for r in records if r.name.startswith("embedding.")),
        head=sum(r.numel for r in records if r.name.startswith("output_layer.")),
    )


@dataclass
class StageParams:
    """Parameters one pipeline stage holds: all its shards together, and on one of its GPUs."""

    total: int = 0
    per_gpu: float = 0.0
    per_gpu_expert: float = 0.0  # of per_gpu: routed experts (sharded by the expert data-parallel group)
    per_gpu_mtp: float = 0.0  # of per_gpu: the MTP depths' own parameters


def _layer_stage(stages: tuple[str, ...]) -> list[int]:
    return [s for s, stage in enumerate(stages) for c in stage if c == "t"]


def stage_params(
    records: list[ParamRecord], stages: tuple[str, ...], experiment: ExperimentConfig
) -> list[StageParams]:
    """What each stage of `stages` (a PipelinePlan's E/t/m/L strings) holds under Megatron's rules."""
    model, par = experiment.model, experiment.parallel
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    num_depths = experiment.mtp.num_depths
    layer_stage = _layer_stage(stages)
    loss_stage = next(s for s, st in enumerate(stages) if "L" in st)
    embed_stages = [s for s, st in enumerate(stages) if "E" in st or "m" in st]
    depth_stage = [s for s, st in enumerate(stages) for c in st if c == "m"]  # depth k's stage at k - 1
    tied = not model.untie_embeddings_and_output_weights
    out = [StageParams() for _ in stages]

    def add(stage: int, record: ParamRecord) -> None:
        share = record.numel / (tp if record.tp_sharded else 1) / (ep if record.expert else 1)
        out[stage].total += record.numel
        out[stage].per_gpu += share
        if record.expert:
            out[stage].per_gpu_expert += share
        if record.name.startswith("mtp_stack."):
            out[stage].per_gpu_mtp += share

    for record in records:
        name = record.name
        if name.startswith("embedding."):
            targets = list(embed_stages)
            # A tied head on a stage without the table (no E, no MTP) holds a copy of it (output_layer.weight).
            loss_has_table = loss_stage in embed_stages
            if tied and name == "embedding.word_embeddings.weight" and not loss_has_table:
                targets.append(loss_stage)
        elif name.startswith("decoder.layers."):
            targets = [layer_stage[int(name.split(".")[2])]]
        elif name.startswith("decoder.final_layernorm."):
            targets = [layer_stage[-1] if num_depths else loss_stage]
        elif name.startswith("mtp_stack.depths."):
            targets = [depth_stage[int(name.split(".")[2])]]
        elif name.startswith("output_layer."):
            targets = [loss_stage]
        else:
            raise ValueError(f"planner: parameter {name!r} has no pipeline-stage rule; teach stage_params it")
        for stage in targets:
            add(stage, record)
    return out


# ------------------------------------------------------------------------------------------ memory


@dataclass
class StageMemory:
    """Estimated peak bytes on one GPU of a stage, by what holds them."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    mtp: float  # of the sum: the MTP depths' parameters (all three kinds) and activations
    micro_batches_in_flight: int

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_gib(self, device_memory_gib: float) -> dict:
        return {
            "weights": self.weights / GIB,
            "gradients": self.gradients / GIB,
            "optimizer": self.optimizer / GIB,
            "activations": self.activations / GIB,
            "mtp": self.mtp / GIB,
            "total": self.total / GIB,
            "micro_batches_in_flight": self.micro_batches_in_flight,
            "fits": self.total / GIB <= device_memory_gib,
        }


@dataclass
class _Activation:
    kept: float = 0.0  # bytes kept for backward
    transient: float = 0.0  # bytes alive on top of everything kept while this piece runs its backward


def _attention_activation(model: ModelConfig, tokens: int, micro_batch: int, act: int) -> tuple[float, float]:
    """(kept except the scores, the s x s scores) bytes of one attention block, one micro-batch."""
    h, heads = model.hidden_size, model.num_attention_heads
    if model.multi_latent_attention:
        qk = model.qk_head_dim + model.qk_pos_emb_head_dim
        latents = 2 * (model.q_lora_rank or 0) + 2 * model.kv_lora_rank
        # norm (input, normalised), down-projection input, latents and their norms, q/k/v, context
        per_token = 3 * h + latents + heads * (2 * qk + model.v_head_dim) + heads * model.v_head_dim
    else:
        d = h // heads
        per_token = 3 * h + 3 * heads * d + heads * d  # norm, q/k/v (GQA keys expanded), context
    seq = model.seq_length
    # Unfused attention (the local spec's DotProductAttention): the fp32 softmax and its bf16 copy.
    scores = micro_batch * heads * seq * seq * (4 + act if act < 4 else 4)
    return tokens * per_token * act, scores


def _mlp_activation(model: ModelConfig, moe: bool, tokens: int, act: int) -> dict[str, float]:
    h = model.hidden_size
    parts = {"layernorm": 2 * h * tokens * act, "input": h * tokens * act}
    if not moe:
        parts["mlp"] = 4 * model.ffn_hidden_size * tokens * act
        return parts
    k, f = model.moe_router_topk, model.expert_ffn_hidden_size
    # per routed copy: the expert's input and output, fc1 output (2f), silu output and product (2f)
    parts["moe"] = k * tokens * (2 * h + 2 * f) * act + 2 * tokens * model.num_experts * 4
    parts["moe_act"] = k * tokens * 2 * f * act
    if model.moe_shared_expert_size:
        parts["shared_experts"] = 4 * model.moe_shared_expert_size * tokens * act
    return parts


def layer_activation(experiment: ExperimentConfig, moe: bool, *, recomputed_full: bool) -> _Activation:
    """Bytes one trunk layer keeps per micro-batch (and its backward transient), after recompute."""
    model, par, tr = experiment.model, experiment.parallel, experiment.training
    act = 2 if experiment.backend.params_dtype == "bfloat16" else 4
    tokens = tr.micro_batch_size * model.seq_length
    tp = par.tensor_model_parallel_size
    attn, scores = _attention_activation(model, tokens, tr.micro_batch_size, act)
    attn, scores = attn / tp, scores / tp
    mlp = {k: v / tp for k, v in _mlp_activation(model, moe, tokens, act).items()}
    kept = attn + scores + sum(mlp.values())
    # Backward of the unfused softmax: fp32 gradient and its result, on top of what is kept.
    transient = scores * (8 / (4 + act) if act < 4 else 2)
    if recomputed_full:
        layer_input = tokens * model.hidden_size * act / tp
        return _Activation(kept=layer_input, transient=kept + transient)
    dropped = 0.0
    modules = set(par.recompute_modules) if par.recompute_granularity == "selective" else set()
    if "core_attn" in modules:
        dropped += scores
    if "mla_up_proj" in modules and model.multi_latent_attention:
        qk = model.qk_head_dim + model.qk_pos_emb_head_dim
        dropped += tokens * model.num_attention_heads * (2 * qk + model.v_head_dim) * act / tp
    if "layernorm" in modules:
        dropped += 2 * (2 * model.hidden_size * tokens * act / tp)  # both norms keep only their input
    # Megatron's "moe" recomputes the whole MoE layer (shared experts included); the others one part.
    parts = {"mlp": {"mlp"}, "moe": {"moe", "moe_act", "shared_experts"}, "moe_act": {"moe_act"}}
    parts["shared_experts"] = {"shared_experts"}
    dropped_parts = set().union(*(parts[name] for name in modules if name in parts))
    dropped += sum(mlp.get(name, 0.0) for name in dropped_parts)
    return _Activation(kept=kept - dropped, transient=transient + (scores if "core_attn" in modules else 0))


def _recomputed_full(experiment: ExperimentConfig, position_in_stage: int, layers_in_stage: int) -> bool:
    par = experiment.parallel
    if par.recompute_granularity != "full":
        return False
    if par.recompute_method == "uniform":
        return True
    return position_in_stage < min(par.recompute_num_layers, layers_in_stage)


def stage_memory(
    experiment: ExperimentConfig,
    stages: tuple[str, ...],
    params: list[StageParams],
    *,
    data_parallel_size: int,
) -> list[StageMemory]:
    model, par, tr, mtp = experiment.model, experiment.parallel, experiment.training, experiment.mtp
    bf16 = experiment.backend.params_dtype == "bfloat16"
    act = 2 if bf16 else 4
    weight_bytes = 2 if bf16 else 4
    optimizer_bytes = 12 if bf16 else 8
    dp_dense = data_parallel_size * par.context_parallel_size
    dp_expert = max(1, dp_dense // par.expert_model_parallel_size)
    num_micro = tr.num_micro_batches(data_parallel_size)
    tokens = tr.micro_batch_size * model.seq_length
    tp = par.tensor_model_parallel_size
    vocab = model.padded_vocab_size // tp
    layer_stage = _layer_stage(stages)
    out = []
    for s, stage in enumerate(stages):
        p = params[s]
        if experiment.backend.use_distributed_optimizer:
            optimizer = optimizer_bytes * (
                (p.per_gpu - p.per_gpu_expert) / dp_dense + p.per_gpu_expert / dp_expert
            )
        else:
            optimizer = optimizer_bytes * p.per_gpu
        per_param = weight_bytes + 4 + optimizer / max(p.per_gpu, 1)
        own = [i for i, st in enumerate(layer_stage) if st == s]
        kept, transient = 0.0, 0.0
        for position, i in enumerate(own):
            a = layer_activation(
                experiment,
                layer_is_moe(model, i),
                recomputed_full=_recomputed_full(experiment, position, len(own)),
            )
            kept += a.kept
            transient = max(transient, a.transient)
        mtp_kept = 0.0
        if "m" in stage:
            last_moe = layer_is_moe(model, model.num_layers - 1)
            depth = layer_activation(experiment, last_moe, recomputed_full=False)
            # enorm and hnorm (input, normalised) and eh_proj's 2h input, then the depth's layer
            mtp_kept = stage.count("m") * (8 * model.hidden_size * tokens * act / tp + depth.kept)
            transient = max(transient, depth.transient)
        if "L" in stage:
            # Main head: Megatron's vocab-parallel cross-entropy keeps the fp32 softmax of the logits;
            # while it runs, the bf16 logits and an fp32 copy are alive too.
            kept += tokens * vocab * 4 + tokens * model.hidden_size * act
            head_transient = tokens * vocab * (act + 4)
            if mtp.num_depths:
                if mtp.loss_chunk_tokens:
                    mtp_kept += mtp.num_depths * tokens * model.hidden_size * act
                    head_transient = max(head_transient, 3 * 4 * min(mtp.loss_chunk_tokens, tokens) * vocab)
                else:
                    mtp_kept += mtp.num_depths * tokens * vocab * 4
            transient = max(transient, head_transient)
        in_flight = min(len(stages) - s, num_micro)
        activations = in_flight * (kept + mtp_kept) + transient
        out.append(
            StageMemory(
                weights=weight_bytes * p.per_gpu,
                gradients=4 * p.per_gpu,
                optimizer=optimizer,
                activations=activations,
                mtp=p.per_gpu_mtp * per_param + in_flight * mtp_kept,
                micro_batches_in_flight=in_flight,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ FLOPs


def rho_by_depth(model: ModelConfig, flops: TokenFlops, num_depths: int) -> list[dict]:
    """ρ ceiling for k = 0..D depths: (1 + k) log2 V bits per token over the step's training FLOPs."""
    bits = math.log2(model.vocab_size)
    rows = []
    for k in range(num_depths + 1):
        train = flops.training(k)
        rows.append(
            {
                "depths": k,
                "training_flops_per_token": train,
                "rho_bits_per_gflop": (1 + k) * bits / train * 1e9,
                "flops_vs_ntp": train / flops.training(0),
            }
        )
    return rows


def item_costs(experiment: ExperimentConfig) -> dict[str, list[float]]:
    """Training FLOPs of one micro-batch for each pipeline item: E, each trunk layer t_i, each depth m_k, L.

    The MTP stage runs eh_proj and the depth's layer; the loss stage runs the main head and every depth's
    head (the plugin scores the depths there).
    """
    model, par, tr = experiment.model, experiment.parallel, experiment.training
    shape = model_shape(model)
    tokens = tr.micro_batch_size * model.seq_length
    tp = par.tensor_model_parallel_size
    seq = model.seq_length

    def layer(kind: LayerShape, recomputed_full: bool) -> float:
        forward = transformer_layer_flops(kind, num_tokens=tokens, seq_length=seq, causal_half=True)
        extra = forward if recomputed_full else 0.0
        if par.recompute_granularity == "selective" and "core_attn" in par.recompute_modules:
            extra += attention_score_flops(
                kind.attention, num_tokens=tokens, seq_length=seq, causal_half=True
            )
        return (3 * forward + extra) / tp

    per_stage_layers = par.recompute_num_layers or 0
    trunk = []
    for i in range(model.num_layers):
        kind = shape.layer if layer_is_moe(model, i) else (shape.dense_layer or shape.layer)
        full = par.recompute_granularity == "full" and (
            par.recompute_method == "uniform" or i < per_stage_layers
        )
        trunk.append(layer(kind, full))
    head = 3 * output_head_flops(
        hidden_size=model.hidden_size, vocab_size=model.padded_vocab_size, num_tokens=tokens
    )
    depth = 3 * linear_flops(tokens, 2 * model.hidden_size, model.hidden_size) / tp + layer(
        shape.mtp_layer, False
    )
    num_depths = experiment.mtp.num_depths
    return {"E": [0.0], "t": trunk, "m": [depth] * num_depths, "L": [head * (1 + num_depths) / tp]}


LAYER_COSTS_SCHEMA = "mtp_plugin.layer_costs/1"


def measured_item_costs(experiment: ExperimentConfig, costs: dict) -> dict[str, list[float]]:
    """`item_costs` in milliseconds from a costs file of `benchmarks/layer_costs.py` (one GPU, parallel
    sizes 1): each trunk layer its kind's forward + backward (plus its forward again under full
    recompute), each depth one depth's, the loss stage the main head's plus one depth head's per depth.

    The file's shape need not be the experiment's (a scaled-down shape that fits one GPU): the layer
    counts, D and the recompute choice are the experiment's, the per-piece times the file's.
    """
    if costs.get("schema") != LAYER_COSTS_SCHEMA:
        raise ValueError(
            f"costs file schema {costs.get('schema')!r} is not {LAYER_COSTS_SCHEMA!r}; write it with "
            "benchmarks/layer_costs.py"
        )
    items = costs["items"]
    model, par = experiment.model, experiment.parallel
    needed = ["embedding", "depth", "head", "depth_head"]
    needed += ["moe_layer"] if model.is_moe else []
    needed += ["dense_layer"] if not model.is_moe or model.first_dense_layers else []
    missing = [name for name in needed if name not in items]
    if missing:
        raise ValueError(
            f"costs file has no {', '.join(missing)}; measure it with benchmarks/layer_costs.py for a model "
            f"{'with' if model.is_moe else 'without'} experts"
        )

    def layer(name: str, recomputed_full: bool) -> float:
        item = items[name]
        return item["fwd_bwd_ms"] + (item["fwd_ms"] if recomputed_full else 0.0)

    trunk = []
    for i in range(model.num_layers):
        full = par.recompute_granularity == "full" and (
            par.recompute_method == "uniform" or i < (par.recompute_num_layers or 0)
        )
        trunk.append(layer("moe_layer" if layer_is_moe(model, i) else "dense_layer", full))
    num_depths = experiment.mtp.num_depths
    head = items["head"]["fwd_bwd_ms"] + num_depths * items["depth_head"]["fwd_bwd_ms"]
    return {
        "E": [items["embedding"]["fwd_bwd_ms"]],
        "t": trunk,
        "m": [items["depth"]["fwd_bwd_ms"]] * num_depths,
        "L": [head],
    }


def stage_costs(stages: tuple[str, ...], costs: dict[str, list[float]]) -> list[float]:
    counters = {"E": 0, "t": 0, "m": 0, "L": 0}
    out = []
    for stage in stages:
        total = 0.0
        for c in stage:
            total += costs[c][counters[c]]
            counters[c] += 1
        out.append(total)
    return out


def one_f_one_b_time(costs: list[float], num_micro_batches: int) -> float:
    """Fill and drain (Σ of the stages) plus the steady state paced by the slowest stage."""
    return sum(costs) + (num_micro_batches - 1) * max(costs)


# ------------------------------------------------------------------------------------------ placements

PLACEMENTS = {
    "last": "every depth, the head and the loss on the last stage (Megatron's default)",
    "mtp_stage": "the depths on the last trunk stage, the head and loss on a stage of their own (t m | L)",
    "standalone": "the depths on a stage of their own, then a loss stage (m | L)",
    "split": "the depths spread over two or more consecutive stages after the trunk (mtp.placement=split)",
}


def _allowed(placement: str, segment: str, is_last: bool, num_depths: int) -> bool:
    m = segment.count("m")
    if placement == "last":
        return is_last or not (m or "L" in segment)
    if placement == "mtp_stage":
        if "L" in segment:
            return segment == "L"
        return True
    if placement == "standalone":
        if "L" in segment:
            return segment == "L"
        return not m or set(segment) == {"m"}
    if placement == "split":
        return m < num_depths  # no stage holds every depth: they spread over two or more stages
    raise ValueError(f"unknown placement {placement!r}; use one of {sorted(PLACEMENTS)}")


def balanced_layout(placement: str, num_stages: int, costs: dict[str, list[float]]) -> tuple[str, ...] | None:
    """The contiguous split of E t.. m.. L into `num_stages` non-empty stages allowed by `placement` that
    minimises the slowest stage; None when the placement does not fit that many stages."""
    items = "E" + "t" * len(costs["t"]) + "m" * len(costs["m"]) + "L"
    weights = costs["E"] + costs["t"] + costs["m"] + costs["L"]
    n = len(items)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[j][i]: smallest slowest-stage cost of items[:i] in j stages; cut[j][i] the start of the last one.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for j in range(1, num_stages + 1):
        for i in range(j, n + 1):
            for start in range(j - 1, i):
                if best[j - 1][start] == inf or not _allowed(
                    placement, items[start:i], i == n and j == num_stages, len(costs["m"])
                ):
                    continue
                value = max(best[j - 1][start], prefix[i] - prefix[start])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, start
    if best[num_stages][n] == inf:
        return None
    stages, i = [], n
    for j in range(num_stages, 0, -1):
        start = cut[j][i]
        stages.append(items[start:i])
        i = start
    return tuple(reversed(stages))


def layout_string(stages: tuple[str, ...]) -> str:
    """('Ettt', 'tm', 'L') -> 'Et*3|tm|L' (Megatron's pipeline_model_parallel_layout grammar)."""
    out = []
    for stage in stages:
        parts, pos = [], 0
        while pos < len(stage):
            c, run = stage[pos], 1
            while pos + run < len(stage) and stage[pos + run] == c:
                run += 1
            parts.append(c if run == 1 else f"{c}*{run}")
            pos += run
        out.append("".join(parts))
    return "|".join(out)


@dataclass
class PlacementResult:
    name: str
    description: str
    stages: tuple[str, ...]
    stage_costs: list[float]
    step_time: float
    num_micro_batches: int
    step_time_rel: float = 1.0
    unit: str = "flops"  # of stage_costs and step_time: "flops" (training FLOPs) or "ms" (measured)

    def to_json(self) -> dict:
        out = {
            "name": self.name,
            "description": self.description,
            "layout": layout_string(self.stages),
            "step_time_rel": self.step_time_rel,
            "idle_fraction": self.idle_fraction,
            "stage_spread": self.stage_spread,
        }
        if self.unit == "ms":
            out.update(stage_ms=list(self.stage_costs), step_time_ms=self.step_time)
        else:
            out["stage_tflops"] = [c / 1e12 for c in self.stage_costs]
        return out

    @property
    def stage_spread(self) -> float:
        """(slowest - fastest) / slowest stage: 0 when the stages are balanced."""
        slowest = max(self.stage_costs)
        return (slowest - min(self.stage_costs)) / slowest if slowest else 0.0

    @property
    def idle_fraction(self) -> float:
        """Share of the stages' time spent waiting (the bubble plus waiting on the slowest stage)."""
        busy = sum(self.stage_costs) * self.num_micro_batches
        return 1 - busy / (len(self.stages) * self.step_time)


def compare_placements(
    experiment: ExperimentConfig,
    configured: tuple[str, ...],
    num_micro_batches: int,
    measured: dict | None = None,
) -> list[PlacementResult]:
    """The configured layout, then each MTP placement with its trunk balanced, relative to `last`.

    measured: a costs file of `benchmarks/layer_costs.py` (stage costs in ms); default the FLOPs model.
    """
    costs = item_costs(experiment) if measured is None else measured_item_costs(experiment, measured)
    unit = "flops" if measured is None else "ms"
    pp = len(configured)
    results = [
        PlacementResult(
            name="configured",
            description="the layout this configuration trains with",
            stages=configured,
            stage_costs=stage_costs(configured, costs),
            step_time=0.0,
            num_micro_batches=num_micro_batches,
            unit=unit,
        )
    ]
    if experiment.mtp.num_depths:
        for name, description in PLACEMENTS.items():
            if name == "split" and experiment.mtp.num_depths < 2:
                continue
            stages = balanced_layout(name, pp, costs)
            if stages is None:
                continue
            results.append(
                PlacementResult(
                    name=name,
                    description=description,
                    stages=stages,
                    stage_costs=stage_costs(stages, costs),
                    step_time=0.0,
                    num_micro_batches=num_micro_batches,
                    unit=unit,
                )
            )
    for r in results:
        r.step_time = one_f_one_b_time(r.stage_costs, num_micro_batches)
    reference = next((r for r in results if r.name == "last"), results[0])
    for r in results:
        r.step_time_rel = r.step_time / reference.step_time
    return results
