"""λ schedules: the MTP loss weight as a pure function of globally consumed tokens.

A pure function of consumed tokens (not of the step) makes λ identical on every rank and exact after a
resume, whatever the batch size history was. DeepSeek-V3 (arXiv:2412.19437, §4.2) uses λ = 0.3 for the
first 10T tokens and 0.1 for the remaining 4.8T: `PiecewiseLambda(boundaries_tokens=(10e12,), values=(0.3, 0.1))`.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


def _check_lambda(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite λ >= 0, got {value!r}; MTP loss weights cannot be negative"
        )


@dataclass(frozen=True, kw_only=True)
class ConstantLambda:
    """λ(t) = value for every t (Megatron's `mtp_loss_scaling_factor`)."""

    kind: ClassVar[str] = "constant"
    value: float = 0.1

    def __post_init__(self) -> None:
        _check_lambda("ConstantLambda.value", self.value)

    def __call__(self, consumed_tokens: int) -> float:
        return self.value


@dataclass(frozen=True, kw_only=True)
class PiecewiseLambda:
    """Step schedule: values[i] holds on [boundaries_tokens[i-1], boundaries_tokens[i]).

    A boundary belongs to the later piece: at exactly 10T consumed tokens DeepSeek-V3's λ is already 0.1.
    """

    kind: ClassVar[str] = "piecewise"
    boundaries_tokens: tuple[float, ...] = (10e12,)
    values: tuple[float, ...] = (0.3, 0.1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "boundaries_tokens", tuple(float(b) for b in self.boundaries_tokens))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(self.values) != len(self.boundaries_tokens) + 1:
            raise ValueError(
                f"PiecewiseLambda needs len(values) == len(boundaries_tokens) + 1, got {len(self.values)} values "
                f"for {len(self.boundaries_tokens)} boundaries; add or remove a value"
            )
        for a, b in zip(self.boundaries_tokens, self.boundaries_tokens[1:]):
            if not b > a:
                raise ValueError(
                    f"PiecewiseLambda.boundaries_tokens must be strictly increasing, got {self.boundaries_tokens}"
                )
        if self.boundaries_tokens and self.boundaries_tokens[0] < 0:
            raise ValueError("PiecewiseLambda.boundaries_tokens must be >= 0 (they count consumed tokens)")
        for i, v in enumerate(self.values):
            _check_lambda(f"PiecewiseLambda.values[{i}]", v)

    def __call__(self, consumed_tokens: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries_tokens, consumed_tokens)]


@dataclass(frozen=True, kw_only=True)
class _RampLambda:
    """Shared shape of the linear and cosine ramps: start_value before start_tokens, end_value after end_tokens."""

    start_value: float = 0.3
    end_value: float = 0.1
    start_tokens: float = 0.0
    end_tokens: float = 1.0

    def __post_init__(self) -> None:
        _check_lambda(f"{type(self).__name__}.start_value", self.start_value)
        _check_lambda(f"{type(self).__name__}.end_value", self.end_value)
        if self.start_tokens < 0:
            raise ValueError(f"{type(self).__name__}.start_tokens must be >= 0, got {self.start_tokens}")
        if not self.end_tokens > self.start_tokens:
            raise ValueError(
                f"{type(self).__name__} needs end_tokens > start_tokens, got start_tokens={self.start_tokens}, "
                f"end_tokens={self.end_tokens}; set end_tokens after start_tokens"
            )

    def _fraction(self, consumed_tokens: int) -> float:
        if consumed_tokens <= self.start_tokens:
            return 0.0
        if consumed_tokens >= self.end_tokens:
            return 1.0
        return (consumed_tokens - self.start_tokens) / (self.end_tokens - self.start_tokens)


@dataclass(frozen=True, kw_only=True)
class LinearLambda(_RampLambda):
    kind: ClassVar[str] = "linear"

    def __call__(self, consumed_tokens: int) -> float:
        f = self._fraction(consumed_tokens)
        return self.start_value + (self.end_value - self.start_value) * f


@dataclass(frozen=True, kw_only=True)
class CosineLambda(_RampLambda):
    kind: ClassVar[str] = "cosine"

    def __call__(self, consumed_tokens: int) -> float:
        f = self._fraction(consumed_tokens)
        return self.end_value + (self.start_value - self.end_value) * 0.5 * (1.0 + math.cos(math.pi * f))


