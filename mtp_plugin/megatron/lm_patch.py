"""Drop-in MTP for Megatron-LM jobs built on `pretrain_gpt.py` (Megatron-LM core_v0.16 – core_v0.19).

Three of the job's own pieces are swapped through `pretrain()`'s official hooks; nothing in Megatron-LM
is patched (examples/megatron_lm/README.md shows the diff):

    extra_args_provider = add_mtp_args               # the --mtp-plugin-* flags
    model_provider      = model_provider             # GPTModel + the plugin's MTP depths
    forward_step_func   = make_forward_step(get_batch)   # the job's get_batch, the plugin's loss

Keep Megatron's `--mtp-num-layers D`: it is what tells Megatron-LM's data path (tokens reach the MTP
stage), pipeline layout and embedding group that D MTP layers exist. The plugin's provider builds its
own depths in place of Megatron's MTP block, so `--mtp-loss-scaling-factor` is unused; λ comes from
`--mtp-plugin-lambda-*`, a function of the tokens consumed so far (args.consumed_train_samples x
seq_length). The loss function's report carries `mtp_{k} loss` and `mtp_{k} acceptance` as (sum, count)
pairs, which Megatron-LM's `training_log` averages over data-parallel ranks and prints like `lm loss`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mtp_plugin.config import LambdaScheduleConfig, ModelConfig, MTPConfig, ParallelConfig
from mtp_plugin.core.schedules import SCHEDULE_KINDS

# Field order of pretrain_gpt.get_batch's return value: core_v0.19 returns BATCH_KEYS (alphabetical);
# core_v0.16 – v0.18 return (tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params).
_BATCH_KEYS_V019 = (
    "attention_mask",
    "cu_seqlens",
    "cu_seqlens_padded",
    "hybrid_cp_group",
    "labels",
    "local_cp_size",
    "loss_mask",
    "max_seqlen",
    "position_ids",
    "tokens",
)
_BATCH_KEYS_V016 = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids", "packed_seq_params")


def add_mtp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: the plugin's flags, all prefixed `--mtp-plugin-`."""
    group = parser.add_argument_group("mtp-plugin", "DeepSeek-V3-style multi-token prediction (mtp_plugin)")
    group.add_argument(
        "--mtp-plugin-num-depths",
        type=int,
        default=None,
        help="D, sequential MTP depths. Default: Megatron's --mtp-num-layers, which must be set and equal.",
    )
    group.add_argument(
        "--mtp-plugin-lambda-schedule",
        choices=sorted(SCHEDULE_KINDS),
        default="constant",
        help="λ as a function of consumed tokens: constant | piecewise | linear | cosine.",
    )
    group.add_argument(
        "--mtp-plugin-lambda-values",
        type=float,
        nargs="+",
        default=[0.1],
        help="constant: one λ; piecewise: one more than the boundaries (DeepSeek-V3: 0.3 0.1); "
        "linear/cosine: start end.",
    )
    group.add_argument(
        "--mtp-plugin-lambda-boundaries",
        type=float,
        nargs="*",
        default=[],
        help="In tokens. piecewise: where λ steps (DeepSeek-V3: 10e12); linear/cosine: start_tokens end_tokens.",
    )
    group.add_argument(
        "--mtp-plugin-depth-weights",
        type=float,
        nargs="*",
        default=[],
        help="w_k per depth, summing to 1 (default 1/D each).",
    )
    group.add_argument(
        "--mtp-plugin-chunk-tokens",
        type=int,
        default=0,
        help="Tokens per chunk of the fused head + cross-entropy (0: full logits per depth).",
    )
    group.add_argument(
        "--mtp-plugin-placement",
        choices=["last", "stage"],
        default="last",
        help="last: MTP with the head on the last pipeline stage; stage: on --mtp-plugin-stage.",
    )
    group.add_argument("--mtp-plugin-stage", type=int, default=None, help="Pipeline stage of the MTP depths.")
    group.add_argument(
        "--mtp-plugin-mask-across-eod",
        action="store_true",
        help="Do not score a depth-k target that lies in the next document.",
    )
    return parser


