"""Megatron-Core on one CUDA device (NCCL, world size 1): parity with native MTP, a training step, chunked loss.

(a) Parity: Megatron's native MTP (GPTModel with `mtp_block_spec`, loss folded in by MTPLossAutoScaler)
    and the plugin's MTPGPTModel with copied weights give the same main and per-depth losses and the same
    gradients; fp32 with TF32 off, D = 1, 2, 3, dense and MoE trunks; and in bf16 within a stated tolerance.
(b) One pp=1 training step with Megatron DDP + Megatron optimizer (bf16, Float16Module as Megatron-LM
    wraps it): the loss is finite, the MTP parameters and the trunk change, and repeated steps on one
    batch lower the loss.
(c) The chunked fused linear+CE path (`loss_chunk_tokens > 0`) gives the model the same losses and
    gradients as the plain path.

Everything runs in the pytest process: Megatron's native MTP tracker is process-global, so it is
cleared before every native run (otherwise a model with more depths than the first one indexes past it).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.megatron,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAMBDA = 0.3
NUM_MICROBATCHES = 3
MICRO_BATCH = 2


@pytest.fixture(scope="module")
def megatron_nccl():
    """torch.distributed over NCCL with one rank, Megatron's model-parallel groups, CUDA RNG tracker."""
    pytest.importorskip("megatron.core")
    from distributed_utils import free_port
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    owns_pg = not torch.distributed.is_initialized()
    if owns_pg:
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
    if owns_pg:
        torch.distributed.destroy_process_group()


def _cuda_batches(shape, num_microbatches, micro_batch, seed, mask_tail):
    from megatron_cpu import make_microbatches

    return [
        {k: v.cuda() for k, v in batch.items()}
        for batch in make_microbatches(shape, num_microbatches, micro_batch, seed=seed, mask_tail=mask_tail)
    ]


def _plugin_like(native_state, shape, *, chunk_tokens):
    """The plugin's model on CUDA holding a native model's weights."""
    from megatron_cpu import build_tiny_plugin_gpt
    from parity.test_megatron_parity import load_native_weights

    plugin = build_tiny_plugin_gpt(shape, loss_chunk_tokens=chunk_tokens).cuda()
    load_native_weights(plugin, native_state)
    return plugin


def _run_plugin(plugin, batches, num_depths):
    from megatron_cpu import plugin_forward_backward

    from mtp_plugin.megatron import MTPMetrics

    metrics = MTPMetrics(num_depths)
    plugin.zero_grad(set_to_none=True)
    losses = plugin_forward_backward(plugin, batches, lam=LAMBDA, metrics=metrics)
    grads = {n: p.grad.detach().clone() for n, p in plugin.named_parameters() if p.grad is not None}
    return losses, metrics.reduce(), grads


def _assert_grads_close(actual: dict, expected: dict, rtol: float) -> None:
    assert set(actual) == set(expected)
    for name, ref in expected.items():
        # Per-tensor absolute floor: GPU reductions reorder sums, so near-zero entries of a tensor get
        # the tolerance of its scale rather than their own.
        atol = max(rtol * ref.abs().max().item(), 1e-12)
        torch.testing.assert_close(actual[name], ref, rtol=rtol, atol=atol, msg=name)


PARITY_CASES = [
    pytest.param(1, None, False, id="dense-D1"),
    pytest.param(2, None, True, id="dense-D2-tied"),
    pytest.param(3, None, False, id="dense-D3"),
    pytest.param(1, 4, False, id="moe-D1"),
    pytest.param(2, 4, True, id="moe-D2-tied"),
    pytest.param(3, 4, False, id="moe-D3"),
]


