"""The multi-depth MTP loss: total = L_main + λ · Σ_k w_k · L_k (DeepSeek-V3 §2.2, eq. 24-25).

Everything is returned in a value object the caller owns (`MTPLossOutput`); nothing is kept in module or
class state, so two models with different depths can train in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtp_plugin.core.cross_entropy import DEFAULT_LOSS_CHUNK_TOKENS, CrossEntropyStats, linear_cross_entropy


@dataclass(frozen=True)
class MTPLossOutput:
    """One micro-batch's MTP loss and the per-depth statistics behind it.

    `total` and `mtp_loss` carry gradients. The per-depth tensors are detached sums and counts so that a
    logger can reduce them token-weighted across micro-batches and data-parallel ranks.
    """

    total: torch.Tensor
    mtp_loss: torch.Tensor
    lam: float
    depth_loss_sums: tuple[torch.Tensor, ...]
    depth_num_tokens: tuple[torch.Tensor, ...]
    depth_num_correct: tuple[torch.Tensor, ...]

    @property
    def num_depths(self) -> int:
        return len(self.depth_loss_sums)

    @property
    def depth_losses(self) -> tuple[torch.Tensor, ...]:
        """Mean CE of each depth over its valid targets (nats)."""
        return tuple(s / n.clamp(min=1) for s, n in zip(self.depth_loss_sums, self.depth_num_tokens))

    @property
    def depth_acceptance(self) -> tuple[torch.Tensor, ...]:
        """Fraction of depth k's valid targets that its top-1 prediction gets right."""
        return tuple(c / n.clamp(min=1) for c, n in zip(self.depth_num_correct, self.depth_num_tokens))


_NO_DEPTHS = (
    "needs at least one MTP depth; with num_depths = 0 (MTP off) use the main loss alone, or give one "
    "hidden-state tensor, label tensor and mask per depth"
)


def default_depth_weights(num_depths: int) -> tuple[float, ...]:
    if num_depths < 1:
        raise ValueError(f"default_depth_weights({num_depths}) {_NO_DEPTHS}")
    return (1.0 / num_depths,) * num_depths


def depth_count_rows(stats: Sequence[CrossEntropyStats]) -> torch.Tensor:
    """Per depth k: (valid targets, top-1 hits, chain hits) as a float32 [D, 3] tensor, detached.

    A chain hit of depth k is a position where depths 1..k are all right (and valid): the product over
    depths per position, not the product of the per-depth rates, which would assume the depths err
    independently. Σ_k chain_k / N_1 is the teacher-forced expected number of drafted tokens a
    speculative decoder accepts at a position (`chain_accept_length`). Needs every depth's `hits_n` in
    one layout (the same positions in the same order, as `depth_targets` aligns them).
    """
    rows, chain_n = [], None
    for s in stats:
        if s.hits_n is None:
            raise ValueError("depth_count_rows needs per-position hits (CrossEntropyStats.hits_n)")
        chain_n = s.hits_n if chain_n is None else chain_n & s.hits_n
        rows.append(torch.stack([s.num_tokens, s.num_correct, chain_n.sum()]).to(torch.float32))
    return torch.stack(rows).detach()


def chain_accept_length(chain_hits: Sequence[float], depth1_tokens: float) -> float:
    """Expected accepted draft tokens per position: Σ_k (positions with depths 1..k all right) / N_1.

    Positions whose deeper targets fall outside the window count those depths as rejected, so on short
    windows this is a slight underestimate.
    """
    return float(sum(chain_hits)) / max(float(depth1_tokens), 1.0)


def weighted_depth_loss(
    *,
    depth_loss_sums: Sequence[torch.Tensor],
    depth_num_tokens: Sequence[torch.Tensor],
    lam: float,
    depth_weights: Sequence[float],
    per_token_sum: bool = False,
) -> torch.Tensor:
    """λ · Σ_k w_k · L_k, with L_k the mean over depth k's valid targets (or the sum, in per-token mode)."""
    if not depth_loss_sums:
        raise ValueError(f"weighted_depth_loss {_NO_DEPTHS}")
    total = torch.zeros((), dtype=torch.float32, device=depth_loss_sums[0].device)
    for loss_sum, num_tokens, weight in zip(depth_loss_sums, depth_num_tokens, depth_weights):
        total = total + weight * (loss_sum if per_token_sum else loss_sum / num_tokens.clamp(min=1))
    return lam * total


def multi_token_loss(
    *,
    main_loss: torch.Tensor,
    depth_hidden: Sequence[torch.Tensor],
    head_weight: torch.Tensor,
    depth_labels: Sequence[torch.Tensor],
    depth_masks: Sequence[torch.Tensor],
    lam: float,
    depth_weights: Sequence[float] | None = None,
    chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    per_token_sum: bool = False,
    vocab_start: int = 0,
    tp_group=None,
) -> MTPLossOutput:
    """Combine the main loss with D MTP depths scored by the shared output head.

    depth_hidden[k-1]: depth k's hidden states after its final norm, [..., h]; depth_labels / depth_masks in
    the same leading layout (see `targets.depth_targets`). With `per_token_sum` the depth terms are sums
    over tokens (Megatron's `calculate_per_token_loss` mode: the caller divides by the global token count);
    otherwise each depth contributes its mean over its own valid targets. `chunk_tokens` (default
    `DEFAULT_LOSS_CHUNK_TOKENS`) scores the depths in chunks without full logits; 0 materialises them.
    """
    num_depths = len(depth_hidden)
    if num_depths == 0:
        raise ValueError(f"multi_token_loss {_NO_DEPTHS}")
    if not num_depths == len(depth_labels) == len(depth_masks):
        raise ValueError(
            f"got {num_depths} depth hidden states, {len(depth_labels)} label tensors and {len(depth_masks)} masks"
        )
    weights = tuple(depth_weights) if depth_weights is not None else default_depth_weights(num_depths)
    if len(weights) != num_depths:
        raise ValueError(f"depth_weights has {len(weights)} entries for {num_depths} depths")
    stats = [
        linear_cross_entropy(
            hidden,
            head_weight,
            labels,
            mask,
            chunk_tokens=chunk_tokens,
            vocab_start=vocab_start,
            tp_group=tp_group,
        )
        for hidden, labels, mask in zip(depth_hidden, depth_labels, depth_masks)
    ]
    mtp_loss = weighted_depth_loss(
        depth_loss_sums=[s.loss_sum for s in stats],
        depth_num_tokens=[s.num_tokens for s in stats],
        lam=lam,
        depth_weights=weights,
        per_token_sum=per_token_sum,
    )
    loss_sums = [s.loss_sum.detach() for s in stats]
    num_tokens = [s.num_tokens.detach() for s in stats]
    num_correct = [s.num_correct.detach() for s in stats]
    return MTPLossOutput(
        total=main_loss + mtp_loss,
        mtp_loss=mtp_loss,
        lam=float(lam),
        depth_loss_sums=tuple(loss_sums),
        depth_num_tokens=tuple(num_tokens),
        depth_num_correct=tuple(num_correct),
    )
