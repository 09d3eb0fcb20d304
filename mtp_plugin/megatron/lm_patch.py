"""Drop-in MTP for Megatron-LM jobs built on `pretrain_gpt.py` (Megatron-LM core_v0.16 – core_v0.19).

The model is Megatron-LM's own: its TransformerConfig (from its arguments), its layer-spec choice (local or
TE, MoE, MLA, heterogeneous, `--spec`) and its native MTP block spec (the trunk's last-layer spec, as
`get_gpt_mtp_block_spec` builds it). Megatron-LM's own builder builds it; the plugin then takes over the MTP
layers' forward and loss (`MTPGPTModel.from_gpt_model`): nothing is rebuilt and no argument is re-mapped
into a configuration of the plugin's. The plugin contributes only the λ schedule, the loss and the
per-depth metrics. Three lines of `pretrain_gpt.py` change (examples/megatron_lm/*.patch):

    extra_args_provider   add_mtp_args                          the --mtp-plugin-* flags
    model                 core_v0.19: mtp_gpt_config_from_args(args)  (a GPTModelConfig whose builder is the
                          plugin's, the extension point core_v0.19's config container offers, as ModelOpt's)
                          core_v0.16 – v0.18: partial(model_provider, mtp_gpt_builder(gpt_builder))
    forward_step_func     make_forward_step(get_batch)          the job's get_batch, the plugin's loss

Keep Megatron's `--mtp-num-layers D` (and `--pipeline-model-parallel-layout` for where MTP runs): Megatron-LM
routes tokens, lays out stages and forms the embedding group from them. λ: `--mtp-plugin-lambda-*`, a
function of consumed tokens (args.consumed_train_samples x seq_length); without those flags λ is Megatron's
constant `--mtp-loss-scaling-factor`, so a native MTP job keeps its λ. The loss function's report carries
`mtp_{k} loss` and `mtp_{k} acceptance` as (sum, count) pairs, which Megatron-LM's `train_step` sums over
micro-batches and data-parallel ranks and `training_log` prints and writes to TensorBoard like `lm loss`.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from mtp_plugin.config import LambdaScheduleConfig, MTPConfig
from mtp_plugin.config.mtp import TRUNK_GRADIENTS
from mtp_plugin.core.cross_entropy import DEFAULT_LOSS_CHUNK_TOKENS
from mtp_plugin.core.schedules import SCHEDULE_KINDS
from mtp_plugin.megatron.lm_model import to_mtp_model

# Megatron-LM's default for --mtp-loss-scaling-factor (megatron/training/arguments.py, all supported tags).
MEGATRON_DEFAULT_MTP_LOSS_SCALING = 0.1

# Field order of pretrain_gpt.get_batch's return value: core_v0.19 returns BATCH_KEYS (alphabetical);
# core_v0.16 – v0.18 return (tokens, labels, loss_mask, attention_mask, position_ids, packed_seq_params).
BATCH_KEYS_V019 = (
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
        "--mtp-plugin-lambda-schedule",
        choices=sorted(SCHEDULE_KINDS),
        default=None,
        help="λ as a function of consumed tokens: constant | piecewise | linear | cosine. "
        "Default: Megatron's constant --mtp-loss-scaling-factor.",
    )
    group.add_argument(
        "--mtp-plugin-lambda-values",
        type=float,
        nargs="+",
        default=None,
        help="constant: one λ; piecewise: one more than the boundaries (DeepSeek-V3: 0.3 0.1); "
        "linear/cosine: start end. Replaces --mtp-loss-scaling-factor (give one or the other).",
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
        default=DEFAULT_LOSS_CHUNK_TOKENS,
        help="Tokens per chunk of the fused head + cross-entropy of the MTP depths, so no depth's full "
        f"logits are kept for backward (default {DEFAULT_LOSS_CHUNK_TOKENS}; 0: full logits per depth).",
    )
    group.add_argument(
        "--mtp-plugin-trunk-gradients",
        choices=TRUNK_GRADIENTS,
        default="joint",
        help="What the depth losses train: joint (depths, trunk, embedding, head), detached (the depths "
        "only, as --mtp-detach-heads on core_v0.19), frozen (only the depths train at all; the trunk runs "
        "forward only; needs --pretrained-checkpoint or --load).",
    )
    group.add_argument(
        "--mtp-plugin-mask-across-eod",
        action="store_true",
        help="Do not score a depth-k target that lies in the next document.",
    )
    return parser


def lambda_schedule_from_args(args: argparse.Namespace) -> LambdaScheduleConfig:
    """λ from the plugin's flags; without them, Megatron's constant --mtp-loss-scaling-factor."""
    native = getattr(args, "mtp_loss_scaling_factor", MEGATRON_DEFAULT_MTP_LOSS_SCALING)
    kind, values = args.mtp_plugin_lambda_schedule, args.mtp_plugin_lambda_values
    if kind is None and values is None:
        return LambdaScheduleConfig(kind="constant", value=native)
    if native != MEGATRON_DEFAULT_MTP_LOSS_SCALING:
        raise ValueError(
            f"--mtp-loss-scaling-factor {native} and --mtp-plugin-lambda-* both set λ; give one: "
            "--mtp-loss-scaling-factor alone for a constant λ, or the --mtp-plugin-lambda-* flags for a schedule"
        )
    warnings.warn(
        "mtp_plugin: λ comes from --mtp-plugin-lambda-*; --mtp-loss-scaling-factor is not used", stacklevel=2
    )
    kind = kind or "constant"
    values = list(values) if values is not None else [native]
    bounds = list(args.mtp_plugin_lambda_boundaries)
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
    """The plugin's MTP settings from parsed Megatron-LM args. D is Megatron's --mtp-num-layers."""
    depths = getattr(args, "mtp_num_layers", None)
    if not depths:
        raise ValueError(
            "set --mtp-num-layers D (Megatron's flag; the plugin trains those D depths) to enable MTP"
        )
    if getattr(args, "mtp_use_repeated_layer", False):
        raise ValueError(
            "--mtp-use-repeated-layer shares one layer across depths; mtp_plugin needs one per depth"
        )
    return MTPConfig(
        num_depths=depths,
        lambda_schedule=lambda_schedule_from_args(args),
        depth_weights=list(args.mtp_plugin_depth_weights),
        loss_chunk_tokens=args.mtp_plugin_chunk_tokens,
        mask_across_eod=args.mtp_plugin_mask_across_eod,
        trunk_gradients=_trunk_gradients(args),
    )


def _trunk_gradients(args: argparse.Namespace) -> str:
    mode = getattr(args, "mtp_plugin_trunk_gradients", "joint")
    if mode == "frozen" and not (getattr(args, "load", None) or getattr(args, "pretrained_checkpoint", None)):
        raise ValueError(
            "--mtp-plugin-trunk-gradients frozen trains the depths on a trained trunk; give it with "
            "--pretrained-checkpoint DIR (or --load DIR)"
        )
    return mode


def mtp_gpt_builder(gpt_builder):
    """core_v0.16 – v0.18: wrap Megatron-LM's own `gpt_builder` (gpt_builders.py) so its model gets the plugin's MTP.

    In pretrain_gpt.py: `partial(model_provider, lm_patch.mtp_gpt_builder(gpt_builder))`.
    """

    def builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        mtp = mtp_config_from_args(args)
        model = gpt_builder(
            args, pre_process, post_process, vp_stage, config=config, pg_collection=pg_collection
        )
        return to_mtp_model(model, mtp)

    return builder


def mtp_gpt_config_from_args(args: argparse.Namespace):
    """core_v0.19: Megatron-LM's `gpt_config_from_args`, with the plugin's builder and MTP settings."""
    from megatron.training.argument_utils import gpt_config_from_args

    from mtp_plugin.megatron.lm_builder import MTPGPTModelConfig

    mtp = mtp_config_from_args(args)
    model_cfg = gpt_config_from_args(args, model_config_cls=MTPGPTModelConfig)
    model_cfg.mtp_plugin = mtp
    return model_cfg


def batch_as_dict(values) -> dict[str, Any]:
    """pretrain_gpt.get_batch's return value (either layout) as the dict mtp_forward_step reads."""
    if isinstance(values, dict):
        return values
    values = list(values)
    keys = {len(BATCH_KEYS_V019): BATCH_KEYS_V019, len(_BATCH_KEYS_V016): _BATCH_KEYS_V016}.get(len(values))
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


