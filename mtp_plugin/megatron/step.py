"""forward_step / loss_func for `get_forward_backward_func`, and the per-depth metrics the caller owns.

Loss, with L_k each depth's mean CE over its valid targets and w_k the depth weights:
    total = L_main + λ · Σ_k w_k · L_k                         (default: per micro-batch means)
Megatron's schedule divides what loss_func returns by the token count it also returns (and by the
number of micro-batches), so we return `main_sum + n_main · λ Σ w_k L_k` with n_main: after the division
this is exactly L_main + λ Σ w_k L_k per micro-batch, the same normalisation as Megatron's native MTP.
In per-token mode (`calculate_per_token_loss`) the schedule does not divide and the gradients are scaled
by the global token count instead; then the depth terms enter as sums: `main_sum + λ Σ w_k sum_k`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from mtp_plugin.core import weighted_depth_loss


class MTPMetrics:
    """Token-weighted per-depth sums for one logging window; owned by the caller, never process-global.

    The sums stay on the device the losses live on (one small vector: main loss sum, main targets, then per
    depth the loss sums, valid targets and top-1 hits), so updating them per micro-batch never waits for
    the GPU; reading a field or reducing copies the vector to the host once.
    """

    def __init__(self, num_depths: int) -> None:
        self.num_depths = num_depths
        self._totals: torch.Tensor | None = None

    def reset(self) -> None:
        if self._totals is not None:
            self._totals.zero_()

    def _add(self, vector: torch.Tensor) -> None:
        if self._totals is None:
            self._totals = torch.zeros(2 + 3 * self.num_depths, dtype=torch.float64, device=vector.device)
        self._totals += vector.to(self._totals.device, torch.float64)

    def update(
        self, main_loss_sum: torch.Tensor, main_num_tokens: torch.Tensor, depth_sums=None, depth_counts=None
    ) -> None:
        parts = [
            main_loss_sum.detach().reshape(1).double(),
            torch.as_tensor(main_num_tokens).reshape(1).double(),
        ]
        if self.num_depths:
            if depth_sums is None:
                zeros = torch.zeros(3 * self.num_depths, dtype=torch.float64, device=parts[0].device)
                parts.append(zeros)
            else:
                counts = depth_counts.detach().double()
                parts += [depth_sums.detach().double(), counts[:, 0], counts[:, 1]]
        self._add(torch.cat([p.to(parts[0].device) for p in parts]))

    def merge(self, other: MTPMetrics) -> None:
        """Add another window's sums (e.g. one step's) into this one."""
        if other._totals is not None:
            self._add(other._totals)

    def as_tensor(self) -> torch.Tensor:
        if self._totals is None:
            return torch.zeros(2 + 3 * self.num_depths, dtype=torch.float64)
        return self._totals.detach().to("cpu", copy=True)

    def _field(self, start: int, count: int | None = None):
        values = self.as_tensor().tolist()
        return values[start] if count is None else values[start : start + count]

    @property
    def main_loss_sum(self) -> float:
        return self._field(0)

    @property
    def main_num_tokens(self) -> float:
        return self._field(1)

    @property
    def depth_loss_sums(self) -> list[float]:
        return self._field(2, self.num_depths)

    @property
    def depth_num_tokens(self) -> list[float]:
        return self._field(2 + self.num_depths, self.num_depths)

    @property
    def depth_num_correct(self) -> list[float]:
        return self._field(2 + 2 * self.num_depths, self.num_depths)

    def reduce(self, group=None) -> dict[str, float]:
        """Sum over `group` (data-parallel ranks, and the last pipeline stage's peers) and average per token.

        Call on every rank of `group`; ranks without a loss (earlier pipeline stages) contribute zeros.
        """
        totals = self.as_tensor()
        if group is not None and dist.is_initialized():
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            totals = totals.to(device)
            dist.all_reduce(totals, group=group)
            totals = totals.cpu()
        d = self.num_depths
        main_sum, main_n = totals[0].item(), totals[1].item()
        sums, ns, correct = totals[2 : 2 + d], totals[2 + d : 2 + 2 * d], totals[2 + 2 * d : 2 + 3 * d]
        out = {"lm loss": main_sum / max(main_n, 1.0)}
        for k in range(d):
            out[f"mtp_{k + 1} loss"] = sums[k].item() / max(ns[k].item(), 1.0)
            out[f"mtp_{k + 1} acceptance"] = correct[k].item() / max(ns[k].item(), 1.0)
        return out


def mtp_loss_func(
    loss_mask: torch.Tensor,
    output,
    *,
    lam: float,
    depth_weights: tuple[float, ...] | None = None,
    metrics: MTPMetrics | None = None,
    per_token_loss: bool = False,
):
    """Megatron-LM-style loss_func: returns (loss, num_tokens, report dict) for the schedule."""
    if isinstance(output, tuple):
        main_loss_bs, depth_sums, depth_counts = output
    else:
        main_loss_bs, depth_sums, depth_counts = output, None, None
    mask = loss_mask.reshape(-1).float()
    main_sum = torch.sum(main_loss_bs.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    loss = main_sum
    report = {"lm loss": torch.stack([main_sum.detach(), num_tokens.detach().float()])}
    if depth_sums is not None:
        num_depths = depth_sums.shape[0]
        weights = depth_weights or tuple(1.0 / num_depths for _ in range(num_depths))
        mtp_term = weighted_depth_loss(
            depth_loss_sums=list(depth_sums),
            depth_num_tokens=list(depth_counts[:, 0]),
            lam=lam,
            depth_weights=weights,
            per_token_sum=per_token_loss,
        )
        loss = main_sum + (mtp_term if per_token_loss else num_tokens * mtp_term)
        for k in range(num_depths):
            report[f"mtp_{k + 1} loss"] = torch.stack([depth_sums[k].detach(), depth_counts[k, 0]])
            report[f"mtp_{k + 1} acceptance"] = torch.stack([depth_counts[k, 1], depth_counts[k, 0]])
    if metrics is not None:
        metrics.update(
            main_sum.detach(), num_tokens, None if depth_sums is None else depth_sums.detach(), depth_counts
        )
    return loss, num_tokens, report


def mtp_forward_step(
    data_iterator,
    model,
    *,
    lam: float,
    metrics: MTPMetrics | None = None,
    depth_weights: tuple[float, ...] | None = None,
    per_token_loss: bool = False,
):
    """forward_step_func for `get_forward_backward_func`. Batches: dicts as Megatron's GPTDataset yields."""
    batch = next(data_iterator) if data_iterator is not None else {}
    tokens = batch.get("tokens")
    output = model(
        tokens,
        batch.get("position_ids"),
        batch.get("attention_mask"),
        labels=batch.get("labels"),
        loss_mask=batch.get("loss_mask"),
    )
    return output, partial(
        mtp_loss_func,
        batch.get("loss_mask"),
        lam=lam,
        depth_weights=depth_weights,
        metrics=metrics,
        per_token_loss=per_token_loss,
    )
