"""mtp_plugin.megatron.lm_patch: the --mtp-plugin-* flags and the Megatron-LM model provider."""

from __future__ import annotations

import argparse

import pytest
from distributed_utils import run_distributed

from mtp_plugin.megatron.lm_patch import (
    add_mtp_args,
    batch_as_dict,
    lambda_schedule_from_args,
    mtp_config_from_args,
)


def _parse(*argv: str, mtp_num_layers: int | None = 2, scaling: float = 0.1) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mtp-num-layers", type=int, default=mtp_num_layers)  # Megatron-LM's own flags
    parser.add_argument("--mtp-loss-scaling-factor", type=float, default=scaling)
    add_mtp_args(parser)
    return parser.parse_args(list(argv))


def test_flags_are_prefixed_and_lambda_defaults_to_megatrons_factor():
    parser = add_mtp_args(argparse.ArgumentParser())
    flags = [a for action in parser._actions for a in action.option_strings if a != "-h" and a != "--help"]
    assert flags and all(f.startswith("--mtp-plugin-") for f in flags)
    mtp = mtp_config_from_args(_parse(scaling=0.25))
    # Without plugin λ flags the drop-in trains Megatron's own constant --mtp-loss-scaling-factor.
    assert (
        mtp.num_depths == 2 and mtp.lambda_schedule.kind == "constant" and mtp.lambda_schedule.value == 0.25
    )
    assert mtp.loss_chunk_tokens == 4096  # memory-flat by default


def test_deepseek_v3_schedule_and_all_flags_parse():
    args = _parse(
        "--mtp-plugin-lambda-schedule", "piecewise",
        "--mtp-plugin-lambda-values", "0.3", "0.1",
        "--mtp-plugin-lambda-boundaries", "10e12",
        "--mtp-plugin-depth-weights", "0.75", "0.25",
        "--mtp-plugin-chunk-tokens", "0",
        "--mtp-plugin-mask-across-eod",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="--mtp-loss-scaling-factor is not used"):
        mtp = mtp_config_from_args(args)
    schedule = mtp.lambda_schedule.build()
    assert schedule(0) == 0.3 and schedule(10e12) == 0.1
    assert mtp.weights == (0.75, 0.25) and mtp.loss_chunk_tokens == 0 and mtp.mask_across_eod


def test_linear_schedule_takes_start_and_end():
    args = _parse(
        "--mtp-plugin-lambda-schedule", "linear",
        "--mtp-plugin-lambda-values", "0.3", "0.1",
        "--mtp-plugin-lambda-boundaries", "0", "1e9",
    )  # fmt: skip
    with pytest.warns(UserWarning):
        schedule = lambda_schedule_from_args(args).build()
    assert schedule(5e8) == pytest.approx(0.2)


@pytest.mark.filterwarnings("ignore:mtp_plugin")
@pytest.mark.parametrize(
    ("argv", "native", "scaling", "needle"),
    [
        ([], None, 0.1, "--mtp-num-layers D"),
        (["--mtp-plugin-lambda-values", "0.3", "0.1"], 2, 0.1, "one value"),
        (["--mtp-plugin-lambda-schedule", "cosine"], 2, 0.1, "START END"),
        (["--mtp-plugin-lambda-values", "0.3"], 2, 0.2, "both set λ"),
    ],
    ids=["no-depth", "constant-two-values", "cosine-missing-range", "two-sources-of-lambda"],
)
def test_bad_flags_name_the_fix(argv, native, scaling, needle):
    with pytest.raises(ValueError, match=needle.replace("-", r"\-")):
        mtp_config_from_args(_parse(*argv, mtp_num_layers=native, scaling=scaling))


def test_get_batch_layouts_of_both_megatron_lm_generations():
    old = batch_as_dict(("T", "L", "M", None, "P", None))  # core_v0.16 - v0.18
    assert (old["tokens"], old["labels"], old["loss_mask"], old["position_ids"]) == ("T", "L", "M", "P")
    new = batch_as_dict((None, None, None, None, "L", None, "M", None, "P", "T"))  # core_v0.19 BATCH_KEYS
    assert (new["tokens"], new["labels"], new["loss_mask"], new["position_ids"]) == ("T", "L", "M", "P")
    with pytest.raises(ValueError, match="layout"):
        batch_as_dict((1, 2, 3))


