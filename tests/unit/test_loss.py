"""The multi-depth loss against an independent naive computation (explicit loops, float64)."""

import math

import pytest
import torch
from torch import nn

from mtp_plugin.core import (
    all_depth_targets,
    build_mtp_stack,
    default_depth_weights,
    linear_cross_entropy,
    linear_cross_entropy_per_token,
    linear_cross_entropy_plain,
    multi_token_loss,
    weighted_depth_loss,
)

B, S, H, V = 2, 7, 8, 11


def _rms(x, weight, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


class _Model(nn.Module):
    """Trunk stand-in + MTP stack with per-position linear blocks (causality does not matter for the loss)."""

    def __init__(self, num_depths):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.trunk = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)
        self.stack = build_mtp_stack(
            num_depths=num_depths, hidden_size=H, block_factory=lambda k: nn.Linear(H, H)
        )
        for p in self.stack.parameters():  # non-trivial norm weights so that enorm/hnorm order matters
            nn.init.normal_(p, mean=0.5, std=0.3)

    def hidden(self, ids):
        h0 = torch.tanh(self.trunk(self.emb(ids)))
        return h0, self.stack(h0, ids, lambda shifted_ids, k: self.emb(shifted_ids))


def _naive(model, ids, labels, mask, lam, weights):
    """Explicit loops over depths and positions; recomputes every MTP module by hand."""
    h_prev = torch.tanh(model.trunk(model.emb(ids)))

    def ce(vec, target):
        logits = model.head.weight @ vec
        return torch.logsumexp(logits, 0) - logits[target]

    main_sum, main_n = 0.0, 0
    for b in range(B):
        for i in range(S):
            if mask[b, i]:
                main_sum = main_sum + ce(h_prev[b, i], labels[b, i])
                main_n += 1
    total = main_sum / main_n
    depth_means = []
    for k, depth in enumerate(model.stack.depths, start=1):
        h_new = torch.zeros_like(h_prev)
        rows = []
        for b in range(B):
            for i in range(S):
                tok = ids[b, i + k] if i + k < S else 0
                x = torch.cat(
                    [_rms(model.emb.weight[tok], depth.enorm.weight), _rms(h_prev[b, i], depth.hnorm.weight)]
                )
                y = depth.block(depth.eh_proj.weight @ x)
                rows.append(_rms(y, depth.final_norm.weight))
        h_new = torch.stack(rows).reshape(B, S, H)
        s, n = 0.0, 0
        for b in range(B):
            for i in range(S):
                if i + k < S and mask[b, i + k]:
                    s = s + ce(h_new[b, i], labels[b, i + k])
                    n += 1
        depth_means.append(s / n)
        total = total + lam * weights[k - 1] * s / n
        h_prev = h_new
    return total, depth_means


@pytest.mark.parametrize("num_depths", [1, 2, 3])
@pytest.mark.parametrize("chunk_tokens", [0, 3])
def test_loss_and_grads_match_naive(num_depths, chunk_tokens):
    torch.manual_seed(num_depths)
    model = _Model(num_depths).double()
    ids = torch.randint(0, V, (B, S))
    labels = torch.randint(0, V, (B, S))
    mask = torch.rand(B, S) > 0.2
    mask[:, 0] = True
    lam, weights = 0.3, [1.0 / num_depths] * num_depths if num_depths != 3 else [0.5, 0.3, 0.2]

    h0, depth_hidden = model.hidden(ids)
    main = linear_cross_entropy(h0, model.head.weight, labels, mask)
    targets = all_depth_targets(ids, labels, mask, num_depths)
    out = multi_token_loss(
        main_loss=main.loss_sum / main.num_tokens,
        depth_hidden=depth_hidden,
        head_weight=model.head.weight,
        depth_labels=[t.labels_bs for t in targets],
        depth_masks=[t.loss_mask_bs for t in targets],
        lam=lam,
        depth_weights=weights,
        chunk_tokens=chunk_tokens,
    )
    out.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ref_total, ref_depth = _naive(model, ids, labels, mask, lam, weights)
    ref_total.backward()
    torch.testing.assert_close(out.total, ref_total, rtol=0, atol=1e-6)
    for k in range(num_depths):
        torch.testing.assert_close(out.depth_losses[k], ref_depth[k].detach(), rtol=0, atol=1e-6)
        assert out.depth_num_tokens[k].item() == int(mask[:, k + 1 :].sum())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 16, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_plain(chunk_tokens, dtype):
    torch.manual_seed(chunk_tokens)
    n, h, v = 16, 12, 37  # 16 tokens: chunk sizes 5 and 7 leave a ragged last chunk
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    mask = torch.rand(n) > 0.3
    plain = linear_cross_entropy_plain(hidden, weight, targets, mask)
    (2.5 * plain.loss_sum).backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=chunk_tokens)
    (2.5 * chunked.loss_sum).backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked.loss_sum, plain.loss_sum, **tol)
    torch.testing.assert_close(hidden.grad, g_h, **tol)
    torch.testing.assert_close(weight.grad, g_w, **tol)
    assert chunked.num_tokens.item() == plain.num_tokens.item() == int(mask.sum())
    assert chunked.num_correct.item() == plain.num_correct.item()


