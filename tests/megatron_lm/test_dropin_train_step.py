"""The Megatron-LM drop-in through Megatron-LM's own `setup_model_and_optimizer` and `train_step`.

The config container is built as core_v0.19.0's pretrain_gpt.py builds it, once with Megatron-LM's own
GPTModelConfig (native MTP at --mtp-loss-scaling-factor λ) and once with the plugin's extension
(`lm_patch.mtp_gpt_config_from_args`), from the same flags and the same RNG state. The plugin's model must be
built, start from the same weights, and give the same losses and every parameter's gradient at iterations
1-3 (fp32, Megatron-LM's default dropout on). SGD, because Adam's first steps divide each gradient element
by its own magnitude: summation-order rounding in near-zero elements would become O(lr) weight differences
and make iterations 2-3 compare rounding, not the model. Each configuration runs in its own process (Megatron-LM's global args and MTP tracker).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.megatron_lm,
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron.training") is None,
        reason="megatron.training ships in megatron-core >= 0.17 wheels only (the 0.19.2 CI leg has it)",
    ),
]

LAMBDA = 0.3
ITERATIONS = 3
MICRO_BATCHES = 2
VOCAB = 256
SEQ = 32


def _flags(num_experts: int | None, num_depths: int, tied: bool, lam: float = LAMBDA) -> list[str]:
    flags = (
        f"--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length {SEQ} "
        f"--max-position-embeddings {SEQ} --micro-batch-size 2 --global-batch-size {2 * MICRO_BATCHES} "
        f"--optimizer sgd --lr 0.05 --train-iters {ITERATIONS} --seed 1234 --tokenizer-type NullTokenizer "
        f"--vocab-size {VOCAB - 1} --position-embedding-type rope --normalization RMSNorm --swiglu "
        f"--disable-bias-linear --norm-epsilon 1e-5 --mtp-num-layers {num_depths} "
        f"--mtp-loss-scaling-factor {lam!r}"
    ).split()
    if num_experts:
        flags += (
            f"--num-experts {num_experts} --moe-router-topk 2 --moe-token-dispatcher-type allgather".split()
        )
    if not tied:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def _microbatch_groups(seed: int = 11):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(ITERATIONS):
        group = []
        for _ in range(MICRO_BATCHES):
            ids = torch.randint(0, VOCAB - 1, (2, SEQ + 1), generator=gen)
            loss_mask = torch.ones(2, SEQ)
            loss_mask[1, -5:] = 0.0  # uneven valid counts between samples
            group.append(
                {
                    "tokens": ids[:, :-1].contiguous(),
                    "labels": ids[:, 1:].contiguous(),
                    "loss_mask": loss_mask,
                    "position_ids": torch.arange(SEQ).expand(2, SEQ).contiguous(),
                }
            )
        groups.append(group)
    return groups


def _native_to_plugin_name(name: str) -> str:
    from parity.test_megatron_parity import native_to_plugin_name

    return native_to_plugin_name(name)


def _dropin_worker(num_experts, num_depths, tied):
    import megatron_lm_harness  # noqa: F401  (first: the Python 3.11 shim megatron.training needs)
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from megatron.core.utils import unwrap_model
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron_cpu import read_mtp_tracker
    from megatron_lm_harness import (
        get_batch_from,
        init_megatron_lm,
        native_forward_step,
        rng_state,
        set_rng_state,
        setup_from_config,
        train_steps,
    )

    from mtp_plugin.megatron import MTPGPTModel, lm_patch

    args = init_megatron_lm(_flags(num_experts, num_depths, tied), extra_args_provider=lm_patch.add_mtp_args)
    groups = _microbatch_groups()
    flat = [mb for group in groups for mb in group]
    get_batch = get_batch_from(flat)
    start = rng_state()

    def run(model_cfg, forward_step, rename):
        model, optimizer, scheduler = setup_from_config(args, model_cfg)
        inner = unwrap_model(model[0])
        initial = {rename(n): p.detach().clone() for n, p in inner.named_parameters()}
        grads, depth_losses = [], []

        def capture(_):
            grads.append({rename(n): p.main_grad.detach().clone() for n, p in inner.named_parameters()})
            values = read_mtp_tracker()
            if values is not None:
                depth_losses.append((values / MICRO_BATCHES).tolist())
                MTPLossLoggingHelper.clean_metrics_in_tracker()

        losses = train_steps(forward_step, groups, model, optimizer, scheduler, on_step=capture)
        return type(inner), initial, grads, losses, depth_losses

    native = run(gpt_config_from_args(args), native_forward_step(get_batch), _native_to_plugin_name)
    set_rng_state(start)
    plugin = run(lm_patch.mtp_gpt_config_from_args(args), lm_patch.make_forward_step(get_batch), lambda n: n)
    assert plugin[0] is MTPGPTModel and native[0] is not MTPGPTModel, (plugin[0], native[0])
    return {"native": native[1:], "plugin": plugin[1:]}


def _assert_grads_close(plugin, native, it, *, atol_of_max):
    """rtol 1e-5, plus an atol relative to each tensor's largest element (summation-order rounding)."""
    for name, grad in native.items():
        torch.testing.assert_close(
            plugin[name],
            grad,
            rtol=1e-5,
            atol=atol_of_max * float(grad.abs().max()),
            msg=lambda m, name=name: f"iter {it + 1} {name}: {m}",
        )


CASES = [
    pytest.param(None, 1, True, id="dense-D1-tied"),
    pytest.param(None, 2, False, id="dense-D2-untied"),
    pytest.param(4, 1, False, id="moe-D1-untied"),
    pytest.param(4, 2, True, id="moe-D2-tied"),
]