def _builder_worker(untied: bool) -> dict:
    """core_v0.16 - v0.18 path: Megatron-LM's gpt_builder (here a stand-in with its signature that builds a
    native-MTP GPTModel the way gpt_builders.py does) wrapped by lm_patch.mtp_gpt_builder, trained one
    step through Megatron's schedule beside the unwrapped native model with the same weights."""
    import torch
    from megatron_cpu import TinyGPT, build_tiny_gpt, forward_backward, make_microbatches, seed_megatron
    from megatron_cpu import plugin_forward_backward as plugin_step

    from mtp_plugin.megatron import MTPGPTModel, MTPMetrics
    from mtp_plugin.megatron.lm_patch import mtp_gpt_builder

    lam = 0.3
    shape = TinyGPT(
        num_layers=2,
        num_moe_experts=4,
        mtp_num_layers=2,
        mtp_loss_scaling_factor=lam,
        share_embeddings_and_output_weights=not untied,
    )

    def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
        return build_tiny_gpt(shape)

    seed_megatron(5)
    native = build_tiny_gpt(shape)
    seed_megatron(5)
    model = mtp_gpt_builder(gpt_builder)(_parse("--mtp-plugin-chunk-tokens", "7"), True, True)
    from parity.test_megatron_parity import native_to_plugin_name

    renamed = {native_to_plugin_name(n): p for n, p in native.named_parameters()}
    same_init = renamed.keys() == dict(model.named_parameters()).keys() and all(
        torch.equal(p.detach(), renamed[n].detach()) for n, p in model.named_parameters()
    )
    batches = make_microbatches(shape, 1, 2, seed=1, mask_tail=2)
    native_out = forward_backward(native, batches)  # Megatron's own MTP loss and tracker
    metrics = MTPMetrics(2)
    (report,) = plugin_step(model, batches, lam=lam, metrics=metrics)
    stats = metrics.reduce()
    return {
        "is_mtp_model": isinstance(model, MTPGPTModel) and not hasattr(model, "mtp"),
        "depths": len(model.mtp_stack.depths),
        "chunk": model.loss_chunk_tokens,
        "mtp_mlp": type(model.mtp_stack.depths[0].block.layer.mlp).__name__,
        "same_init": same_init,
        "report_keys": sorted(report),
        "lm": (float(native_out["lm_loss"][0]), float(report["lm loss"][0] / report["lm loss"][1])),
        "depth": (native_out["mtp_tracker"].tolist(), [stats["mtp_1 loss"], stats["mtp_2 loss"]]),
        "grads": {n: (renamed[n].grad.clone(), p.grad.clone()) for n, p in model.named_parameters()},
    }


def test_trunk_gradients_flag_and_frozen_needs_a_checkpoint():
    assert mtp_config_from_args(_parse()).trunk_gradients == "joint"
    assert (
        mtp_config_from_args(_parse("--mtp-plugin-trunk-gradients", "detached")).trunk_gradients == "detached"
    )
    with pytest.raises(ValueError, match=r"--pretrained-checkpoint DIR"):
        mtp_config_from_args(_parse("--mtp-plugin-trunk-gradients", "frozen"))
    args = _parse("--mtp-plugin-trunk-gradients", "frozen")
    args.pretrained_checkpoint = "/ckpt"  # Megatron-LM's own flag
    assert mtp_config_from_args(args).trunk_gradients == "frozen"


@pytest.mark.megatron
@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_builder_wrapper_turns_megatrons_own_model_into_the_plugins(untied):
    import torch

    (out,) = run_distributed(_builder_worker, 1, untied, parallel={}, timeout=120)
    assert out["is_mtp_model"] and out["depths"] == 2 and out["chunk"] == 7
    assert out["mtp_mlp"] == "MoELayer"  # Megatron's MTP layer spec: the trunk's last (MoE) layer
    assert out["same_init"]  # nothing rebuilt: the builder's weights, in the builder's RNG order
    assert out["report_keys"] == [
        "lm loss",
        "mtp chain accept length",
        "mtp_1 acceptance",
        "mtp_1 loss",
        "mtp_2 acceptance",
        "mtp_2 loss",
    ]
    # The same numbers as Megatron's native MTP on the builder's unwrapped model: main and per-depth
    # losses, and every parameter's gradient of L_main + λ/D Σ_k L_k (chunked here, 7-token chunks).
    native_lm, plugin_lm = out["lm"]
    assert plugin_lm == pytest.approx(native_lm, rel=1e-6) and 4.0 < native_lm < 5.2  # ~ln 96 untrained
    native_depth, plugin_depth = out["depth"]
    assert plugin_depth == pytest.approx(native_depth, rel=1e-5)
    assert native_depth[0] != native_depth[1]  # two depths, two different losses
    for name, (native_grad, plugin_grad) in out["grads"].items():
        torch.testing.assert_close(plugin_grad, native_grad, rtol=1e-5, atol=1e-7, msg=name)
