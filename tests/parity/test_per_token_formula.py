"""Per-token loss mode against its explicit formula (DESIGN.md §2), on every megatron-core version.

    L = Σ_m main_m / N  +  λ · Σ_k w_k · Σ_m s_k,m / N_k

main_m / s_k,m: micro-batch m's summed CE of the main head / of depth k over their valid targets;
N / N_k: the main / depth-k valid-target counts of the whole batch, counted here from the masks.
The plugin runs Megatron's schedule with `calculate_per_token_loss` (the schedule leaves the sums
undivided; `finalize_model_grads` would divide every gradient by N), so its gradients must be N·∇L.

The oracle is native Megatron, not the plugin: with the same weights, a GPTModel without MTP, one with
D = 1 and one with D = 2 each run one micro-batch at a time in the default mode, whose gradients are
∇main_m/n_m, that + λ·∇s_1,m/n_1,m, and that + (λ/2)·Σ_k ∇s_k,m/n_k,m; differences give every ∇main_m
and ∇s_k,m. The micro-batches have uneven masks, so N_k/N and n_k,m/n_m all differ: the formula
differs from dividing depth k by N (native 0.16's per-token rule, also the plugin's without counts),
by local counts, or by n_m/n_k,m per micro-batch (native 0.17+'s rule). Native's own per-token
gradients are checked against the rule of their version too.
"""

import dataclasses

import pytest
import torch
from distributed_utils import run_distributed
from test_megatron_parity import _grads, _megatron_version, load_native_weights, native_to_plugin_name

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

LAMBDA = 0.3
WEIGHTS = (0.7, 0.3)
SEQ, MICRO = 16, 2


def _masks() -> list[torch.Tensor]:
    """Three micro-batches' loss masks: full, a long masked tail, sparse."""
    full = torch.ones(MICRO, SEQ)
    tail = torch.ones(MICRO, SEQ)
    tail[:, -6:] = 0.0
    sparse = torch.zeros(MICRO, SEQ)
    sparse[0, [0, 1, 2, 9]] = 1.0
    sparse[1, 3::3] = 1.0
    return [full, tail, sparse]


def _counts(mask_bs: torch.Tensor, num_depths: int) -> list[int]:
    """[n, n_1, ..., n_D] by the definition: depth k at position i scores target i + k, if it is masked in."""
    return [int(mask_bs.sum())] + [int(mask_bs[:, k:].sum()) for k in range(1, num_depths + 1)]