@pytest.mark.parametrize(("num_experts", "num_depths", "tied"), CASES)
def test_dropin_matches_native_mtp_through_train_step(num_experts, num_depths, tied):
    out = run_distributed(_dropin_worker, 1, num_experts, num_depths, tied, parallel=None, timeout=300)[0]
    n_init, n_grads, n_losses, n_depth = out["native"]
    p_init, p_grads, p_losses, _ = out["plugin"]
    # Same flags and seed -> the same model, weight for weight.
    assert n_init.keys() == p_init.keys()
    for name in n_init:
        torch.testing.assert_close(
            p_init[name], n_init[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
    for it in range(ITERATIONS):
        assert p_losses[it]["lm loss"] == pytest.approx(n_losses[it]["lm loss"], rel=1e-5)
        for k in range(1, num_depths + 1):
            assert p_losses[it][f"mtp_{k} loss"] == pytest.approx(n_depth[it][k - 1], rel=1e-5)
            assert 0.0 <= p_losses[it][f"mtp_{k} acceptance"] <= 1.0
        _assert_grads_close(p_grads[it], n_grads[it], it, atol_of_max=1e-6)


def _fallback_worker():
    import megatron_lm_harness  # noqa: F401  (first: the Python 3.11 shim megatron.training needs)
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron_lm_harness import get_batch_from, init_megatron_lm, setup_from_config, train_steps

    from mtp_plugin.megatron import lm_patch

    args = init_megatron_lm(_flags(None, 1, True), extra_args_provider=lm_patch.add_mtp_args)
    groups = _microbatch_groups()[:1]
    # The unpatched config container: Megatron-LM builds its native model, the plugin's forward step runs.
    model, optimizer, scheduler = setup_from_config(args, gpt_config_from_args(args))
    forward_step = lm_patch.make_forward_step(get_batch_from(groups[0]))
    try:
        train_steps(forward_step, groups, model, optimizer, scheduler)
    except RuntimeError as error:
        return str(error)
    return None


def test_forward_step_refuses_a_model_without_the_plugins_mtp():
    message = run_distributed(_fallback_worker, 1, parallel=None, timeout=300)[0]
    assert message is not None and "not mtp_plugin's MTPGPTModel" in message
    assert "mtp_gpt_config_from_args" in message and "\n" not in message


def _per_token_worker(plugin: bool, lam: float):
    import megatron_lm_harness  # noqa: F401  (first: the Python 3.11 shim megatron.training needs)
    from megatron.core.utils import unwrap_model
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron_lm_harness import (
        get_batch_from,
        init_megatron_lm,
        native_forward_step,
        setup_from_config,
        train_steps,
    )

    from mtp_plugin.megatron import lm_patch

    # Full-logits heads (--mtp-plugin-chunk-tokens 0), as native: this test is about the per-token
    # normalisation. The chunked head rounds differently from native's full logits, and Adam's first steps
    # amplify that on rarely seen embedding rows past 1e-5 of the max by iteration 3; the chunked path's own
    # parity with native is tests/parity/test_megatron_parity.py.
    flags = [*_flags(4, 1, True, lam), "--calculate-per-token-loss", "--mtp-plugin-chunk-tokens", "0"]
    args = init_megatron_lm(flags, extra_args_provider=lm_patch.add_mtp_args)
    groups = _microbatch_groups()
    get_batch = get_batch_from([mb for group in groups for mb in group])
    if plugin:
        model_cfg, forward_step, rename = (
            lm_patch.mtp_gpt_config_from_args(args),
            lm_patch.make_forward_step(get_batch),
            str,
        )
    else:
        model_cfg, forward_step, rename = (
            gpt_config_from_args(args),
            native_forward_step(get_batch),
            _native_to_plugin_name,
        )
    model, optimizer, scheduler = setup_from_config(args, model_cfg)
    inner = unwrap_model(model[0])
    grads = []
    losses = train_steps(
        forward_step, groups, model, optimizer, scheduler,
        on_step=lambda _: grads.append({rename(n): p.main_grad.detach().clone() for n, p in inner.named_parameters()}),
    )  # fmt: skip
    return losses, grads


def test_per_token_mode_normalises_each_depth_by_its_own_count():
    """--calculate-per-token-loss: both scale depth k's summed CE by N_main / N_k before Megatron divides by the
    global N_main; native MTP with each micro-batch's local counts, the plugin with the global batch's (exact when
    counts differ across micro-batches and ranks, Megatron-LM #7452; tests/distributed/ proves that case against a
    float64 reference). Here every micro-batch has the same counts with N_1 != N_main, so the two must agree."""
    from mtp_plugin.core import depth_targets

    group = _microbatch_groups()[0]
    n_main = sum(float(mb["loss_mask"].sum()) for mb in group)
    n_1 = sum(
        float(depth_targets(mb["tokens"], mb["labels"], mb["loss_mask"], 1).loss_mask_bs.sum())
        for mb in group
    )
    assert n_main != n_1  # otherwise a depth normalised by N_main would pass too
    plugin_losses, plugin_grads = run_distributed(
        _per_token_worker, 1, True, LAMBDA, parallel=None, timeout=300
    )[0]
    native_losses, native_grads = run_distributed(
        _per_token_worker, 1, False, LAMBDA, parallel=None, timeout=300
    )[0]
    for it in range(ITERATIONS):
        assert plugin_losses[it]["lm loss"] == pytest.approx(native_losses[it]["lm loss"], rel=1e-5)
        # Unnormalised per-token sums: rounding grows with the token count.
        _assert_grads_close(plugin_grads[it], native_grads[it], it, atol_of_max=1e-5)
