"""Parity with Megatron-Core's native MTP: same weights -> same per-depth losses and gradients.

Native: GPTModel(mtp_block_spec=get_gpt_mtp_block_spec(...)), mtp_num_layers=D,
mtp_loss_scaling_factor=λ, MTP loss folded into the gradients by MTPLossAutoScaler.
Plugin: MTPGPTModel with the plugin's MTPStack, loss returned to mtp_loss_func (constant λ).
Each configuration runs in its own process (Megatron's MTP tracker is a process-global singleton).
"""

import pytest
import torch
from distributed_utils import run_distributed

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

LAMBDA = 0.3
NUM_MICROBATCHES = 3


def native_to_plugin_name(name: str) -> str:
    """mtp.layers.{i}.X -> mtp_stack.depths.{i}.Y (everything else keeps its name)."""
    if not name.startswith("mtp.layers."):
        return name
    index, rest = name[len("mtp.layers.") :].split(".", 1)
    rest = (
        rest.replace("eh_proj.", "eh_proj.linear.", 1)
        .replace("transformer_layer.", "block.layer.", 1)  # megatron-core 0.16
        .replace("mtp_model_layer.", "block.layer.", 1)  # 0.17+ renamed it
        .replace("final_layernorm.", "final_norm.", 1)
    )
    return f"mtp_stack.depths.{index}.{rest}"


def _native_and_plugin(shape, *, chunk_tokens: int = 0):
    """Native GPTModel with Megatron's MTP and the plugin's model holding the same weights."""
    from megatron_cpu import build_tiny_gpt, build_tiny_plugin_gpt

    native = build_tiny_gpt(shape)
    plugin = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens)
    load_native_weights(plugin, native.state_dict())
    return native, plugin


def load_native_weights(plugin, native_state) -> None:
    """Load a native-MTP GPTModel's state into the plugin's model (strict, up to Megatron's extra state)."""
    state = {native_to_plugin_name(k): v for k, v in native_state.items() if not k.endswith("_extra_state")}
    result = plugin.load_state_dict(state, strict=False)
    assert not [k for k in result.missing_keys if not k.endswith("_extra_state")], result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys


def _grads(model, rename=lambda n: n):
    return {rename(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _randomise_expert_bias(model, seed: int) -> None:
    """Give every router's balancing bias distinct values, as after some steps, so that it selects experts."""
    gen = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("expert_bias"):
            buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.5)


def _parity_worker(
    num_depths: int,
    num_experts: int | None,
    tied: bool,
    chunk_tokens: int,
    deepseek_v3: bool,
    detached: bool = False,
):
    from megatron_cpu import TinyGPT, forward_backward, make_microbatches, plugin_forward_backward

    from mtp_plugin.megatron import MTPMetrics

    shape = TinyGPT(
        num_layers=2,
        num_moe_experts=num_experts,
        mtp_num_layers=num_depths,
        mtp_loss_scaling_factor=LAMBDA,
        share_embeddings_and_output_weights=tied,
        deepseek_v3=deepseek_v3,
    )
    if deepseek_v3:
        from megatron_cpu import build_tiny_gpt, build_tiny_plugin_gpt

        native = build_tiny_gpt(shape)
        _randomise_expert_bias(native, seed=11)
        plugin = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens)
        load_native_weights(plugin, native.state_dict())
        # MTP blocks are built from the trunk's last layer: MLA attention and a sigmoid-routed MoE.
        depth = plugin.mtp_stack.depths[0].block.layer
        assert type(depth.self_attention).__name__ == "MLASelfAttention"
        assert depth.mlp.router.score_function == "sigmoid" and depth.mlp.router.expert_bias is not None
    elif detached:
        from megatron_cpu import build_tiny_gpt, build_tiny_plugin_gpt

        native = build_tiny_gpt(shape, mtp_detach_heads=True)
        plugin = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens, trunk_gradients="detached")
        load_native_weights(plugin, native.state_dict())
    else:
        native, plugin = _native_and_plugin(shape, chunk_tokens=chunk_tokens)
    batches = make_microbatches(shape, NUM_MICROBATCHES, 2, seed=7, mask_tail=2)
    native_out = forward_backward(native, batches)
    metrics = MTPMetrics(num_depths)
    losses = plugin_forward_backward(plugin, batches, lam=LAMBDA, metrics=metrics)
    stats = metrics.reduce()
    return {
        "native_lm": [float(x) for x in native_out["lm_loss"]],
        "plugin_lm": [float(d["lm loss"][0] / d["lm loss"][1]) for d in losses],
        # Megatron's tracker holds Σ over micro-batches of each micro-batch's mean depth loss.
        "native_depth": (native_out["mtp_tracker"] / NUM_MICROBATCHES).tolist(),
        "plugin_depth": [stats[f"mtp_{k} loss"] for k in range(1, num_depths + 1)],
        "native_grads": _grads(native, native_to_plugin_name),
        "plugin_grads": _grads(plugin),
    }


