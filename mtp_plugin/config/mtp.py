"""MTP configuration: the schema Hydra's `mtp/` group fills. Validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mtp_plugin.core.cross_entropy import DEFAULT_LOSS_CHUNK_TOKENS, LOSS_KERNELS
from mtp_plugin.core.schedules import (
    SCHEDULE_KINDS,
    ConstantLambda,
    CosineLambda,
    LambdaSchedule,
    LinearLambda,
    PiecewiseLambda,
)


@dataclass(kw_only=True)
class LambdaScheduleConfig:
    """λ as a function of consumed tokens. Flat (one field set per kind) so that YAML can fill it.

    kind: constant | piecewise | linear | cosine
      constant:  value
      piecewise: boundaries_tokens (strictly increasing), values (one more than boundaries)
      linear / cosine: start_value -> end_value over [start_tokens, end_tokens]
    """

    kind: str = "constant"
    value: float = 0.1
    boundaries_tokens: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    start_value: float = 0.3
    end_value: float = 0.1
    start_tokens: float = 0.0
    end_tokens: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"mtp.lambda_schedule.kind={self.kind!r} is unknown; choose one of {sorted(SCHEDULE_KINDS)}"
            )
        if self.kind != "piecewise" and (self.boundaries_tokens or self.values):
            raise ValueError(
                f"mtp.lambda_schedule.boundaries_tokens/values are set but kind={self.kind!r} ignores them; "
                "set mtp.lambda_schedule.kind=piecewise or clear them"
            )
        self.build()  # constructing the schedule validates its fields

    def build(self) -> LambdaSchedule:
        if self.kind == "constant":
            return ConstantLambda(value=self.value)
        if self.kind == "piecewise":
            return PiecewiseLambda(boundaries_tokens=tuple(self.boundaries_tokens), values=tuple(self.values))
        ramp = LinearLambda if self.kind == "linear" else CosineLambda
        return ramp(
            start_value=self.start_value,
            end_value=self.end_value,
            start_tokens=self.start_tokens,
            end_tokens=self.end_tokens,
        )


@dataclass(kw_only=True)
class MTPConfig:
    """Multi-token prediction settings (DESIGN.md §2, §5).

    num_depths: D, the number of sequential MTP modules. 0 disables MTP and is exactly `mtp=off`: λ is
      set to the constant 0 whatever schedule the groups gave (nothing is scored at any depth, and the
      log says λ = 0 instead of a value that weights nothing); depth_weights and placement='stage'
      need D >= 1.
    lambda_schedule: λ(consumed tokens) weighting Σ_k w_k L_k against the main loss.
    depth_weights: w_k, non-negative, summing to 1; empty means 1/D each (DeepSeek-V3).
    loss_chunk_tokens: tokens per chunk of the fused head + cross-entropy of the MTP depths (default
      4096: no depth ever holds its full [tokens x vocab] logits); 0 materialises full logits.
    loss_kernel: the chunked path's softmax work: "auto" (Triton kernels on CUDA, torch ops elsewhere),
      "triton" (CUDA only) or "torch" (fp32 torch ops on any device, the reference).
    mask_across_eod: per-document targets: a depth-k target in the next document is not scored.
    placement: "last" (MTP, head and loss on the last pipeline stage) or "stage" (MTP on `mtp_stage`,
      later stages carry hidden states on to the head and loss).
    mtp_stage: the pipeline stage that runs the MTP depths when placement == "stage".
    """

    num_depths: int = 1
    lambda_schedule: LambdaScheduleConfig = field(default_factory=LambdaScheduleConfig)
    depth_weights: list[float] = field(default_factory=list)
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    loss_kernel: str = "auto"
    mask_across_eod: bool = False
    placement: str = "last"
    mtp_stage: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lambda_schedule, dict):
            self.lambda_schedule = LambdaScheduleConfig(**self.lambda_schedule)
        if self.num_depths < 0:
            raise ValueError(f"mtp.num_depths must be >= 1 (or 0 to disable MTP), got {self.num_depths}")
        if self.num_depths == 0:
            if self.depth_weights:
                raise ValueError(
                    f"mtp.depth_weights={self.depth_weights} with mtp.num_depths=0: there is no depth to weight; "
                    "drop depth_weights or set num_depths"
                )
            if self.placement != "last":
                raise ValueError(
                    f"mtp.placement={self.placement!r} with mtp.num_depths=0: there is no MTP to place; "
                    "use mtp=off alone or set num_depths"
                )
            self.lambda_schedule = LambdaScheduleConfig(kind="constant", value=0.0)
        if self.depth_weights and self.num_depths:
            if len(self.depth_weights) != self.num_depths:
                raise ValueError(
                    f"mtp.depth_weights has {len(self.depth_weights)} entries but mtp.num_depths={self.num_depths}; "
                    "give one weight per depth or leave it empty for 1/D"
                )
            if any(w < 0 for w in self.depth_weights):
                raise ValueError(f"mtp.depth_weights must be non-negative, got {self.depth_weights}")
            if not math.isclose(sum(self.depth_weights), 1.0, rel_tol=0, abs_tol=1e-6):
                raise ValueError(
                    f"mtp.depth_weights must sum to 1, got sum={sum(self.depth_weights):.6g}; "
                    "λ carries the overall scale"
                )
        if self.loss_chunk_tokens < 0:
            raise ValueError(
                f"mtp.loss_chunk_tokens must be >= 0 (0 = unchunked), got {self.loss_chunk_tokens}"
            )
        if self.loss_kernel not in LOSS_KERNELS:
            raise ValueError(
                f"mtp.loss_kernel={self.loss_kernel!r} is unknown; use one of {', '.join(LOSS_KERNELS)}"
            )
        if self.placement not in ("last", "stage"):
            raise ValueError(
                f"mtp.placement={self.placement!r} is unknown; use 'last' or 'stage' (with mtp_stage)"
            )
        if self.placement == "stage" and self.mtp_stage is None:
            raise ValueError("mtp.placement='stage' needs mtp.mtp_stage (a pipeline stage index >= 1)")
        if self.placement == "stage" and self.mtp_stage is not None and self.mtp_stage < 1:
            raise ValueError(
                f"mtp.mtp_stage={self.mtp_stage}: stage 0 holds only the embedding and the first layers, "
                "and MTP runs after the trunk's last layer; use a stage >= 1"
            )

    @property
    def enabled(self) -> bool:
        return self.num_depths > 0

    @property
    def weights(self) -> tuple[float, ...]:
        if self.depth_weights:
            return tuple(self.depth_weights)
        return tuple(1.0 / self.num_depths for _ in range(self.num_depths))

    def check_sequence_length(self, seq_length: int) -> None:
        if self.num_depths >= seq_length:
            raise ValueError(
                f"mtp.num_depths={self.num_depths} must be below the sequence length {seq_length}: depth k "
                f"predicts t_(i+1+k), so a window of {seq_length} tokens has no target for depth >= {seq_length}"
            )
