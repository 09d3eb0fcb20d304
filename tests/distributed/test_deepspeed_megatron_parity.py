"""The DeepSpeed model and the Megatron model compute the same numbers for the same weights.

One process builds the plugin's Megatron model (`transformer_config_from` + `build_mtp_gpt_model`, model-parallel
state of world size 1 on gloo) and the plugin's DeepSpeed PipelineModule (1 stage) from one `ModelConfig`,
copies the Megatron weights into the DeepSpeed module by an explicit name map, and runs one micro-batch through
both: Megatron's own schedule with the plugin's forward step, and the pipe's layers with its `loss_fn`. The
main loss, every depth's loss and every mapped gradient must agree within fp32 rtol 1e-5, and the pipe's must
agree with the core reference's (`core_reference_check`) on the same weights.

Two models, both built and compared in one process: a dense one and an MoE one (layer 1 and both depths'
blocks MoE: 4 SwiGLU experts, top-2, a shared expert). The MoE model is the same model on both backends
because (a) DeepSpeed's gate runs dropless (`capacity_factor` 0: `drop_tokens=False`, each expert's capacity
the largest count), as Megatron's MoE is without a capacity factor; (b) DeepSpeed's top-2 weights are the
softmax over all experts renormalised over the two chosen, which is Megatron's softmax over the top-k logits
(`moe_router_pre_softmax` off); (c) `moe_aux_loss_coeff` is 0. The aux losses themselves differ: DeepSpeed's
top-2 loss counts only each token's first choice (E^2 mean(me * ce), ce from mask1) and is added to the loss
through the pipe; Megatron's switch loss counts all k choices (f_i over T * k) and enters the backward through
a gradient hook, not the loss value. So with a non-zero coefficient the gradients would differ by design.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("deepspeed")

from distributed_utils import run_distributed  # noqa: E402

pytestmark = [pytest.mark.deepspeed, pytest.mark.megatron, pytest.mark.distributed]

LAM = 0.3
NUM_LAYERS = 2
NUM_DEPTHS = 2

# Megatron layer submodule -> DeepSpeed layer submodule (mtp_plugin/deepspeed/layers.py).
LAYER_NAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "self_attention.linear_qkv.weight": "attention.qkv.weight",
    "self_attention.linear_proj.weight": "attention.proj.weight",
    "pre_mlp_layernorm.weight": "mlp_norm.weight",
    # Both gated fc1s hold [gate; up] along the output dim: a plain copy.
    "mlp.linear_fc1.weight": "mlp.fc1.weight",
    "mlp.linear_fc2.weight": "mlp.fc2.weight",
}


def moe_layer_names(num_experts: int) -> dict[str, str]:
    """Megatron's MoELayer (router, SequentialMLP experts, shared expert) -> the DeepSpeed MoEMLP's."""
    names = {
        "mlp.router.weight": "mlp.moe.deepspeed_moe.gate.wg.weight",
        "mlp.shared_experts.linear_fc1.weight": "mlp.shared.fc1.weight",
        "mlp.shared_experts.linear_fc2.weight": "mlp.shared.fc2.weight",
    }
    for e in range(num_experts):
        for fc in ("fc1", "fc2"):
            names[f"mlp.experts.local_experts.{e}.linear_{fc}.weight"] = (
                f"mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.{fc}.weight"
            )
    return names


def megatron_to_deepspeed_names(model) -> dict[str, str]:
    """Megatron MTPGPTModel parameter name -> the 1-stage pipe's (spec index: embedding 0, trunk 1..L,
    final norm L+1, then (lookup, depth) per depth, head last). Every depth's block is built like the
    trunk's last layer on both backends."""
    num_layers = model.num_layers
    dense = {k: v for k, v in LAYER_NAMES.items() if not k.startswith("mlp.")}
    moe = {**dense, **moe_layer_names(model.num_experts)} if model.is_moe else LAYER_NAMES

    def layer(i: int) -> dict[str, str]:
        return moe if model.is_moe and i >= model.first_dense_layers else LAYER_NAMES

    names = {
        "embedding.word_embeddings.weight": "tied_modules.embed.weight",
        "output_layer.weight": "tied_modules.head.weight",
        "decoder.final_layernorm.weight": f"{num_layers + 1}.norm.weight",
    }
    for i in range(num_layers):
        for meg, ds in layer(i).items():
            names[f"decoder.layers.{i}.{meg}"] = f"{1 + i}.layer.{ds}"
    for j in range(NUM_DEPTHS):
        meg, ds = f"mtp_stack.depths.{j}", f"{num_layers + 3 + 2 * j}.mtp"
        for norm in ("enorm", "hnorm", "final_norm"):
            names[f"{meg}.{norm}.weight"] = f"{ds}.{norm}.weight"
        names[f"{meg}.eh_proj.linear.weight"] = f"{ds}.eh_proj.weight"
        for sub_meg, sub_ds in layer(num_layers - 1).items():
            names[f"{meg}.block.layer.{sub_meg}"] = f"{ds}.block.layer.{sub_ds}"
    return names