@pytest.mark.parametrize("chunk_tokens", [5, 16])
def test_per_token_matches_full_logits_for_any_upstream_gradient(chunk_tokens):
    """The main head's per-token path: Megatron's per-token CE (a label outside the vocabulary gives
    log-sum-exp) and, through its recomputing backward, the exact gradient of any weighting of the tokens."""
    torch.manual_seed(3)
    n, h, v = 16, 12, 37
    hidden = torch.randn(2, n // 2, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (2, n // 2))
    targets[0, 3] = -100  # an ignore index at a masked position
    upstream = torch.randn(2, n // 2, dtype=torch.float64)  # not proportional to any mask
    logits = hidden @ weight.t()
    picked = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets >= 0)
    expected = torch.logsumexp(logits, -1) - picked
    (expected * upstream).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = linear_cross_entropy_per_token(hidden, weight, targets, chunk_tokens=chunk_tokens)
    assert loss.shape == targets.shape
    (loss * upstream).sum().backward()
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, expected.detach(), **tol)
    torch.testing.assert_close(hidden.grad, g_h, **tol)
    torch.testing.assert_close(weight.grad, g_w, **tol)


def test_acceptance_counts_top1_hits():
    weight = torch.eye(4)
    hidden = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    targets = torch.tensor([0, 2, 2])  # right, wrong, right
    mask = torch.tensor([True, True, True])
    for chunk in (0, 2):
        stats = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=chunk)
        assert stats.num_correct.item() == 2
        expected = 2 * (math.log(math.exp(5) + 3) - 5) + (math.log(math.exp(5) + 3) - 0)
        assert stats.loss_sum.item() == pytest.approx(expected, rel=1e-6)


def test_per_token_sum_mode_and_lambda_zero():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 5, 4, requires_grad=True)]
    weight = torch.randn(9, 4)
    labels = [torch.randint(0, 9, (2, 5))]
    masks = [torch.ones(2, 5, dtype=torch.bool)]
    main = torch.tensor(1.25)
    summed = multi_token_loss(
        main_loss=main,
        depth_hidden=hidden,
        head_weight=weight,
        depth_labels=labels,
        depth_masks=masks,
        lam=0.5,
        per_token_sum=True,
    )
    mean = multi_token_loss(
        main_loss=main,
        depth_hidden=hidden,
        head_weight=weight,
        depth_labels=labels,
        depth_masks=masks,
        lam=0.5,
    )
    torch.testing.assert_close(summed.mtp_loss, mean.mtp_loss * 10)
    zero = multi_token_loss(
        main_loss=main,
        depth_hidden=hidden,
        head_weight=weight,
        depth_labels=labels,
        depth_masks=masks,
        lam=0.0,
    )
    assert zero.total.item() == 1.25 and zero.depth_losses[0].item() > 0


def test_chunked_path_never_builds_full_logits():
    """The chunked forward must not allocate a [tokens x vocab] tensor (the point of the path)."""
    n, h, v, chunk = 64, 8, 512, 8
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    biggest = []

    class _Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == v:
                biggest.append(out.shape[0])
            return out

    with _Watch():
        linear_cross_entropy(
            hidden, weight, torch.randint(0, v, (n,)), torch.ones(n, dtype=torch.bool), chunk_tokens=chunk
        )
    assert biggest and max(biggest) == chunk


