"""Per-depth targets and masks for one window (DESIGN.md §2; torchtitan's MTP.md spells out the same alignment).

Conventions (Megatron's): `input_ids_bs[:, i] = t_i`, `labels_bs[:, i] = t_{i+1}` (the next-token label),
`loss_mask_bs[:, i]` says whether the main head's target at position i counts.

Depth k (1..D) at position i
  - consumes Emb(t_{i+k})                      -> `shift_left(input_ids_bs, k)[:, i]`
  - predicts t_{i+1+k}                         -> `shift_left(labels_bs, k)[:, i]`
  - is valid iff i + k < S (the target is inside the window) and `loss_mask_bs[:, i+k]`;
  - with per-document attention (EOD reset) also iff none of t_i .. t_{i+k} is EOD: position i cannot see
    past the end of its document, so a target in the next document is unpredictable by construction.
    The main head obeys the same rule with k = 0 (t_i == EOD makes t_{i+1} invalid), which is how
    Megatron's `eod_mask_loss` masks it.
The last k positions of a window have no depth-k target (the "tail"); their inputs are filled with
`fill_id`, which is harmless because causal attention never lets them influence earlier positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def shift_left(x_bs: torch.Tensor, k: int, fill: int | float | bool = 0) -> torch.Tensor:
    """x[:, i] <- x[:, i + k]; the last k columns get `fill` (no wrap-around, unlike torch.roll)."""
    if k < 0:
        raise ValueError(f"shift must be >= 0, got {k}")
    if k == 0:
        return x_bs
    out = torch.full_like(x_bs, fill)
    if k < x_bs.shape[-1]:
        out[..., :-k] = x_bs[..., k:]
    return out


def eod_valid_mask(input_ids_bs: torch.Tensor, k: int, eod_id: int) -> torch.Tensor:
    """True where none of t_i .. t_{i+k} is EOD (positions past the window count as invalid)."""
    not_eod = input_ids_bs != eod_id
    valid = not_eod.clone()
    for j in range(1, k + 1):
        valid &= shift_left(not_eod, j, fill=False)
    return valid


@dataclass(frozen=True)
class DepthTargets:
    """What depth k needs for one window: its input ids, its labels and which of them count."""

    depth: int
    input_ids_bs: torch.Tensor
    labels_bs: torch.Tensor
    loss_mask_bs: torch.Tensor  # bool


def depth_targets(
    input_ids_bs: torch.Tensor,
    labels_bs: torch.Tensor,
    loss_mask_bs: torch.Tensor,
    depth: int,
    *,
    eod_id: int | None = None,
    fill_id: int = 0,
) -> DepthTargets:
    """Targets for depth `depth` (0 = the main next-token head). `eod_id` turns on per-document masking."""
    seq_len = input_ids_bs.shape[-1]
    if not 0 <= depth < seq_len:
        raise ValueError(f"MTP depth must be in [0, seq_len={seq_len}), got {depth}; lower num_depths")
    mask = shift_left(loss_mask_bs.bool(), depth, fill=False)
    if eod_id is not None:
        mask = mask & eod_valid_mask(input_ids_bs, depth, eod_id)
    return DepthTargets(
        depth=depth,
        input_ids_bs=shift_left(input_ids_bs, depth, fill=fill_id),
        labels_bs=shift_left(labels_bs, depth, fill=fill_id),
        loss_mask_bs=mask,
    )


def all_depth_targets(
    input_ids_bs: torch.Tensor,
    labels_bs: torch.Tensor,
    loss_mask_bs: torch.Tensor,
    num_depths: int,
    *,
    eod_id: int | None = None,
) -> list[DepthTargets]:
    """Targets for depths 1..num_depths."""
    return [
        depth_targets(input_ids_bs, labels_bs, loss_mask_bs, k, eod_id=eod_id)
        for k in range(1, num_depths + 1)
    ]