CASES = [
    pytest.param(1, None, False, 0, id="dense-D1-untied"),
    pytest.param(2, None, True, 0, id="dense-D2-tied"),
    pytest.param(3, None, False, 5, id="dense-D3-untied-chunked"),
    pytest.param(1, 4, True, 0, id="moe-D1-tied"),
    pytest.param(2, 4, False, 7, id="moe-D2-untied-chunked"),
    pytest.param(3, 4, False, 0, id="moe-D3-untied"),
]
# MLA trunk (q LoRA, latent norms, YaRN) with sigmoid routing, a non-zero balancing bias, node-limited
# groups, a topk scaling factor and the sequence-wise aux loss.
DEEPSEEK_CASES = [
    pytest.param(2, 4, False, 5, id="mla-sigmoid-D2-untied-chunked"),
]


@pytest.mark.parametrize(("num_depths", "num_experts", "tied", "chunk_tokens"), CASES)
def test_plugin_matches_native_mtp(num_depths, num_experts, tied, chunk_tokens):
    _check_parity(num_depths, num_experts, tied, chunk_tokens, deepseek_v3=False)


@pytest.mark.parametrize(("num_depths", "num_experts", "tied", "chunk_tokens"), DEEPSEEK_CASES)
def test_mla_sigmoid_trunk_matches_native_mtp(num_depths, num_experts, tied, chunk_tokens):
    _check_parity(num_depths, num_experts, tied, chunk_tokens, deepseek_v3=True)


DETACHED_CASES = [
    pytest.param(2, None, True, 0, id="dense-D2-tied"),
    pytest.param(2, 4, False, 7, id="moe-D2-untied-chunked"),
]


@pytest.mark.parametrize(("num_depths", "num_experts", "tied", "chunk_tokens"), DETACHED_CASES)
def test_detached_depths_match_native_mtp_detach_heads(num_depths, num_experts, tied, chunk_tokens):
    """mtp.trunk_gradients=detached == Megatron-Core 0.19's mtp_detach_heads: the trunk, embedding and head
    get the main loss's gradient only; the depths theirs."""
    from packaging.version import Version

    if _megatron_version() < Version("0.19"):
        pytest.skip(f"mtp_detach_heads arrived in megatron-core 0.19; this is {_megatron_version()}")
    _check_parity(num_depths, num_experts, tied, chunk_tokens, deepseek_v3=False, detached=True)


def _check_parity(num_depths, num_experts, tied, chunk_tokens, *, deepseek_v3, detached=False):
    (out,) = run_distributed(
        _parity_worker,
        1,
        num_depths,
        num_experts,
        tied,
        chunk_tokens,
        deepseek_v3,
        detached,
        parallel=dict(),
        timeout=180,
    )
    assert out["plugin_lm"] == pytest.approx(out["native_lm"], rel=1e-6)
    # Every micro-batch has the same number of valid targets, so the token-weighted mean over
    # micro-batches equals the mean of Megatron's per-micro-batch means.
    assert out["plugin_depth"] == pytest.approx(out["native_depth"], rel=1e-5)
    assert set(out["plugin_grads"]) == set(out["native_grads"])
    for name, grad in out["native_grads"].items():
        torch.testing.assert_close(out["plugin_grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _megatron_version():
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("megatron-core"))


def _host_reads_worker(chunk_tokens: int):
    """Host reads of device values (`aten::_local_scalar_dense`) in one plugin forward + loss, D = 1 vs 3."""
    from megatron_cpu import TinyGPT, build_tiny_plugin_gpt, make_microbatches
    from torch.profiler import ProfilerActivity, profile

    from mtp_plugin.megatron import mtp_loss_func
    from mtp_plugin.megatron.step import forward_batch

    reads = {}
    for num_depths in (1, 3):
        shape = TinyGPT(num_layers=2, mtp_num_layers=num_depths)  # dense: the layers read nothing back
        model = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens)
        (batch,) = make_microbatches(shape, 1, 2, seed=5, mask_tail=2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss, _, _ = mtp_loss_func(batch["loss_mask"], forward_batch(model, batch), lam=LAMBDA)
        reads[num_depths] = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    return reads


def test_scoring_more_depths_adds_no_host_sync():
    """The loss path reads the device once per forward (the label check), whatever the number of depths
    (the main head and every depth on the chunked path; the plain path shares the check)."""
    (reads,) = run_distributed(_host_reads_worker, 1, 5, parallel=dict(), timeout=120)
    assert reads[1] >= 1  # the label-range check
    assert reads[3] == reads[1], reads
