"""MTP configuration: the schema Hydra's `mtp/` group fills. Validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from mtp_plugin.core.cross_entropy import DEFAULT_LOSS_CHUNK_TOKENS, LOSS_KERNELS
from mtp_plugin.core.schedules import (
    SCHEDULE_FIELDS,
    SCHEDULE_KINDS,
    ConstantLambda,
    LambdaSchedule,
    PiecewiseLambda,
)

# mtp.trunk_gradients (MTPConfig's docstring).
TRUNK_GRADIENTS = ("joint", "detached", "frozen")


def first_iteration_at(tokens: float, tokens_per_iteration: int) -> int:
    """The first iteration (1-based) whose λ sees at least `tokens` consumed: iteration i is weighted by
    λ of the (i - 1) * tokens_per_iteration tokens consumed before it (mtp_plugin.train.loop)."""
    return max(1, math.ceil(tokens / tokens_per_iteration) + 1)


def _at(tokens: float, tokens_per_iteration: int, train_iters: int) -> str:
    """'68,270 tokens (iteration 68 of 100)', or '... (iteration N, after the run's 100)'."""
    iteration = first_iteration_at(tokens, tokens_per_iteration)
    where = f"of {train_iters:,}" if iteration <= train_iters else f"after the run's {train_iters:,}"
    return f"{tokens:,.0f} tokens (iteration {iteration:,} {where})"