# --- issue 8: edge cases both paths must agree on ---------------------------------------------


@pytest.mark.parametrize("chunk", [0, 3])
def test_acceptance_is_first_argmax(chunk):
    """A tie is a hit only for the first index attaining the max (torch.argmax), never for every tied index."""
    n, v = 8, 5
    hidden = torch.zeros(n, 4)
    weight = torch.randn(v, 4)
    targets = torch.arange(n) % v
    mask = torch.ones(n, dtype=torch.bool)
    # All logits equal (what lr 1e6 produced): only the targets equal to 0 (argmax) count.
    stats = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=chunk)
    assert stats.num_correct.item() == int((targets == 0).sum()) == 2
    # Integer logits with many ties, against torch.argmax row by row.
    torch.manual_seed(3)
    logits = torch.randint(0, 3, (64, v)).float()
    targets = torch.randint(0, v, (64,))
    mask = torch.rand(64) > 0.25
    stats = linear_cross_entropy(logits, torch.eye(v), targets, mask, chunk_tokens=chunk)
    expected = int(((logits.argmax(-1) == targets) & mask).sum())
    tied_hits = int(((logits.gather(1, targets[:, None])[:, 0] == logits.max(-1).values) & mask).sum())
    assert expected < tied_hits  # the data has ties the old ">= max" rule counted
    assert stats.num_correct.item() == expected


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("bad", [-1, 11, 500])
def test_counted_label_outside_vocabulary_raises(chunk, bad):
    hidden = torch.randn(6, 3)
    weight = torch.randn(11, 3)
    targets = torch.tensor([1, 2, bad, 4, 5, 6])
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=rf"label {bad} at a counted position is outside the vocabulary \[0, 11\)"
    ):
        linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=chunk)


def test_masked_labels_may_hold_any_value_and_paths_agree():
    torch.manual_seed(4)
    hidden = torch.randn(6, 3, dtype=torch.float64)
    weight = torch.randn(11, 3, dtype=torch.float64)
    targets = torch.tensor([1, -100, 3, 999, 5, 6])  # an ignore index and a fill id, both masked
    mask = torch.tensor([True, False, True, False, True, True])
    plain = linear_cross_entropy(hidden, weight, targets, mask)
    chunked = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4)
    keep = mask.nonzero()[:, 0]
    ref = linear_cross_entropy(hidden[keep], weight, targets[keep], torch.ones(4, dtype=torch.bool))
    for stats in (plain, chunked):
        torch.testing.assert_close(stats.loss_sum, ref.loss_sum, rtol=1e-12, atol=1e-12)
        assert stats.num_tokens.item() == 4 and stats.num_correct.item() == ref.num_correct.item()


