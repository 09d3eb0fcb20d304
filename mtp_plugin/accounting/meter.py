"""Per-rank ρ bookkeeping, framework-free: FLOP tallies, bits of the scored targets, cluster log fields.

DESIGN.md §3. A framework adapter (``mtp_plugin.megatron.meter.RhoMeter``,
``mtp_plugin.deepspeed.meter.DeepSpeedRhoMeter``) is a ``WindowMeter`` whose forward hooks observe what a
rank ran and feed its ``FlopTally``; at a log interval ``WindowMeter.reduce`` packs every rank's window
into one float64 vector (``pack_window``), sums the vector over all ranks with one all-reduce and turns
the sum into log fields (``rho_log_fields``). The hooks are the only backend-specific part. Units:

- F: matmul FLOPs as ``mtp_plugin.accounting.flops`` counts them (``2*m*k*n`` per matmul).
- B_ceiling: ``log2 V`` bits per valid scored target, V the **tokenizer** vocabulary (the ``vocab_size``
  of ``ModelConfig``, not the padded embedding table: padding rows are never a target). A uniform code
  over V needs ``log2 V`` bits, the most a target can teach.
- B_effective: the model's code length for those targets, Σ cross-entropy / ln 2 (loss sums are nats).
- ρ in bits per GFLOP (``1e9`` FLOPs): the seed text's 7B figure is 0.37 bits/GFLOP (3.7e-10 bits/FLOP).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "FLOP_CATEGORIES",
    "FlopTally",
    "WindowMeter",
    "bits_ceiling",
    "bits_effective",
    "forward_cost",
    "pack_window",
    "reduce_window",
    "rho_log_fields",
]

# Where the FLOPs of a step go; every category is forward + backward (+ recomputed forward) on this rank,
# forward only for what is not differentiated (`forward_cost`).
FLOP_CATEGORIES = (
    "attention_projections",  # Q, K, V, output projections of every attention (trunk and MTP blocks)
    "attention_scores",  # Q K^T and A V (causal convention: see the adapter's causal_half)
    "mlp",  # dense MLPs
    "router",  # MoE routers (h -> num_experts on every local token)
    "experts",  # routed experts, on the tokens the router actually sent to this rank's experts
    "shared_experts",  # always-on shared experts
    "mtp_projections",  # eh_proj 2h -> h of every MTP depth
    "head",  # the main output head h -> V (padded V, as executed)
    "mtp_heads",  # each MTP depth's output head h -> V
)


def forward_cost(output) -> int:
    """Forwards' worth of matmul FLOPs a hooked module call costs, judged from its output: 3 when the
    output is differentiated (the backward of a matmul is two matmuls of its size), else 1.

    A call under ``torch.no_grad`` (the first forward of a recomputed region) or one whose output needs
    no gradient (frozen weights on constant inputs: a frozen trunk, depths that are only scored) runs
    its forward only; autograd keeps no graph for it and no backward ever runs it.
    """
    if not torch.is_grad_enabled():
        return 1
    stack = [output]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.requires_grad:
                return 3
        elif isinstance(item, tuple | list):
            stack.extend(item)
    return 1


class FlopTally:
    """FLOPs by category: a pending step (what hooks add now) and a closed window (completed steps).

    Plain Python floats: adding costs nothing on the accelerator. Device-side counts (MoE tokens per
    expert) are kept by the adapter and folded in at read time.
    """

    def __init__(self) -> None:
        self.pending: dict[str, float] = dict.fromkeys(FLOP_CATEGORIES, 0.0)
        self.window: dict[str, float] = dict.fromkeys(FLOP_CATEGORIES, 0.0)
        self.pending_tokens = 0  # main-head tokens of the step (for the seed's 6·N·T)
        self.window_tokens = 0
        self.steps = 0

    def add(self, category: str, flops: float) -> None:
        self.pending[category] += flops

    def end_step(self) -> None:
        for key, value in self.pending.items():
            self.window[key] += value
            self.pending[key] = 0.0
        self.window_tokens += self.pending_tokens
        self.pending_tokens = 0
        self.steps += 1

    def reset(self) -> None:
        self.__init__()


def bits_ceiling(num_targets: float, vocab_size: int) -> float:
    """``num_targets * log2 V``: what ``num_targets`` targets over a V-token vocabulary can carry."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to carry any bits, got {vocab_size}")
    return float(num_targets) * math.log2(vocab_size)


