"""The vocab-parallel linear + CE on 2 gloo ranks (plain torch.distributed): first-argmax acceptance across
shards and the label-range check against the global vocabulary, plain and chunked."""

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.distributed]

N, H, V = 12, 6, 10  # V split 5 + 5 over the two ranks


def _logits_and_targets():
    gen = torch.Generator().manual_seed(11)
    # Integer logits tie often, within a shard and across the shard boundary.
    logits = torch.randint(0, 3, (N, V), generator=gen).float()
    logits[0] = 1.0  # all equal: the first argmax is index 0 (rank 0)
    logits[1] = 1.0
    logits[2, :] = 0.0
    logits[2, [3, 7]] = 2.0  # a tie across shards: index 3 on rank 0 wins over 7 on rank 1
    logits[3] = logits[2]
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[0], targets[1], targets[2], targets[3] = 0, 5, 7, 3
    return logits, targets


def _vocab_parallel_worker():
    return {chunk_tokens: _score(chunk_tokens) for chunk_tokens in (0, 5)}


def _score(chunk_tokens: int):
    from mtp_plugin.core import linear_cross_entropy, linear_cross_entropy_per_token

    rank, group = torch.distributed.get_rank(), torch.distributed.group.WORLD
    logits, targets = _logits_and_targets()
    shard = V // 2
    # hidden = logits and the head = identity: the logits are exactly the integers above.
    weight = torch.eye(V)[rank * shard : (rank + 1) * shard]
    mask = torch.ones(N, dtype=torch.bool)
    stats = linear_cross_entropy(
        logits, weight, targets, mask, chunk_tokens=chunk_tokens, vocab_start=rank * shard, tp_group=group
    )
    errors = []
    for bad in (V, -1):  # V is outside the global vocabulary; labels in [shard, V) are valid
        try:
            linear_cross_entropy(
                logits,
                weight,
                torch.full((N,), bad),
                mask,
                chunk_tokens=chunk_tokens,
                vocab_start=rank * shard,
                tp_group=group,
            )
        except ValueError as err:
            errors.append(str(err))
    out = {"loss": stats.loss_sum.item(), "correct": stats.num_correct.item(), "errors": errors}
    if chunk_tokens:
        # The main head's per-token path over the same shards: every rank gets the global per-token CE.
        out["per_token"] = linear_cross_entropy_per_token(
            logits, weight, targets, chunk_tokens=chunk_tokens, vocab_start=rank * shard, tp_group=group
        ).tolist()
    return out


def test_vocab_parallel_acceptance_is_global_first_argmax():
    logits, targets = _logits_and_targets()
    expected_correct = int((logits.argmax(-1) == targets).sum())
    expected_loss = (torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]).sum().item()
    results = run_distributed(_vocab_parallel_worker, 2, cpu_shims=False, timeout=60)
    expected_per_token = torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]
    for per_rank in results:
        assert per_rank[5]["per_token"] == pytest.approx(expected_per_token.tolist(), rel=1e-6)
    for out in (per_rank[chunk] for per_rank in results for chunk in (0, 5)):
        assert out["correct"] == expected_correct
        assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
        assert len(out["errors"]) == 2
        assert f"label {V} at a counted position is outside the vocabulary [0, {V})" in out["errors"][0]
        assert "label -1 at a counted position" in out["errors"][1]
    # The rows built to tie: 0 (target 0, all equal) is a hit; 1 (target 5, all equal) and 2 (target 7,
    # tied with 3 on the other shard) are not; 3 (target 3, tied with 7) is.
    hits = logits.argmax(-1) == targets
    assert hits[:4].tolist() == [True, False, False, True]