@dataclass(kw_only=True)
class LambdaScheduleConfig:
    """λ as a function of consumed tokens. Flat so that YAML can fill it; each kind takes its own
    fields only, and the others stay null (`--cfg job` shows null for them):

    kind: constant | piecewise | linear | cosine
      constant:  value
      piecewise: boundaries_tokens (strictly increasing), values (one more than boundaries)
      linear / cosine: start_value -> end_value over [start_tokens, end_tokens]

    A field of another kind that is set (not null; an empty list is set) is an error naming it, so a
    schedule never carries values it ignores. A field of the kind left null takes the default of its
    schedule in mtp_plugin.core.schedules (constant: 0.1, Megatron's mtp_loss_scaling_factor).
    """

    kind: str = "constant"
    value: float | None = None
    boundaries_tokens: list[float] | None = None
    values: list[float] | None = None
    start_value: float | None = None
    end_value: float | None = None
    start_tokens: float | None = None
    end_tokens: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(
                f"mtp.lambda_schedule.kind={self.kind!r} is unknown; choose one of {sorted(SCHEDULE_KINDS)}"
            )
        own = SCHEDULE_FIELDS[self.kind]
        stray = [
            f.name for f in fields(self) if f.name not in (*own, "kind") and getattr(self, f.name) is not None
        ]
        if stray:
            settings = ", ".join(f"mtp.lambda_schedule.{name}={getattr(self, name)}" for name in stray)
            nulls = " ".join(f"mtp.lambda_schedule.{name}=null" for name in stray)
            kinds = sorted({k for name in stray for k, names in SCHEDULE_FIELDS.items() if name in names})
            it, verb = ("it", "is") if len(stray) == 1 else ("them", "are")
            raise ValueError(
                f"{settings} {verb} not used by kind={self.kind!r} (a {self.kind} λ takes only "
                f"{', '.join(own)}); set {nulls}, or kind={'/'.join(kinds)}, which uses {it}"
            )
        self.build()  # constructing the schedule validates its fields

    def describe(self, tokens_per_iteration: int, train_iters: int) -> str:
        """λ in words with its switch points in tokens and iterations, e.g. 'λ 0.3, then 0.1 from
        68,270 tokens (iteration 68 of 100)'. Iterations assume this run's global batch throughout."""
        schedule = self.build()
        at = lambda tokens: _at(tokens, tokens_per_iteration, train_iters)
        if isinstance(schedule, ConstantLambda):
            return f"λ {schedule.value:g} (constant)"
        if isinstance(schedule, PiecewiseLambda):
            steps = [
                f"then {v:g} from {at(b)}" for b, v in zip(schedule.boundaries_tokens, schedule.values[1:])
            ]
            return ", ".join([f"λ {schedule.values[0]:g}", *steps])
        return (
            f"λ {self.kind} {schedule.start_value:g} -> {schedule.end_value:g} from {at(schedule.start_tokens)} "
            f"to {at(schedule.end_tokens)}"
        )

    def build(self) -> LambdaSchedule:
        own = {name: getattr(self, name) for name in SCHEDULE_FIELDS[self.kind]}
        return SCHEDULE_KINDS[self.kind](
            **{name: tuple(v) if isinstance(v, list) else v for name, v in own.items() if v is not None}
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
    loss_chunk_tokens: tokens per chunk of the fused head + cross-entropy of the MTP depths, and of the
      main head while depths are scored (default 4096: no head ever holds its full [tokens x vocab]
      logits); 0 materialises full logits.
    loss_kernel: the chunked path's softmax work: "auto" (Triton kernels on CUDA, torch ops elsewhere),
      "triton" (CUDA only) or "torch" (fp32 torch ops on any device, the reference).
    mask_across_eod: per-document targets: a depth-k target in the next document is not scored.
    placement: "last" (MTP, head and loss on the last pipeline stage), "stage" (MTP on `mtp_stage`,
      later stages carry hidden states on to the head and loss) or "split" (the depths over consecutive
      stages from `mtp_stage`, default one depth per stage, up to the last; docs/placement.md).
    mtp_stage: the pipeline stage that runs the MTP depths when placement == "stage"; the first depth
      stage when placement == "split" (optional there).
    trunk_gradients: what the depth losses train. "joint" (DeepSeek-V3 pre-training): the depths and,
      through them, the trunk, the embedding and the output head. "detached" (Megatron-Core 0.19's
      `mtp_detach_heads`): the depths only; the trunk's hidden state, the embedding and the head weight
      enter the depths' loss detached, while the trunk still trains on the main loss. "frozen": only the
      depths train; the trunk, embedding and head get no gradient at all, are left out of the optimizer
      (so weight decay never touches them) and run forward without keeping activations: refreshing the
      depths on a finished (fine-tuned) trunk, which needs a checkpoint to start from.
    A λ that is the constant 0 with D >= 1 leaves the depths as they are: they are scored (their loss and
    acceptance are logged) without a gradient and are left out of the optimizer, as an SFT/RL run that
    drops the MTP loss keeps them.
    """

    num_depths: int = 1
    lambda_schedule: LambdaScheduleConfig = field(default_factory=LambdaScheduleConfig)
    depth_weights: list[float] = field(default_factory=list)
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    loss_kernel: str = "auto"
    mask_across_eod: bool = False
    placement: str = "last"
    mtp_stage: int | None = None
    trunk_gradients: str = "joint"

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
        if self.placement not in ("last", "stage", "split"):
            raise ValueError(
                f"mtp.placement={self.placement!r} is unknown; use 'last', 'stage' (with mtp_stage) or 'split'"
            )
        if self.trunk_gradients not in TRUNK_GRADIENTS:
            raise ValueError(
                f"mtp.trunk_gradients={self.trunk_gradients!r} is unknown; use one of {', '.join(TRUNK_GRADIENTS)}"
            )
        if self.trunk_gradients != "joint" and not self.num_depths:
            raise ValueError(
                f"mtp.trunk_gradients={self.trunk_gradients} with mtp.num_depths=0: there are no depths to "
                "train; set num_depths or trunk_gradients=joint"
            )
        if self.trunk_gradients == "frozen" and not self.trains_depths:
            raise ValueError(
                "mtp.trunk_gradients=frozen trains only the depths, and a constant λ of 0 gives them no "
                "gradient: nothing would train; set mtp.lambda_schedule.value > 0"
            )
        if self.placement == "stage" and self.mtp_stage is None:
            raise ValueError("mtp.placement='stage' needs mtp.mtp_stage (a pipeline stage index >= 1)")
        if self.placement != "last" and self.mtp_stage is not None and self.mtp_stage < 1:
            raise ValueError(
                f"mtp.mtp_stage={self.mtp_stage}: stage 0 holds only the embedding and the first layers, "
                "and MTP runs after the trunk's last layer; use a stage >= 1"
            )

    @property
    def enabled(self) -> bool:
        return self.num_depths > 0

    @property
    def trains_depths(self) -> bool:
        """False when the depths get no gradient ever (D = 0, or λ the constant 0): they are only scored."""
        schedule = self.lambda_schedule
        return self.enabled and not (schedule.kind == "constant" and schedule.build().value == 0)

    def describe(self, tokens_per_iteration: int, train_iters: int) -> str:
        """One line: D, λ with its switch points in tokens and iterations, the depths' loss path."""
        if not self.enabled:
            return "MTP off (D = 0): next-token loss only, λ 0"
        weights = (
            "w_k = 1/D" if not self.depth_weights else "w_k = " + ", ".join(f"{w:g}" for w in self.weights)
        )
        loss = (
            f"chunked (fused head + cross-entropy, {self.loss_chunk_tokens}-token chunks)"
            if self.loss_chunk_tokens
            else "plain (full [tokens x vocab] logits per depth)"
        )
        trains = {
            "joint": "",
            "detached": "; depths trained on detached trunk states (no MTP gradient reaches the trunk, "
            "embedding or head)",
            "frozen": "; trunk, embedding and head frozen: only the depths train",
        }[self.trunk_gradients]
        if not self.trains_depths:
            trains = "; depths scored only, left as they are (λ = 0: no gradient, not in the optimizer)"
        return (
            f"MTP D = {self.num_depths} ({weights}), {self.lambda_schedule.describe(tokens_per_iteration, train_iters)}; "
            f"depth loss {loss}{trains}"
        )

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