def _native_and_plugin(num_depths, num_experts, tied, *, bf16=False, chunk_tokens=0) -> dict:
    """Native MTP and the plugin with the same weights over the same batches: losses and gradients.

    bf16: every parameter of both models cast to bf16 (as Megatron-LM's Float16Module does)."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from megatron_cpu import TinyGPT, build_tiny_gpt, forward_backward
    from parity.test_megatron_parity import native_to_plugin_name

    MTPLossLoggingHelper.tracker.clear()
    shape = TinyGPT(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=512,
        seq_length=64,
        num_moe_experts=num_experts,
        mtp_num_layers=num_depths,
        mtp_loss_scaling_factor=LAMBDA,
        share_embeddings_and_output_weights=tied,
    )
    native = build_tiny_gpt(shape).cuda()
    plugin = _plugin_like(native.state_dict(), shape, chunk_tokens=chunk_tokens)
    if bf16:
        native, plugin = native.bfloat16(), plugin.bfloat16()
    batches = _cuda_batches(shape, NUM_MICROBATCHES, MICRO_BATCH, seed=7, mask_tail=3)

    native_out = forward_backward(native, batches)
    native_grads = {
        native_to_plugin_name(n): p.grad.detach().float()
        for n, p in native.named_parameters()
        if p.grad is not None
    }
    losses, stats, plugin_grads = _run_plugin(plugin, batches, num_depths)
    return {
        "native lm": [float(x) for x in native_out["lm_loss"]],
        "plugin lm": [float(d["lm loss"][0] / d["lm loss"][1]) for d in losses],
        # Megatron's tracker holds Σ over micro-batches of each micro-batch's mean depth loss; every
        # micro-batch has the same number of valid targets, so that mean equals the token-weighted one.
        "native depth": (native_out["mtp_tracker"] / NUM_MICROBATCHES).tolist(),
        "plugin depth": [stats[f"mtp_{k} loss"] for k in range(1, num_depths + 1)],
        "native grads": native_grads,
        "plugin grads": {n: g.float() for n, g in plugin_grads.items()},
        "plugin grad dtypes": {g.dtype for g in plugin_grads.values()},
    }


@pytest.mark.parametrize(("num_depths", "num_experts", "tied"), PARITY_CASES)
def test_plugin_matches_native_mtp_on_gpu(megatron_nccl, num_depths, num_experts, tied):
    out = _native_and_plugin(num_depths, num_experts, tied)
    assert out["plugin lm"] == pytest.approx(out["native lm"], rel=1e-5)
    assert len(out["native depth"]) == num_depths
    assert out["plugin depth"] == pytest.approx(out["native depth"], rel=1e-4)
    assert all(4.0 < x < 9.0 for x in out["plugin depth"])  # ~ln(512) at initialisation: a real CE
    _assert_grads_close(out["plugin grads"], out["native grads"], rtol=1e-4)
    assert any(n.startswith("mtp_stack.depths.") for n in out["plugin grads"])


# bf16 keeps 8 significant bits (a relative step of 2^-8 = 3.9e-3 per rounding) and the two models round at
# different places (native: bf16 logits per depth; the plugin: the head matmul in bf16, the CE in fp32), so
# a few roundings apart: losses within 1e-2 relative; each gradient tensor within 5e-2 of its largest
# entry. A wrong λ, depth weight or normalisation moves them by 10% or more (fp32 parity above: 1e-4).
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-2, 5e-2


@pytest.mark.parametrize(
    ("num_experts", "tied", "chunk_tokens"),
    [(None, True, 0), (4, False, 0), (4, False, 37)],
    ids=["dense-tied", "moe", "moe-fused"],  # fused: every head, the main one too, on the Triton path
)
def test_plugin_matches_native_mtp_in_bf16(megatron_nccl, num_experts, tied, chunk_tokens):
    out = _native_and_plugin(2, num_experts, tied, bf16=True, chunk_tokens=chunk_tokens)
    assert out["plugin grad dtypes"] == {torch.bfloat16}
    assert out["plugin lm"] == pytest.approx(out["native lm"], rel=BF16_LOSS_RTOL)
    assert out["plugin depth"] == pytest.approx(out["native depth"], rel=BF16_LOSS_RTOL)
    _assert_grads_close(out["plugin grads"], out["native grads"], rtol=BF16_GRAD_RTOL)


@pytest.mark.parametrize("num_experts", [None, 4], ids=["dense", "moe"])
def test_chunked_loss_matches_plain_in_model(megatron_nccl, num_experts):
    from megatron_cpu import TinyGPT, build_tiny_gpt

    num_depths = 2
    shape = TinyGPT(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=1024,
        seq_length=64,
        num_moe_experts=num_experts,
        mtp_num_layers=num_depths,
        share_embeddings_and_output_weights=False,
    )
    reference_state = build_tiny_gpt(shape).state_dict()
    batches = _cuda_batches(shape, 2, MICRO_BATCH, seed=3, mask_tail=5)
    results = {}
    # 0: plain; 37: chunks that do not divide the 128 tokens of a micro-batch; 4096: one chunk.
    for chunk_tokens in (0, 37, 4096):
        plugin = _plugin_like(reference_state, shape, chunk_tokens=chunk_tokens)
        assert plugin.loss_chunk_tokens == chunk_tokens
        results[chunk_tokens] = _run_plugin(plugin, batches, num_depths)
    _, plain_stats, plain_grads = results[0]
    for chunk_tokens in (37, 4096):
        _, stats, grads = results[chunk_tokens]
        assert stats.keys() == plain_stats.keys()
        for key, value in plain_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-5), (chunk_tokens, key)
        _assert_grads_close(grads, plain_grads, rtol=5e-5)
        head = grads["output_layer.weight"]
        assert head.abs().sum() > 0


def test_training_step_ddp_optimizer_bf16(megatron_nccl):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from megatron_cpu import TinyGPT

    from mtp_plugin.config import ModelConfig, MTPConfig, ParallelConfig
    from mtp_plugin.megatron import MTPMetrics, build_mtp_gpt_model, mtp_forward_step, transformer_config_from

    num_depths = 2
    model_cfg = ModelConfig(
        num_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=256,
        seq_length=128,
        vocab_size=1000,
        num_experts=4,
        first_dense_layers=1,
    )
    mtp_cfg = MTPConfig(num_depths=num_depths, loss_chunk_tokens=64)
    config = transformer_config_from(model_cfg, ParallelConfig(), mtp_cfg, params_dtype=torch.bfloat16)
    model = build_mtp_gpt_model(model_cfg, mtp_cfg, config, pre_process=True, post_process=True).cuda()
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=Float16Module(config, model),
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=3e-3, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0),
        [ddp],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp.no_sync

    shape = TinyGPT(vocab_size=model_cfg.vocab_size, seq_length=model_cfg.seq_length)
    batches = _cuda_batches(shape, 2, 4, seed=5, mask_tail=2)
    watched = [
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "mtp_stack.depths.0.eh_proj.linear.weight",
        "mtp_stack.depths.1.block.layer.self_attention.linear_proj.weight",
        "mtp_stack.depths.1.final_norm.weight",
    ]
    params = dict(model.named_parameters())
    before = {n: params[n].detach().float().clone() for n in watched}

    step_losses = []
    for _ in range(4):
        metrics = MTPMetrics(num_depths)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=lambda it, m, metrics=metrics: mtp_forward_step(
                it, m, lam=LAMBDA, metrics=metrics
            ),
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=len(batches),
            seq_length=model_cfg.seq_length,
            micro_batch_size=4,
        )
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        assert grad_norm is not None and torch.isfinite(torch.tensor(grad_norm)) and grad_norm > 0
        stats = metrics.reduce()
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
        step_losses.append(
            stats["lm loss"]
            + LAMBDA * sum(stats[f"mtp_{k} loss"] for k in range(1, num_depths + 1)) / num_depths
        )

    for name in watched:
        after = params[name].detach().float()
        assert params[name].dtype == torch.bfloat16, name
        assert not torch.equal(after, before[name]), f"{name} did not change"
    # Four Adam steps on the same two micro-batches must fit them better.
    assert step_losses[-1] < step_losses[0] - 0.05, step_losses