def qkv_megatron_to_split(weight: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """Megatron's linear_qkv rows, per query group [q_1..q_(n/g), k, v] (head dim d each), to the DeepSpeed
    layer's [all q heads; all k; all v]; query head i stays in group i // (n/g) on both sides."""
    heads_per_group = num_heads // num_groups
    per_group = weight.view(num_groups, heads_per_group + 2, -1, weight.shape[-1])
    q = per_group[:, :heads_per_group].reshape(-1, weight.shape[-1])
    k = per_group[:, heads_per_group].reshape(-1, weight.shape[-1])
    v = per_group[:, heads_per_group + 1].reshape(-1, weight.shape[-1])
    return torch.cat([q, k, v])


def _both_backends(model) -> dict:
    from deepspeed_cpu import core_reference_check, init_deepspeed_cpu
    from megatron_cpu import plugin_forward_backward

    from mtp_plugin.config import MTPConfig, ParallelConfig
    from mtp_plugin.deepspeed.model import MTPLoss, build_pipeline_module
    from mtp_plugin.megatron import MTPMetrics
    from mtp_plugin.megatron.config import transformer_config_from
    from mtp_plugin.megatron.model import build_mtp_gpt_model

    mtp = MTPConfig(num_depths=NUM_DEPTHS)
    megatron = build_mtp_gpt_model(
        model, mtp, transformer_config_from(model, ParallelConfig(), mtp), pre_process=True, post_process=True
    )
    init_deepspeed_cpu()
    loss = MTPLoss(num_depths=NUM_DEPTHS, depth_weights=mtp.weights, chunk_tokens=8, eod_id=None, lam=LAM)
    pipe = build_pipeline_module(model, mtp, num_stages=1, loss=loss)

    heads, groups = model.num_attention_heads, model.num_query_groups
    names = megatron_to_deepspeed_names(model)

    def to_deepspeed(meg_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return (
            qkv_megatron_to_split(tensor, heads, groups) if meg_name.endswith("linear_qkv.weight") else tensor
        )

    meg_params, ds_params = dict(megatron.named_parameters()), dict(pipe.named_parameters())
    assert set(names) == set(meg_params) and set(names.values()) == set(ds_params)
    with torch.no_grad():
        for meg_name, ds_name in names.items():
            ds_params[ds_name].copy_(to_deepspeed(meg_name, meg_params[meg_name]))

    gen = torch.Generator().manual_seed(7)
    window = torch.randint(0, model.vocab_size, (2, model.seq_length + 1), generator=gen)
    tokens, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
    batch = {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones_like(labels, dtype=torch.float32),
        "position_ids": torch.arange(model.seq_length).expand_as(tokens).contiguous(),
    }
    meg_metrics = MTPMetrics(NUM_DEPTHS)
    plugin_forward_backward(megatron, [batch], lam=LAM, metrics=meg_metrics)
    meg_grads = {names[n]: to_deepspeed(n, p.grad) for n, p in meg_params.items()}

    ds_metrics = MTPMetrics(NUM_DEPTHS)
    loss.metrics = ds_metrics
    # The pipe's loss and gradients, and the core reference's on the pipe's (= Megatron's) weights.
    reference = core_reference_check(pipe, loss, window, LAM)
    return {
        "megatron": meg_metrics.reduce(),
        "deepspeed": ds_metrics.reduce(),
        "megatron_grads": meg_grads,
        "names": names,
        **reference,
    }


def _dense_and_moe() -> dict:
    from deepspeed_cpu import tiny_moe_model

    # Grouped-query attention (4 heads, 2 groups) so that the qkv map's grouping is exercised; untied head.
    # moe_aux_loss_coeff 0: the two backends' aux losses differ (module docstring).
    moe = tiny_moe_model(num_layers=NUM_LAYERS, moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather")
    dense = dataclasses.replace(
        moe, num_experts=0, moe_ffn_hidden_size=None, moe_shared_expert_size=0, first_dense_layers=1
    )
    return {"dense": _both_backends(dense), "moe": _both_backends(moe)}


@pytest.fixture(scope="module")
def both_backends() -> dict:
    (out,) = run_distributed(_dense_and_moe, 1, parallel=dict(), timeout=120)
    return out


@pytest.mark.parametrize("trunk", ["dense", "moe"])
def test_deepspeed_model_equals_megatron_model_and_core_reference_for_the_same_weights(both_backends, trunk):
    out = both_backends[trunk]
    meg, ds = out["megatron"], out["deepspeed"]
    assert set(meg) == set(ds) and {"lm loss", "mtp_1 loss", "mtp_2 loss"} <= set(meg)
    for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
        assert ds[key] == pytest.approx(meg[key], rel=1e-5, abs=0), key
    # The total the pipe returns is that same main loss plus λ Σ w_k L_k, and the core reference's.
    total = meg["lm loss"] + LAM * 0.5 * (meg["mtp_1 loss"] + meg["mtp_2 loss"])
    assert float(out["pipe_loss"]) == pytest.approx(total, rel=1e-5, abs=0)
    torch.testing.assert_close(out["pipe_loss"], out["ref_loss"], rtol=1e-5, atol=0)
    assert set(out["pipe_grads"]) == set(out["megatron_grads"]) == set(out["names"].values())
    for name, grad in out["megatron_grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(out["pipe_grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(out["ref_grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
