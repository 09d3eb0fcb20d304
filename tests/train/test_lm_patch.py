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


def _parse(*argv: str, mtp_num_layers: int | None = 2) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mtp-num-layers", type=int, default=mtp_num_layers)  # Megatron-LM's own flag
    add_mtp_args(parser)
    return parser.parse_args(list(argv))


def test_flags_are_prefixed_and_default_to_megatrons_depth():
    parser = add_mtp_args(argparse.ArgumentParser())
    flags = [a for action in parser._actions for a in action.option_strings if a != "-h" and a != "--help"]
    assert flags and all(f.startswith("--mtp-plugin-") for f in flags)
    mtp = mtp_config_from_args(_parse())
    assert mtp.num_depths == 2 and mtp.lambda_schedule.kind == "constant" and mtp.lambda_schedule.value == 0.1


def test_deepseek_v3_schedule_and_all_flags_parse():
    args = _parse(
        "--mtp-plugin-num-depths", "2",
        "--mtp-plugin-lambda-schedule", "piecewise",
        "--mtp-plugin-lambda-values", "0.3", "0.1",
        "--mtp-plugin-lambda-boundaries", "10e12",
        "--mtp-plugin-depth-weights", "0.75", "0.25",
        "--mtp-plugin-chunk-tokens", "4096",
        "--mtp-plugin-placement", "stage",
        "--mtp-plugin-stage", "1",
        "--mtp-plugin-mask-across-eod",
    )  # fmt: skip
    mtp = mtp_config_from_args(args)
    schedule = mtp.lambda_schedule.build()
    assert schedule(0) == 0.3 and schedule(10e12) == 0.1
    assert mtp.weights == (0.75, 0.25) and mtp.loss_chunk_tokens == 4096
    assert mtp.placement == "stage" and mtp.mtp_stage == 1 and mtp.mask_across_eod


def test_linear_schedule_takes_start_and_end():
    args = _parse(
        "--mtp-plugin-lambda-schedule", "linear",
        "--mtp-plugin-lambda-values", "0.3", "0.1",
        "--mtp-plugin-lambda-boundaries", "0", "1e9",
    )  # fmt: skip
    schedule = lambda_schedule_from_args(args).build()
    assert schedule(5e8) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("argv", "native", "needle"),
    [
        (["--mtp-plugin-num-depths", "3"], 2, "--mtp-num-layers=2"),
        ([], None, "--mtp-num-layers"),
        (["--mtp-plugin-lambda-values", "0.3", "0.1"], 2, "one value"),
        (["--mtp-plugin-lambda-schedule", "cosine"], 2, "START END"),
    ],
    ids=["depth-mismatch", "no-depth", "constant-two-values", "cosine-missing-range"],
)
def test_bad_flags_name_the_fix(argv, native, needle):
    with pytest.raises(ValueError, match=needle.replace("-", r"\-")):
        mtp_config_from_args(_parse(*argv, mtp_num_layers=native))


def test_get_batch_layouts_of_both_megatron_lm_generations():
    old = batch_as_dict(("T", "L", "M", None, "P", None))  # core_v0.16 - v0.18
    assert (old["tokens"], old["labels"], old["loss_mask"], old["position_ids"]) == ("T", "L", "M", "P")
    new = batch_as_dict((None, None, None, None, "L", None, "M", None, "P", "T"))  # core_v0.19 BATCH_KEYS
    assert (new["tokens"], new["labels"], new["loss_mask"], new["position_ids"]) == ("T", "L", "M", "P")
    with pytest.raises(ValueError, match="layout"):
        batch_as_dict((1, 2, 3))


def megatron_lm_args(**overrides) -> argparse.Namespace:
    """The fields of Megatron-LM's parsed args the provider reads, with a tiny MoE model."""
    args = _parse("--mtp-plugin-lambda-schedule", "piecewise", "--mtp-plugin-lambda-values", "0.3", "0.1",
                  "--mtp-plugin-lambda-boundaries", "1000")  # fmt: skip
    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, group_query_attention=False, num_query_groups=1,
        ffn_hidden_size=64, seq_length=16, vocab_size=100, padded_vocab_size=128, num_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, moe_layer_freq=[0, 1],
        moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall", untie_embeddings_and_output_weights=True,
        init_method_std=0.02, rotary_base=10000, position_embedding_type="rope", tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, expert_model_parallel_size=1, context_parallel_size=1,
        sequence_parallel=False, bf16=False, transformer_impl="local", consumed_train_samples=0,
    )  # fmt: skip
    fields.update(overrides)
    vars(args).update(fields)
    return args


def _provider_worker() -> dict:
    import torch

    from mtp_plugin.megatron import MTPGPTModel, MTPMetrics, mtp_forward_step
    from mtp_plugin.megatron.lm_patch import build_model_from_args

    args = megatron_lm_args()
    model = build_model_from_args(args, pre_process=True, post_process=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, 17), generator=gen)
    # As pretrain_gpt.get_batch returns it in core_v0.16: tokens, labels, loss_mask, attention_mask, position_ids, packed
    values = (tokens[:, :-1], tokens[:, 1:], torch.ones(2, 16), None, torch.arange(16).expand(2, 16), None)
    metrics = MTPMetrics(2)
    output, loss_func = mtp_forward_step(iter([batch_as_dict(values)]), model, lam=0.3, metrics=metrics)
    loss, num_tokens, report = loss_func(output)
    return {
        "is_mtp_model": isinstance(model, MTPGPTModel),
        "depths": len(model.mtp_stack.depths),
        "layer_kinds": [type(layer.mlp).__name__ for layer in model.decoder.layers],
        "mtp_mlp": type(model.mtp_stack.depths[0].block.layer.mlp).__name__,
        "vocab": model.output_layer.weight.shape[0],
        "report_keys": sorted(report),
        "num_tokens": int(num_tokens),
        "finite": bool(torch.isfinite(loss)),
        "metrics": metrics.reduce(None),
    }


@pytest.mark.megatron
def test_provider_builds_the_mtp_moe_from_megatron_lm_args():
    (out,) = run_distributed(_provider_worker, 1, parallel={}, timeout=120)
    assert out["is_mtp_model"] and out["depths"] == 2
    assert out["layer_kinds"] == ["MLP", "MoELayer"]  # first layer dense (moe_layer_freq [0, 1]), then MoE
    assert out["mtp_mlp"] == "MoELayer"  # the depth's block follows the trunk's last layer
    assert out["vocab"] == 128  # Megatron-LM's padded vocabulary, unchanged
    assert out["report_keys"] == [
        "lm loss",
        "mtp_1 acceptance",
        "mtp_1 loss",
        "mtp_2 acceptance",
        "mtp_2 loss",
    ]
    assert out["num_tokens"] == 32 and out["finite"]
    assert 0 < out["metrics"]["mtp_2 loss"] < 10