def _batches(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    batches = []
    for mask_bs in _masks():
        tokens_b_s1 = torch.randint(0, vocab_size, (MICRO, SEQ + 1), generator=gen)
        batches.append(
            {
                "tokens": tokens_b_s1[:, :-1].contiguous(),
                "labels": tokens_b_s1[:, 1:].contiguous(),
                "loss_mask": mask_bs,
                "position_ids": torch.arange(SEQ).expand(MICRO, SEQ).contiguous(),
            }
        )
    return batches


def _full_grads(model, names) -> dict[str, torch.Tensor]:
    """float64 gradients under the plugin's names; zeros for parameters this model does not have."""
    grads = _grads(model, native_to_plugin_name)
    shapes = dict(names)
    return {
        n: grads[n].double() if n in grads else torch.zeros(shapes[n], dtype=torch.float64) for n in shapes
    }


def _per_token_worker():
    from megatron_cpu import (
        TinyGPT,
        build_tiny_gpt,
        build_tiny_plugin_gpt,
        forward_backward,
        plugin_forward_backward,
    )

    from mtp_plugin.megatron import global_target_counts

    shape = TinyGPT(num_layers=2, mtp_num_layers=2, mtp_loss_scaling_factor=LAMBDA, seq_length=SEQ)
    # D = 2 first: Megatron's MTP loss tracker is process-global and sized by the first model with MTP.
    native = {2: build_tiny_gpt(shape)}
    state = native[2].state_dict()
    native[1] = build_tiny_gpt(dataclasses.replace(shape, mtp_num_layers=1))
    native[0] = build_tiny_gpt(dataclasses.replace(shape, mtp_num_layers=None))
    for depth in (1, 0):
        wanted = native[depth].state_dict().keys()
        native[depth].load_state_dict({k: v for k, v in state.items() if k in wanted})
    native_per_token = build_tiny_gpt(dataclasses.replace(shape, calculate_per_token_loss=True))
    native_per_token.load_state_dict(state)
    plugin = build_tiny_plugin_gpt(dataclasses.replace(shape, calculate_per_token_loss=True))
    load_native_weights(plugin, state)
    names = [(n, p.shape) for n, p in plugin.named_parameters()]
    batches = _batches(shape.vocab_size)

    per_micro = []
    for batch in batches:
        g = {}
        for depth in (2, 1, 0):  # D = 2 first (the tracker, above)
            forward_backward(native[depth], [batch])
            g[depth] = _full_grads(native[depth], names)
        per_micro.append(g)

    forward_backward(native_per_token, batches)
    out = {"per_micro": per_micro, "native_per_token": _full_grads(native_per_token, names)}
    counts = global_target_counts(batches, 2)
    out["counts"] = (counts.main_tokens.item(), counts.depth_tokens.tolist())
    for key, step_kwargs in (("with_counts", dict(global_counts=counts)), ("without_counts", {})):
        plugin.zero_grad(set_to_none=True)
        plugin_forward_backward(
            plugin, batches, lam=LAMBDA, per_token_loss=True, depth_weights=WEIGHTS, **step_kwargs
        )
        out[key] = _full_grads(plugin, names)
    return out


def _pieces(per_micro):
    """∇main_m and ∇s_k,m from native's per-micro-batch default-mode gradients (module docstring)."""
    main, depth = [], []
    for g, mask_bs in zip(per_micro, _masks()):
        n, n1, n2 = _counts(mask_bs, 2)
        main.append({p: n * g[0][p] for p in g[0]})
        s1 = {p: (g[1][p] - g[0][p]) * n1 / LAMBDA for p in g[0]}
        s2 = {p: (g[2][p] - g[0][p] - (g[1][p] - g[0][p]) / 2) * 2 * n2 / LAMBDA for p in g[0]}
        depth.append((s1, s2))
    return main, depth


def _combine(main, depth, main_coeff, depth_coeff):
    """Σ_m main_coeff(m)·∇main_m + Σ_m Σ_k depth_coeff(m, k)·∇s_k,m."""
    return {
        p: sum(
            main_coeff(m) * main[m][p] + sum(depth_coeff(m, k) * depth[m][k][p] for k in range(2))
            for m in range(3)
        )
        for p in main[0]
    }


def _assert_grads_close(actual, expected, what):
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 0, what
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def per_token():
    (out,) = run_distributed(_per_token_worker, 1, parallel=dict(), timeout=180)
    return out


def test_per_token_mode_is_the_explicit_formula(per_token):
    counts = [_counts(mask_bs, 2) for mask_bs in _masks()]
    n_total, n1_total, n2_total = (sum(c[j] for c in counts) for j in range(3))
    n_k_total = (n1_total, n2_total)
    # The masks are as uneven as intended: no two normalisations coincide.
    assert per_token["counts"] == (float(n_total), [float(n1_total), float(n2_total)])
    assert len({n1_total / n_total, n2_total / n_total}) == 2
    assert len({c[1] / c[0] for c in counts}) == 3
    main, depth = _pieces(per_token["per_micro"])
    # N·∇L: depth k by its own global count N_k.
    expected = _combine(main, depth, lambda m: 1.0, lambda m, k: LAMBDA * WEIGHTS[k] * n_total / n_k_total[k])
    _assert_grads_close(per_token["with_counts"], expected, "per-token mode with global counts")
    # Without the counts the plugin divides depth k by N (native 0.16's rule, kept for parity with it).
    over_main = _combine(main, depth, lambda m: 1.0, lambda m, k: LAMBDA * WEIGHTS[k])
    _assert_grads_close(per_token["without_counts"], over_main, "per-token mode without counts")


def test_native_per_token_rule_of_this_version(per_token):
    """What native Megatron's own per-token mode computes, per version (docs/megatron_native_mtp.md §1.7)."""
    counts = [_counts(mask_bs, 2) for mask_bs in _masks()]
    main, depth = _pieces(per_token["per_micro"])
    if _megatron_version().release[:2] <= (0, 16):
        expected = _combine(main, depth, lambda m: 1.0, lambda m, k: LAMBDA / 2)
    else:  # 0.17+: each micro-batch's depth k rescaled by n_m / n_k,m
        expected = _combine(
            main, depth, lambda m: 1.0, lambda m, k: LAMBDA / 2 * counts[m][0] / counts[m][k + 1]
        )
    _assert_grads_close(per_token["native_per_token"], expected, "native per-token mode")
