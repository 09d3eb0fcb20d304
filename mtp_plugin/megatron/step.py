"""forward_step / loss_func for `get_forward_backward_func`, and the per-depth metrics the caller owns.

What λ · Σ_k w_k · L_k means across micro-batches and data-parallel ranks follows the main loss's mode
(DESIGN.md §2; docs/normalisation.md works an example). M micro-batches per rank, R data-parallel ranks,
CE_main / CE_k the per-target cross-entropies, N the valid-target counts.

Default mode (Megatron's main loss averaged per micro-batch): each micro-batch contributes its own means,
    L(r, m) = L_main(r, m) + λ · Σ_k w_k · L_k(r, m),   L_k(r, m) = Σ CE_k(r, m) / N_k(r, m),
and the gradient is that of (1 / (M·R)) · Σ_{r,m} L(r, m). loss_func returns
`main_sum + n_main · λ Σ w_k L_k` with the micro-batch's n_main: the schedule divides by n_main and by M,
DDP averages over the R ranks. This is Megatron's native MTP normalisation; a micro-batch with few depth-k
targets weighs as much as one with many.

Per-token mode (`calculate_per_token_loss`): the schedule does not divide, DDP sums over ranks and
`finalize_model_grads` divides by the global main count N_main = Σ_{r,m} n_main. The intended loss is
    L = Σ_{r,m} Σ CE_main / N_main + λ · Σ_k w_k · Σ_{r,m} Σ CE_k / N_k,   N_k = Σ_{r,m} n_k,
each depth normalised by its own global target count (Megatron-LM issue #7452: dividing depth k by the
main count, or by local counts, biases the gradient when counts differ across micro-batches and ranks).
`global_target_counts` computes N_main and N_k before the step (one all-reduce over the data-parallel
group); given them, loss_func returns `main_sum + λ Σ w_k (N_main / N_k) sum_k`, which Megatron's
division turns into exactly L. Without them, per-token mode returns `main_sum + λ Σ w_k sum_k`, i.e.
depth k divided by N_main: native Megatron's per-token behaviour, kept for parity with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from mtp_plugin.core import chain_accept_length, depth_targets, weighted_depth_loss

# The teacher-forced expected number of drafted tokens accepted per position (MTPMetrics docstring).
CHAIN_ACCEPT_LENGTH = "mtp chain accept length"


class MTPMetrics:
    """Token-weighted per-depth sums for one logging window; owned by the caller, never process-global.

    The sums stay on the device the losses live on (one small vector: main loss sum, main targets, then per
    depth the loss sums, valid targets, top-1 hits and chain hits), so updating them per micro-batch never
    waits for the GPU; reading a field or reducing copies the vector to the host once. Chain hits of depth
    k count positions where depths 1..k are all right (`mtp_plugin.core.depth_count_rows`); they give
    `mtp chain accept length`.
    """

    def __init__(self, num_depths: int) -> None:
        self.num_depths = num_depths
        self._totals: torch.Tensor | None = None

    def reset(self) -> None:
        if self._totals is not None:
            self._totals.zero_()

    def _add(self, vector: torch.Tensor) -> None:
        if self._totals is None:
            self._totals = torch.zeros(2 + 4 * self.num_depths, dtype=torch.float64, device=vector.device)
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
                zeros = torch.zeros(4 * self.num_depths, dtype=torch.float64, device=parts[0].device)
                parts.append(zeros)
            else:
                counts = depth_counts.detach().double()
                parts += [depth_sums.detach().double(), counts[:, 0], counts[:, 1], counts[:, 2]]
        self._add(torch.cat([p.to(parts[0].device) for p in parts]))

    def merge(self, other: MTPMetrics) -> None:
        """Add another window's sums (e.g. one step's) into this one."""
        if other._totals is not None:
            self._add(other._totals)

    def as_tensor(self) -> torch.Tensor:
        if self._totals is None:
            return torch.zeros(2 + 4 * self.num_depths, dtype=torch.float64)
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

    @property
    def depth_chain_hits(self) -> list[float]:
        return self._field(2 + 3 * self.num_depths, self.num_depths)

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
        if d:
            out[CHAIN_ACCEPT_LENGTH] = chain_accept_length(
                totals[2 + 3 * d : 2 + 4 * d].tolist(), ns[0].item()
            )
        return out


@dataclass(frozen=True, kw_only=True)
class GlobalTargetCounts:
    """Valid targets of one step's whole global batch: every micro-batch of every data-parallel rank.

    main_tokens: N_main, the loss-mask sum Megatron's per-token mode divides the gradients by (scalar).
    depth_tokens: N_k for k = 1..D, counted with the model's own rule (`mtp_plugin.core.depth_targets`).
    """

    main_tokens: torch.Tensor
    depth_tokens: torch.Tensor

    @property
    def num_depths(self) -> int:
        return self.depth_tokens.numel()

    def depth_scales(self) -> torch.Tensor:
        """N_main / N_k per depth (0 where depth k has no target): turns the division by N_main into one by N_k."""
        scale_d = self.main_tokens / self.depth_tokens.clamp(min=1)
        return torch.where(self.depth_tokens > 0, scale_d, torch.zeros_like(scale_d))


def global_target_counts(
    batches: Iterable[dict], num_depths: int, dp_group=None, *, eod_id: int | None = None
) -> GlobalTargetCounts:
    """N_main and N_1..N_D over the global batch, from this rank's micro-batches of the step.

    batches: this rank's micro-batches of the step (dicts with `tokens`, `labels`, `loss_mask`, as
      Megatron's GPTDataset yields them); materialise the step's iterator into a list first.
    dp_group: the group Megatron's `finalize_model_grads` all-reduces the token count over (the
      data-parallel group, with context parallelism if any); None counts this rank alone.
    eod_id: the model's `eod_id` (per-document targets), exactly as the model was built with it.
    Call on every rank of `dp_group` (they hold the same pipeline stage); one all-reduce of D + 1 numbers.
    """
    counts = None
    for batch in batches:
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch.get("loss_mask")
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.bool)
        # The main count is what mtp_loss_func returns to the schedule; depth k's is the model's own rule.
        parts = [loss_mask.float().sum()] + [
            depth_targets(tokens, labels, loss_mask, k, eod_id=eod_id).loss_mask_bs.sum()
            for k in range(1, num_depths + 1)
        ]
        vector = torch.stack([p.to(torch.float64) for p in parts])
        counts = vector if counts is None else counts + vector
    if counts is None:
        raise ValueError("global_target_counts: no micro-batches given; pass the step's list of batches")
    if dp_group is not None and dist.is_initialized():
        if dist.get_backend(dp_group) == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts, group=dp_group)
    return GlobalTargetCounts(main_tokens=counts[0], depth_tokens=counts[1:])


def mtp_loss_func(
    loss_mask: torch.Tensor,
    output,
    *,
    lam: float,
    depth_weights: tuple[float, ...] | None = None,
    metrics: MTPMetrics | None = None,
    per_token_loss: bool = False,
    global_counts: GlobalTargetCounts | None = None,
):
    """Megatron-LM-style loss_func: returns (loss, num_tokens, report dict) for the schedule.

    per_token_loss: must match the schedule's `calculate_per_token_loss`. global_counts: this step's
    `global_target_counts`, per-token mode only; it normalises depth k by N_k (module docstring).
    """
    if global_counts is not None and not per_token_loss:
        raise ValueError(
            "global_counts normalises per-token mode (calculate_per_token_loss); in the default mode each "
            "micro-batch's depth means are used, so drop global_counts or set per_token_loss=True"
        )
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
        if global_counts is not None:
            if global_counts.num_depths != num_depths:
                raise ValueError(
                    f"global_counts has {global_counts.num_depths} depths, the model output {num_depths}; "
                    "count with the model's num_depths"
                )
            # Device tensors, not floats: no host sync per micro-batch.
            scales_d = global_counts.depth_scales().to(depth_sums.device, depth_sums.dtype)
            weights = tuple(w * scales_d[k] for k, w in enumerate(weights))
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
        report[CHAIN_ACCEPT_LENGTH] = torch.stack([depth_counts[:, 2].sum(), depth_counts[0, 0]])
    if metrics is not None:
        metrics.update(
            main_sum.detach(), num_tokens, None if depth_sums is None else depth_sums.detach(), depth_counts
        )
    return loss, num_tokens, report


def forward_batch(model, batch: dict):
    """The model on one batch dict (Megatron GPTDataset keys), as pretrain_gpt's forward_step calls it."""
    return model(
        batch.get("tokens"),
        batch.get("position_ids"),
        batch.get("attention_mask"),
        labels=batch.get("labels"),
        loss_mask=batch.get("loss_mask"),
    )


def mtp_forward_step(
    data_iterator,
    model,
    *,
    lam: float,
    metrics: MTPMetrics | None = None,
    depth_weights: tuple[float, ...] | None = None,
    per_token_loss: bool = False,
    global_counts: GlobalTargetCounts | None = None,
):
    """forward_step_func for `get_forward_backward_func`. Batches: dicts as Megatron's GPTDataset yields.

    In per-token mode pass the step's `global_counts` (see the module docstring).
    """
    batch = next(data_iterator) if data_iterator is not None else {}
    return forward_batch(model, batch), partial(
        mtp_loss_func,
        batch.get("loss_mask"),
        lam=lam,
        depth_weights=depth_weights,
        metrics=metrics,
        per_token_loss=per_token_loss,
        global_counts=global_counts,
    )