def bits_effective(loss_sum_nats: float) -> float:
    """Summed cross-entropy in nats -> bits (the model's code length for the targets)."""
    return float(loss_sum_nats) / math.log(2.0)


def pack_window(
    *,
    flops: float,
    tokens: float,
    elapsed_s: float,
    steps: float,
    target_counts: Sequence[float],
    loss_sums_nats: Sequence[float],
) -> torch.Tensor:
    """One rank's window as a float64 vector to be summed over ranks.

    ``target_counts`` / ``loss_sums_nats``: main head first, then depth 1..D (zeros on ranks that score
    nothing). Layout: ``[F, T, elapsed, steps, targets(1+D), loss nats(1+D)]``. Bits are computed after
    the sum, so B_ceiling (integer counts x log2 V) does not depend on how the targets were split.
    """
    if len(target_counts) != len(loss_sums_nats):
        raise ValueError("pack_window: one loss sum per target count (main, then each depth)")
    return torch.tensor(
        [flops, tokens, elapsed_s, steps, *target_counts, *loss_sums_nats], dtype=torch.float64
    )


def rho_log_fields(
    totals: torch.Tensor,
    *,
    num_depths: int,
    world_size: int,
    vocab_size: int,
    n_active: float,
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """Log fields from ``pack_window`` vectors summed over ``world_size`` ranks.

    Elapsed time and step count are averaged over ranks; V = ``vocab_size`` (the tokenizer's). ``n_active`` is the seed's N (weights a token
    touches: trunk + main head, balanced routing) for ``flops 6NT``.
    """
    values = [float(v) for v in totals.reshape(-1).tolist()]
    heads = 1 + num_depths
    if len(values) != 4 + 2 * heads:
        raise ValueError(f"rho_log_fields: expected {4 + 2 * heads} values for {num_depths} depths")
    flops, tokens, elapsed_sum, steps_sum = values[:4]
    counts = values[4 : 4 + heads]
    ceilings = [bits_ceiling(n, vocab_size) for n in counts]
    effective = [bits_effective(s) for s in values[4 + heads :]]
    elapsed = elapsed_sum / world_size
    flops_6nt = 6.0 * n_active * tokens
    b_ceiling, b_effective = sum(ceilings), sum(effective)
    per_gflop = 1e9 / flops if flops > 0 else float("nan")
    out = {
        "flops": flops,
        "flops 6NT": flops_6nt,
        "bits ceiling": b_ceiling,
        "bits effective": b_effective,
        "rho_ceiling bits/GFLOP": b_ceiling * per_gflop,
        "rho_effective bits/GFLOP": b_effective * per_gflop,
        "rho_ceiling 6NT bits/GFLOP": b_ceiling * 1e9 / flops_6nt if flops_6nt > 0 else float("nan"),
        "targets main": counts[0],
        "bits main": ceilings[0],
        "bits_effective main": effective[0],
    }
    for k in range(1, heads):
        out[f"targets mtp_{k}"] = counts[k]
        out[f"bits mtp_{k}"] = ceilings[k]
        out[f"bits_effective mtp_{k}"] = effective[k]
    tflops = flops / elapsed / world_size / 1e12 if elapsed > 0 else float("nan")
    out["TFLOP/s/GPU"] = tflops
    if peak_tflops:
        out["MFU"] = tflops / peak_tflops
    out["steps"] = steps_sum / world_size
    out["elapsed s"] = elapsed
    return out


def window_flops(tally: FlopTally, extra: Mapping[str, float] | None = None) -> dict[str, float]:
    """The closed window by category, plus adapter-held extras (device-side expert FLOPs)."""
    out = dict(tally.window)
    for key, value in (extra or {}).items():
        out[key] = out.get(key, 0.0) + value
    return out


def reduce_window(
    vector: torch.Tensor,
    group=None,
    *,
    num_depths: int,
    vocab_size: int,
    n_active: float,
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """Sum one rank's `pack_window` vector over `group` (default: the world; one all-reduce on the group's
    device) and turn the sum into `rho_log_fields`. Call on every rank of the group."""
    import torch.distributed as dist

    world = 1
    if dist.is_available() and dist.is_initialized():
        group = group if group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        vector = vector.to(device)
        dist.all_reduce(vector, group=group)
        vector = vector.cpu()
    return rho_log_fields(
        vector,
        num_depths=num_depths,
        world_size=world,
        vocab_size=vocab_size,
        n_active=n_active,
        peak_tflops=peak_tflops,
    )


class WindowMeter:
    """A rank's ρ log window: what both backends' meters share once their hooks have fed ``tally``.

    num_depths: MTP depths (the ``mtp_{k}`` log fields); vocab_size: V of B_ceiling (the tokenizer's).
    peak_tflops: per-device peak for MFU (e.g. 989 for H100 SXM dense BF16); None leaves MFU out.
    A backend subclass registers its forward hooks (handles in ``_handles``), sets ``_n_active`` (the
    seed's N) and, where some FLOPs are kept outside the tally, overrides ``_extra_flops``.
    """

    def __init__(self, *, num_depths: int, vocab_size: int, peak_tflops: float | None = None) -> None:
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (TFLOP/s per device), got {peak_tflops}")
        self.num_depths = int(num_depths)
        self.vocab_size = int(vocab_size)
        self.peak_tflops = peak_tflops
        self.tally = FlopTally()
        self._handles: list = []
        self._n_active = 0.0
        # Every tensor-parallel rank of the last stage holds the same loss sums: only one may score bits.
        self._scores_bits = True
        self._start = time.perf_counter()

    @property
    def n_active(self) -> float:
        return self._n_active

    def detach(self) -> None:
        """Remove the hooks; the window's counts stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def end_step(self) -> None:
        """Close a training step: the FLOPs observed since the last call join the log window (no sync)."""
        self.tally.end_step()

    def reset(self) -> None:
        """Start a new log window (and its clock)."""
        self.tally.reset()
        self._start = time.perf_counter()

    def _extra_flops(self) -> Mapping[str, float]:
        """FLOPs by category that the backend keeps outside ``tally`` (read at window time)."""
        return {}

    def local_flops(self) -> dict[str, float]:
        """This rank's closed-window FLOPs by category (``FLOP_CATEGORIES``), with ``total``."""
        out = window_flops(self.tally, self._extra_flops())
        out["total"] = sum(out.values())
        return out

    def reduce(self, group=None, *, metrics=None, elapsed_s: float | None = None) -> dict[str, float]:
        """Sum this window over ``group`` (default: the world) with one all-reduce; return log fields.

        metrics: the caller's ``MTPMetrics`` of the same window (B); None counts no bits.
        elapsed_s: this rank's window time; default: since ``reset()``/``attach()``. Averaged over ranks.
        Call on every rank of ``group``. The window is not reset (call ``reset()``).
        """
        d = self.num_depths
        counts, sums = [0.0] * (1 + d), [0.0] * (1 + d)
        if metrics is not None and self._scores_bits:
            if metrics.num_depths != d:
                raise ValueError(
                    f"{type(self).__name__}.reduce: metrics has {metrics.num_depths} depths, the meter {d}; "
                    "pass the MTPMetrics of the model the meter is attached to"
                )
            counts = [metrics.main_num_tokens, *metrics.depth_num_tokens]
            sums = [metrics.main_loss_sum, *metrics.depth_loss_sums]
        flops = self.local_flops()["total"]
        elapsed = time.perf_counter() - self._start if elapsed_s is None else elapsed_s
        vector = pack_window(
            flops=flops,
            tokens=float(self.tally.window_tokens),
            elapsed_s=elapsed,
            steps=float(self.tally.steps),
            target_counts=counts,
            loss_sums_nats=sums,
        )
        return reduce_window(
            vector,
            group,
            num_depths=d,
            vocab_size=self.vocab_size,
            n_active=self._n_active,
            peak_tflops=self.peak_tflops,
        )