def lambda_schedule_from_args(args: argparse.Namespace) -> LambdaScheduleConfig:
    kind, values, bounds = (
        args.mtp_plugin_lambda_schedule,
        list(args.mtp_plugin_lambda_values),
        list(args.mtp_plugin_lambda_boundaries),
    )
    if kind == "constant":
        if len(values) != 1:
            raise ValueError(f"--mtp-plugin-lambda-values takes one value for a constant λ, got {values}")
        return LambdaScheduleConfig(kind=kind, value=values[0])
    if kind == "piecewise":
        return LambdaScheduleConfig(kind=kind, boundaries_tokens=bounds, values=values)
    if len(values) != 2 or len(bounds) != 2:
        raise ValueError(
            f"a {kind} λ needs --mtp-plugin-lambda-values START END and --mtp-plugin-lambda-boundaries "
            f"START_TOKENS END_TOKENS, got values {values} and boundaries {bounds}"
        )
    return LambdaScheduleConfig(
        kind=kind, start_value=values[0], end_value=values[1], start_tokens=bounds[0], end_tokens=bounds[1]
    )


def mtp_config_from_args(args: argparse.Namespace) -> MTPConfig:
    """The plugin's MTPConfig from parsed Megatron-LM args; rejects a D that disagrees with --mtp-num-layers."""
    native = getattr(args, "mtp_num_layers", None)
    depths = args.mtp_plugin_num_depths if args.mtp_plugin_num_depths is not None else native
    if not depths:
        raise ValueError(
            "set --mtp-num-layers D (Megatron's flag; the plugin builds the depths) to enable MTP"
        )
    if native != depths:
        raise ValueError(
            f"--mtp-plugin-num-depths={depths} but --mtp-num-layers={native}; Megatron-LM routes tokens and "
            "lays out stages from --mtp-num-layers, so set both to the same D (or drop --mtp-plugin-num-depths)"
        )
    return MTPConfig(
        num_depths=depths,
        lambda_schedule=lambda_schedule_from_args(args),
        depth_weights=list(args.mtp_plugin_depth_weights),
        loss_chunk_tokens=args.mtp_plugin_chunk_tokens,
        mask_across_eod=args.mtp_plugin_mask_across_eod,
        placement=args.mtp_plugin_placement,
        mtp_stage=args.mtp_plugin_stage,
    )


def _first_dense_layers(args: argparse.Namespace) -> int:
    freq = getattr(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        pattern = [1 if i % freq == 0 else 0 for i in range(args.num_layers)]
    else:
        pattern = list(freq)
    return next((i for i, is_moe in enumerate(pattern) if is_moe), args.num_layers)


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    """The plugin's ModelConfig from Megatron-LM args (after tokenizer setup, which sets padded_vocab_size).

    The vocabulary is taken already padded (Megatron-LM pads by make_vocab_size_divisible_by x TP).
    """
    if getattr(args, "position_embedding_type", "rope") != "rope":
        raise ValueError(
            f"--position-embedding-type {args.position_embedding_type}: the plugin's MTP model uses RoPE; "
            "pass --position-embedding-type rope"
        )
    vocab = getattr(args, "padded_vocab_size", None) or args.vocab_size
    num_experts = getattr(args, "num_experts", None) or 0
    return ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False) else None,
        ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length,
        vocab_size=vocab,
        make_vocab_size_divisible_by=1,
        num_experts=num_experts,
        moe_router_topk=getattr(args, "moe_router_topk", 2),
        moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None),
        moe_shared_expert_size=getattr(args, "moe_shared_expert_intermediate_size", None) or 0,
        first_dense_layers=_first_dense_layers(args) if num_experts else 1,
        moe_aux_loss_coeff=float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
        moe_token_dispatcher_type=getattr(args, "moe_token_dispatcher_type", "alltoall"),
        untie_embeddings_and_output_weights=getattr(args, "untie_embeddings_and_output_weights", False),
        init_method_std=getattr(args, "init_method_std", 0.02),
        rotary_base=getattr(args, "rotary_base", 10000),
    )


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1),
        context_parallel_size=getattr(args, "context_parallel_size", 1),
        sequence_parallel=getattr(args, "sequence_parallel", False),
    )


def _eod_id(args: argparse.Namespace) -> int | None:
    if not args.mtp_plugin_mask_across_eod:
        return None
    from megatron.training import get_tokenizer

    return get_tokenizer().eod