def test_bf16_hidden_with_fp32_head_same_in_both_paths():
    """Both paths run the head matmul in the hidden states' dtype; gradients come back in each input's dtype."""
    torch.manual_seed(5)
    hidden = torch.randn(12, 16).bfloat16().requires_grad_()
    weight = torch.randn(40, 16, requires_grad=True)  # fp32
    targets = torch.randint(0, 40, (12,))
    mask = torch.rand(12) > 0.2
    results = {}
    for chunk in (0, 5):
        hidden.grad = weight.grad = None
        stats = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=chunk)
        stats.loss_sum.backward()
        assert stats.loss_sum.dtype == torch.float32
        assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
        results[chunk] = (
            stats.loss_sum.detach(),
            hidden.grad.float(),
            weight.grad.clone(),
            stats.num_correct,
        )
    # The reference: the same bf16 matmul, written out; softmax and loss in fp32.
    logits = (hidden.detach() @ weight.detach().bfloat16().t()).float()
    ref = ((torch.logsumexp(logits, -1) - logits.gather(1, targets[:, None])[:, 0]) * mask).sum()
    for chunk, (loss, _, _, correct) in results.items():
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5, msg=f"chunk {chunk}")
        assert correct.item() == int(((logits.argmax(-1) == targets) & mask).sum())
    torch.testing.assert_close(results[5][1], results[0][1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[5][2], results[0][2], rtol=2e-2, atol=2e-2)


def test_zero_depths_is_a_clear_error():
    with pytest.raises(ValueError, match="needs at least one MTP depth; with num_depths = 0"):
        multi_token_loss(
            main_loss=torch.tensor(1.0),
            depth_hidden=[],
            head_weight=torch.randn(5, 3),
            depth_labels=[],
            depth_masks=[],
            lam=0.3,
        )
    with pytest.raises(ValueError, match="needs at least one MTP depth"):
        default_depth_weights(0)
    with pytest.raises(ValueError, match="needs at least one MTP depth"):
        weighted_depth_loss(depth_loss_sums=[], depth_num_tokens=[], lam=0.3, depth_weights=[])


def test_stack_rejects_depths_at_least_sequence_length():
    stack = build_mtp_stack(num_depths=3, hidden_size=H, block_factory=lambda k: nn.Linear(H, H))
    emb = nn.Embedding(V, H)
    ids = torch.randint(0, V, (2, 3))
    with pytest.raises(
        ValueError, match="MTPStack has 3 depths but the window holds 3 tokens.*lower num_depths"
    ):
        stack(torch.randn(2, 3, H), ids, lambda shifted, k: emb(shifted))
    ids = torch.randint(0, V, (2, 4))
    assert len(stack(torch.randn(2, 4, H), ids, lambda shifted, k: emb(shifted))) == 3


def test_loss_kernel_choice_on_cpu():
    """auto is the torch ops on CPU (bit-equal); triton asks for CUDA; an unknown kernel is named."""
    from mtp_plugin.config import MTPConfig

    gen = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, H, generator=gen), torch.randn(V, H, generator=gen)
    targets, mask = torch.randint(0, V, (9,), generator=gen), torch.ones(9, dtype=torch.bool)
    auto = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4, kernel="auto")
    ref = linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4, kernel="torch")
    assert auto.loss_sum.item() == ref.loss_sum.item()
    with pytest.raises(ValueError, match="loss kernel 'triton' needs CUDA tensors, got cpu"):
        linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4, kernel="triton")
    with pytest.raises(ValueError, match="loss kernel must be one of"):
        linear_cross_entropy(hidden, weight, targets, mask, chunk_tokens=4, kernel="cuda")
    with pytest.raises(ValueError, match="mtp.loss_kernel='cuda' is unknown; use one of auto, torch, triton"):
        MTPConfig(loss_kernel="cuda")


def test_chain_accept_length_is_the_per_position_product_not_the_product_of_rates():
    """Of 6 positions, depth 1 is right at 0-3, depth 2 at 0, 1, 4, depth 3 at 0, 4: depths 1..k are all
    right at {0-3}, {0, 1}, {0}, so the expected accepted length is (4 + 2 + 1) / 6, which the product of
    the per-depth rates (4/6, 3/6, 2/6) does not give."""
    from mtp_plugin.core import chain_accept_length, depth_count_rows, linear_cross_entropy

    torch.manual_seed(0)
    weight_vh = torch.randn(11, 5)
    hidden_nh = torch.randn(6, 5)
    top1_n = (hidden_nh @ weight_vh.t()).argmax(-1)
    wrong_n = (top1_n + 1) % 11
    right = [{0, 1, 2, 3}, {0, 1, 4}, {0, 4}]
    mask_n = torch.ones(6, dtype=torch.bool)
    for chunk in (0, 4):  # the plain and the chunked path give the same per-position hits
        stats = [
            linear_cross_entropy(
                hidden_nh,
                weight_vh,
                torch.where(torch.tensor([i in r for i in range(6)]), top1_n, wrong_n),
                mask_n,
                chunk_tokens=chunk,
            )
            for r in right
        ]
        rows = depth_count_rows(stats)
        assert rows[:, 0].tolist() == [6, 6, 6]
        assert rows[:, 1].tolist() == [4, 3, 2]  # per-depth top-1 hits
        assert rows[:, 2].tolist() == [4, 2, 1]  # positions where depths 1..k are all right
        assert chain_accept_length(rows[:, 2].tolist(), rows[0, 0]) == pytest.approx(7 / 6)
    rates = [4 / 6, 3 / 6, 2 / 6]
    assert 4 / 6 + rates[0] * rates[1] + rates[0] * rates[1] * rates[2] != pytest.approx(7 / 6)