_NOT_THE_PLUGINS_MODEL = (
    "mtp_plugin: the model is a {kind}, not mtp_plugin's MTPGPTModel, so the plugin's MTP would not train. "
    "On core_v0.19 build the model config with lm_patch.mtp_gpt_config_from_args(args); on core_v0.16 – v0.18 "
    "pass partial(model_provider, lm_patch.mtp_gpt_builder(gpt_builder)) to pretrain() "
    "(examples/megatron_lm/*.patch); and keep --mtp-num-layers D."
)


def _plugin_model(model):
    from megatron.core.utils import unwrap_model

    from mtp_plugin.megatron.model import MTPGPTModel

    inner = unwrap_model(model)
    if not isinstance(inner, MTPGPTModel) or not getattr(inner, "mtp_config", None):
        raise RuntimeError(_NOT_THE_PLUGINS_MODEL.format(kind=type(inner).__name__))
    return inner


class _StepBatches:
    """Per-token mode: the step's micro-batches, read ahead on its first forward, with their global counts.

    Depth k's per-token normalisation needs N_k of the whole global batch before the first backward
    (mtp_plugin.megatron.step, Megatron-LM issue #7452), so the loss stage reads all of the step's
    micro-batches at its first micro-batch (they are small index tensors) and counts them once.
    """

    def __init__(self) -> None:
        self.pending: list[dict] = []
        self.counts = None

    def next(self, read, inner, num_microbatches: int):
        from megatron.core import parallel_state

        from mtp_plugin.megatron.step import global_target_counts

        if not self.pending:
            self.pending = [read() for _ in range(num_microbatches)]
            self.counts = None
            if inner.post_process and inner.num_mtp_depths:
                dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
                self.counts = global_target_counts(
                    self.pending, inner.num_mtp_depths, dp_group, eod_id=inner.eod_id
                )
        return self.pending.pop(0), self.counts


