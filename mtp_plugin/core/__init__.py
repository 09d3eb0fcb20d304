"""Framework-free MTP math: modules, targets, multi-depth loss, chunked linear+CE, λ schedules.

Nothing here imports Megatron, DeepSpeed or Hydra.
"""

from mtp_plugin.core.cross_entropy import (
    DEFAULT_LOSS_CHUNK_TOKENS,
    CrossEntropyStats,
    check_labels,
    linear_cross_entropy,
    linear_cross_entropy_per_token,
    linear_cross_entropy_plain,
)
from mtp_plugin.core.loss import (
    MTPLossOutput,
    chain_accept_length,
    default_depth_weights,
    depth_count_rows,
    multi_token_loss,
    weighted_depth_loss,
)
from mtp_plugin.core.module import MTPDepth, MTPStack, build_mtp_stack, rms_norm_factory
from mtp_plugin.core.schedules import (
    ConstantLambda,
    CosineLambda,
    LambdaSchedule,
    LinearLambda,
    PiecewiseLambda,
    deepseek_v3_lambda,
    schedule_from_state_dict,
    schedule_state_dict,
)
from mtp_plugin.core.targets import DepthTargets, all_depth_targets, depth_targets, eod_valid_mask, shift_left

__all__ = [
    "DEFAULT_LOSS_CHUNK_TOKENS",
    "ConstantLambda",
    "CosineLambda",
    "CrossEntropyStats",
    "DepthTargets",
    "LambdaSchedule",
    "LinearLambda",
    "MTPDepth",
    "MTPLossOutput",
    "MTPStack",
    "PiecewiseLambda",
    "all_depth_targets",
    "build_mtp_stack",
    "chain_accept_length",
    "check_labels",
    "deepseek_v3_lambda",
    "default_depth_weights",
    "depth_count_rows",
    "depth_targets",
    "eod_valid_mask",
    "linear_cross_entropy",
    "linear_cross_entropy_per_token",
    "linear_cross_entropy_plain",
    "multi_token_loss",
    "rms_norm_factory",
    "schedule_from_state_dict",
    "schedule_state_dict",
    "shift_left",
    "weighted_depth_loss",
]