LambdaSchedule = ConstantLambda | PiecewiseLambda | LinearLambda | CosineLambda


def peak(schedule: LambdaSchedule) -> float:
    """The largest λ the schedule takes."""
    if isinstance(schedule, ConstantLambda):
        return schedule.value
    if isinstance(schedule, PiecewiseLambda):
        return max(schedule.values)
    return max(schedule.start_value, schedule.end_value)


SCHEDULE_KINDS: dict[str, type] = {
    cls.kind: cls for cls in (ConstantLambda, PiecewiseLambda, LinearLambda, CosineLambda)
}
# The fields each kind takes (and nothing else): config and checkpoint readers reject any other.
SCHEDULE_FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in dataclasses.fields(cls)) for kind, cls in SCHEDULE_KINDS.items()
}


def schedule_state_dict(schedule: LambdaSchedule) -> dict[str, Any]:
    """A JSON/checkpoint-safe description: {'kind': ..., **fields}."""
    state = asdict(schedule)
    for key, value in state.items():
        if isinstance(value, tuple):
            state[key] = list(value)
    return {"kind": schedule.kind, **state}


def schedule_from_state_dict(state: dict[str, Any]) -> LambdaSchedule:
    state = dict(state)
    kind = state.pop("kind", None)
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown λ schedule kind {kind!r}; choose one of {sorted(SCHEDULE_KINDS)}")
    cls = SCHEDULE_KINDS[kind]
    stray = sorted(set(state) - set(SCHEDULE_FIELDS[kind]))
    if stray:
        raise ValueError(
            f"λ schedule of kind {kind!r} has {', '.join(stray)}, which a {kind} schedule does not take "
            f"(it takes {', '.join(SCHEDULE_FIELDS[kind])})"
        )
    for key, value in state.items():
        if isinstance(value, list):
            state[key] = tuple(value)
    return cls(**state)


def switch_points(schedule: LambdaSchedule) -> dict[str, tuple[float, ...]]:
    """The token positions of a schedule's switches by field ({} for a constant λ)."""
    if isinstance(schedule, PiecewiseLambda):
        return {"boundaries_tokens": schedule.boundaries_tokens}
    if isinstance(schedule, _RampLambda):
        return {"start_tokens": (schedule.start_tokens,), "end_tokens": (schedule.end_tokens,)}
    return {}


def keep_passed_switches(old: LambdaSchedule, new: LambdaSchedule, consumed_tokens: float) -> LambdaSchedule:
    """`new` (the same kind and values as `old`, its switch points moved: a resumed run of another
    length) with every switch point `old` had already passed at `consumed_tokens` kept where it was, so λ
    never goes back to an earlier value; the switches still ahead take `new`'s positions (one that `new`
    puts behind `consumed_tokens` happens at the next step)."""
    merged: dict[str, Any] = {}
    previous = -math.inf
    for name, points in switch_points(new).items():
        kept = []
        for was, now in zip(switch_points(old)[name], points, strict=True):
            point = was if was <= consumed_tokens else now
            # Points must stay increasing; a moved one that lands behind a kept one has passed too.
            point = point if point > previous else math.nextafter(previous, math.inf)
            kept.append(point)
            previous = point
        merged[name] = tuple(kept)
    if "start_tokens" in merged:
        merged = {"start_tokens": merged["start_tokens"][0], "end_tokens": merged["end_tokens"][0]}
    return dataclasses.replace(new, **merged)


def deepseek_v3_lambda(*, switch_tokens: float = 10e12) -> PiecewiseLambda:
    """DeepSeek-V3's schedule, with the switch point scalable for short runs."""
    return PiecewiseLambda(boundaries_tokens=(switch_tokens,), values=(0.3, 0.1))


__all__ = [
    "ConstantLambda",
    "CosineLambda",
    "LambdaSchedule",
    "LinearLambda",
    "PiecewiseLambda",
    "SCHEDULE_FIELDS",
    "SCHEDULE_KINDS",
    "deepseek_v3_lambda",
    "keep_passed_switches",
    "schedule_from_state_dict",
    "switch_points",
    "schedule_state_dict",
]
