"""Per-rank ρ bookkeeping, framework-free: FLOP tallies, bits of the scored targets, cluster log fields.

DESIGN.md §3. A framework adapter (``mtp_plugin.megatron.meter.RhoMeter``) observes what a rank ran and
feeds ``FlopTally``; at a log interval every rank packs its window into one float64 vector
(``pack_window``), the vector is summed over all ranks with one all-reduce, and ``rho_log_fields`` turns
the sum into log fields. Units:

- F: matmul FLOPs as ``mtp_plugin.accounting.flops`` counts them (``2*m*k*n`` per matmul).
- B_ceiling: ``log2 V`` bits per valid scored target, V the **tokenizer** vocabulary (the ``vocab_size``
  of ``ModelConfig``, not the padded embedding table: padding rows are never a target). A uniform code
  over V needs ``log2 V`` bits, the most a target can teach.
- B_effective: the model's code length for those targets, Σ cross-entropy / ln 2 (loss sums are nats).
- ρ in bits per GFLOP (``1e9`` FLOPs): the seed text's 7B figure is 0.37 bits/GFLOP (3.7e-10 bits/FLOP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "FLOP_CATEGORIES",
    "FlopTally",
    "bits_ceiling",
    "bits_effective",
    "pack_window",
    "reduce_window",
    "rho_log_fields",
]

# Where the FLOPs of a step go; every category is forward + backward (+ recomputed forward) on this rank.
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