def make_forward_step(get_batch):
    """A Megatron-LM forward_step_func around the job's own `get_batch(data_iterator, vp_stage)`."""
    from mtp_plugin.megatron.step import forward_batch, mtp_loss_func

    schedules: dict[int, Any] = {}
    step_batches = _StepBatches()

    def loss_func(loss_mask, output, *, lam, mtp: MTPConfig, per_token_loss: bool, global_counts=None):
        if not isinstance(output, tuple):
            raise RuntimeError(
                "mtp_plugin: the last pipeline stage returned a plain per-token loss, not the plugin's "
                "(main loss, depth sums, depth counts): the model has no MTP depths on its loss stage; "
                "check --mtp-num-layers and --pipeline-model-parallel-layout"
            )
        return mtp_loss_func(
            loss_mask,
            output,
            lam=lam,
            depth_weights=mtp.weights,
            per_token_loss=per_token_loss,
            global_counts=global_counts,
        )

    def forward_step(data_iterator, model, return_schedule_plan: bool = False):
        from functools import partial

        if return_schedule_plan:
            raise ValueError(
                "--overlap-moe-expert-parallel-comm schedule plans are not supported with mtp_plugin"
            )
        inner = _plugin_model(model)
        from megatron.core.num_microbatches_calculator import get_num_microbatches
        from megatron.training import get_args

        mtp = inner.mtp_config
        args = get_args()
        schedule = schedules.setdefault(id(mtp), mtp.lambda_schedule.build())
        vp_stage = getattr(inner, "vp_stage", None)
        per_token = bool(getattr(args, "calculate_per_token_loss", False))
        counts = None
        if per_token:
            if getattr(args, "virtual_pipeline_model_parallel_size", None):
                raise ValueError(
                    "--calculate-per-token-loss with a virtual pipeline is not supported by mtp_plugin yet"
                )
            read = lambda: batch_as_dict(get_batch(data_iterator, vp_stage))  # noqa: E731
            batch, counts = step_batches.next(read, inner, get_num_microbatches())
        else:
            batch = batch_as_dict(get_batch(data_iterator, vp_stage))
        output = forward_batch(model, batch)
        lam = schedule(consumed_tokens(args))
        return output, partial(
            loss_func,
            batch.get("loss_mask"),
            lam=lam,
            mtp=mtp,
            per_token_loss=per_token,
            global_counts=counts,
        )

    return forward_step