def build_model_from_args(
    args: argparse.Namespace,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config=None,
    eod_id: int | None = None,
):
    """This pipeline stage of the plugin's MTP GPT model, from Megatron-LM args.

    config: the TransformerConfig Megatron-LM passes to the model provider (core_v0.16+). Without one
    (a script outside Megatron-LM), it is built from the args by the plugin's mapping.
    """
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from mtp_plugin.megatron import build_mtp_gpt_model, check_supported, transformer_config_from

    model_cfg = model_config_from_args(args)
    mtp_cfg = mtp_config_from_args(args)
    parallel_cfg = parallel_config_from_args(args)
    check_supported(model_cfg, parallel_cfg, mtp_cfg)
    if config is None:
        dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float32
        config = transformer_config_from(model_cfg, parallel_cfg, mtp_cfg, params_dtype=dtype)
    if config.mtp_num_layers != mtp_cfg.num_depths:
        raise ValueError(
            f"TransformerConfig.mtp_num_layers={config.mtp_num_layers} but the plugin has {mtp_cfg.num_depths} "
            "depths; pass --mtp-num-layers D"
        )
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    if config.num_moe_experts:
        trunk_spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=config.normalization, vp_stage=vp_stage
        )
    elif use_te:
        trunk_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        trunk_spec = get_gpt_layer_local_spec(normalization=config.normalization)
    return build_mtp_gpt_model(
        model_cfg,
        mtp_cfg,
        config,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        eod_id=eod_id if eod_id is not None else _eod_id(args),
        transformer_layer_spec=trunk_spec,
    )


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM model provider (the signature `get_model` calls in core_v0.16 – v0.19)."""
    from megatron.training import get_args

    del pg_collection  # the model takes Megatron's global groups, as GPTModel does by default
    return build_model_from_args(
        get_args(), pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, config=config
    )


def batch_as_dict(values) -> dict[str, Any]:
    """pretrain_gpt.get_batch's return value (either layout) as the dict mtp_forward_step reads."""
    if isinstance(values, dict):
        return values
    values = list(values)
    keys = {len(_BATCH_KEYS_V019): _BATCH_KEYS_V019, len(_BATCH_KEYS_V016): _BATCH_KEYS_V016}.get(len(values))
    if keys is None:
        raise ValueError(
            f"get_batch returned {len(values)} values; expected the core_v0.16 (6) or v0.19 (10) layout"
        )
    batch = dict(zip(keys, values))
    if batch.get("cu_seqlens") is not None or batch.get("packed_seq_params") is not None:
        raise ValueError(
            "packed sequences (THD) are not supported with mtp_plugin's MTP yet; drop --sft / packing"
        )
    return batch


def consumed_tokens(args: argparse.Namespace) -> int:
    return int(getattr(args, "consumed_train_samples", 0)) * int(args.seq_length)


def make_forward_step(get_batch):
    """A Megatron-LM forward_step_func around the job's own `get_batch(data_iterator, vp_stage)`."""
    from megatron.core.utils import get_attr_wrapped_model

    from mtp_plugin.megatron import mtp_forward_step

    schedule_cache: dict[str, Any] = {}

    def forward_step(data_iterator, model, return_schedule_plan: bool = False):
        if return_schedule_plan:
            raise ValueError(
                "--overlap-moe-expert-parallel-comm schedule plans are not supported with mtp_plugin"
            )
        from megatron.training import get_args

        args = get_args()
        if "mtp" not in schedule_cache:
            mtp_cfg = mtp_config_from_args(args)
            schedule_cache["mtp"] = mtp_cfg
            schedule_cache["lambda"] = mtp_cfg.lambda_schedule.build()
        mtp_cfg = schedule_cache["mtp"]
        vp_stage = get_attr_wrapped_model(model, "vp_stage")
        batch = batch_as_dict(get_batch(data_iterator, vp_stage))
        lam = schedule_cache["lambda"](consumed_tokens(args))
        return mtp_forward_step(
            iter([batch]),
            model,
            lam=lam,
            metrics=None,  # Megatron-LM's training_log reduces the loss function's report instead
            depth_weights=mtp_cfg.weights,
            per_token_loss=bool(getattr(args, "calculate_per_token_loss", False)),
        )

    return forward_step
