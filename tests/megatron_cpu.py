"""Run real Megatron-Core on CPU over gloo, for tests only.

What the product itself changes at run time is listed in README ("What the plugin changes at run
time") and measured by tests/train/test_runtime_changes.py: on CPU, torch.cuda's device, synchronize and
stream queries plus a TorchFunctionMode (mtp_plugin.train.cpu); on megatron-core 0.16.x,
`moe_utils.te_general_gemm = None` (mtp_plugin.megatron.compat). `install_cpu_shims` applies those and
one test-only shim: Megatron's alltoall token dispatcher made to run on CPU, for the model-level tests
that exercise the dispatcher GPU runs use. The product refuses alltoall on CPU (the app and the Trainer),
so no training-loop test uses it (tests/train_tiny.py: allgather). Works with megatron-core 0.16.1 and
0.19.x; see /work/shared/PLATFORM.md, "Megatron-Core on CPU over gloo".

Also here: a tiny GPTModel builder (local spec, fp32, CPU init, optional MoE and native MTP) and a
forward/backward runner over several microbatches, shared by the distributed tests.

Shape legend: b batch, s sequence, h hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

_INSTALLED = False


def _alltoall_dtoh_cpu(self, point: str, tokens_per_expert: torch.Tensor | None = None):
    """CPU replacement of MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize.

    Upstream moves split sizes to host on a side CUDA stream and converts them to numpy (the
    all-to-all takes numpy split sizes); on CPU there is no stream, only the numpy conversion.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name, None)
            if torch.is_tensor(value):
                setattr(self, name, value.cpu().numpy())
    return tokens_per_expert


class _NoStream:
    """Stand-in for the alltoall dispatcher's side CUDA stream (never used on CPU)."""


def install_cpu_shims(*, cuda_to_cpu_mode: bool = True) -> None:
    """Apply the CPU shims in this process (idempotent). Call before building any model.

    - the product's torch-level CPU mode (`mtp_plugin.train.cpu.enable_megatron_on_cpu`: CUDA device,
      stream and synchronize queries answered by the CPU; `device="cuda"` mapped to CPU);
    - the plugin's megatron-core 0.16.1 router fix (`mtp_plugin.megatron.compat`), for native models;
    - test-only, on Megatron's alltoall dispatcher: split sizes converted to numpy with no CUDA stream,
      so that model-level tests can exercise the alltoall dispatcher on CPU (the product's CPU runs
      use allgather; its Trainer refuses alltoall without CUDA).
    """
    global _INSTALLED
    if _INSTALLED:
        return
    from mtp_plugin.train.cpu import enable_megatron_on_cpu

    del cuda_to_cpu_mode  # always on: pp>1 schedules allocate on "cuda"
    enable_megatron_on_cpu()
    # Native GPTModels built by the tests need the same 0.16.1 fix the plugin's model applies.
    from mtp_plugin.megatron.compat import ensure_mla_without_te, ensure_moe_router_without_te

    ensure_moe_router_without_te()
    ensure_mla_without_te()
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    alltoall = dispatcher.MoEAlltoAllTokenDispatcher
    if getattr(alltoall, "cuda_dtoh_stream", None) is None:
        alltoall.cuda_dtoh_stream = _NoStream()
    alltoall._maybe_dtoh_and_synchronize = _alltoall_dtoh_cpu
    _INSTALLED = True


def seed_megatron(seed: int) -> None:
    """Seed torch and Megatron's RNG tracker without touching CUDA.

    `inference_rng_tracker=True` selects a tracker that does not assert on CUDA RNG state.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


# --------------------------------------------------------------------------------------------
# Tiny GPTModel for tests.


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyGPT:
    """Shape and features of a tiny Megatron GPTModel for CPU tests."""

    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    vocab_size: int = 96
    seq_length: int = 16
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_token_dispatcher_type: str = "allgather"
    mtp_num_layers: int | None = 2
    mtp_loss_scaling_factor: float = 0.1
    pipeline_model_parallel_layout: str | None = None
    share_embeddings_and_output_weights: bool = True
    position_embedding_type: str = "rope"
    calculate_per_token_loss: bool = False
    # DeepSeek-V3's attention and routing at toy size: MLA (q LoRA, latent norms, YaRN) and sigmoid
    # scores with the balancing bias, node-limited groups and a scaling factor (MoE only).
    deepseek_v3: bool = False


# MLA and router fields of a tiny DeepSeek-V3-shaped TransformerConfig (hidden 32, 4 heads).
TINY_MLA_FIELDS: dict[str, Any] = dict(
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_head_dim=8,
    qk_pos_emb_head_dim=4,
    v_head_dim=8,
    qk_layernorm=True,
    rope_type="yarn",
    rotary_scaling_factor=4.0,
    original_max_position_embeddings=8,
    mscale=1.0,
    mscale_all_dim=1.0,
)
TINY_SIGMOID_ROUTER_FIELDS: dict[str, Any] = dict(
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_router_num_groups=2,
    moe_router_group_topk=1,
    moe_router_topk_scaling_factor=2.5,
    moe_router_load_balancing_type="seq_aux_loss",
    moe_aux_loss_coeff=1e-2,
    moe_router_dtype="fp32",
)


def tiny_transformer_config(model: TinyGPT, **overrides: Any):
    """TransformerConfig for `model` matching the parallel state already initialised."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,  # True with MoE fails on CPU (in-place on a view)
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        normalization="RMSNorm",
        mtp_num_layers=model.mtp_num_layers,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
        pipeline_model_parallel_layout=model.pipeline_model_parallel_layout,
        calculate_per_token_loss=model.calculate_per_token_loss,
    )
    if model.num_moe_experts is not None:
        kwargs.update(
            num_moe_experts=model.num_moe_experts,
            moe_router_topk=model.moe_router_topk,
            moe_token_dispatcher_type=model.moe_token_dispatcher_type,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_ffn_hidden_size=model.ffn_hidden_size,
        )
        if model.deepseek_v3:
            kwargs.update(TINY_SIGMOID_ROUTER_FIELDS)
    if model.deepseek_v3:
        kwargs.update(TINY_MLA_FIELDS)
    kwargs.update(overrides)
    return (MLATransformerConfig if model.deepseek_v3 else TransformerConfig)(**kwargs)


def build_tiny_gpt(model: TinyGPT, **config_overrides: Any):
    """Build this pipeline stage of a tiny GPTModel (local spec, native MTP if configured).

    Call after `initialize_model_parallel`. Returns the bare GPTModel (no DDP wrapper).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    config = tiny_transformer_config(model, **config_overrides)
    layer_spec = get_gpt_layer_local_spec(
        num_experts=model.num_moe_experts,
        moe_grouped_gemm=False,
        normalization="RMSNorm",
        qk_layernorm=config.qk_layernorm,
        multi_latent_attention=config.multi_latent_attention,
    )
    if config.multi_latent_attention:
        # Megatron's local DotProductAttention cannot take MLA's head widths (mtp_plugin/megatron/mla.py).
        from mtp_plugin.megatron.mla import with_local_mla_attention

        layer_spec = with_local_mla_attention(layer_spec)
    mtp_block_spec = None
    if model.mtp_num_layers:
        mtp_block_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False)
    if model.pipeline_model_parallel_layout is not None:
        # With a layout the stage roles come from it ('E' and 'L'), not from the pp rank alone.
        from megatron.core.transformer.enums import LayerType

        layout = config.pipeline_model_parallel_layout.layout
        stage = layout[ps.get_pipeline_model_parallel_rank()][0]
        pre_process, post_process = LayerType.embedding in stage, LayerType.loss in stage
    else:
        pre_process = ps.is_pipeline_first_stage()
        post_process = ps.is_pipeline_last_stage()
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        mtp_block_spec=mtp_block_spec,
    )


def stage_layer_offset(gpt_model) -> int:
    """Global index of this stage's first decoder layer."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(gpt_model.config)


def to_global_names(gpt_model, state: dict[str, Any]) -> dict[str, Any]:
    """Rename this rank's local keys to pp=1, ep=1 names.

    `decoder.layers.{local}.` -> global layer index (pipeline offset);
    `experts.local_experts.{i}.` -> global expert index `ep_rank * num_local_experts + i`.
    """
    from megatron.core import parallel_state as ps

    offset = stage_layer_offset(gpt_model)
    num_experts = gpt_model.config.num_moe_experts or 0
    num_local = num_experts // ps.get_expert_model_parallel_world_size()
    expert_offset = ps.get_expert_model_parallel_rank() * num_local
    marker = "experts.local_experts."
    # A split plan's stage holds depths first_depth.. under local indices 0..
    depth_offset = getattr(gpt_model, "mtp_depths", range(1, 1)).start - 1
    out = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            local, rest = key[len("decoder.layers.") :].split(".", 1)
            key = f"decoder.layers.{int(local) + offset}.{rest}"
        if key.startswith("mtp_stack.depths."):
            local, rest = key[len("mtp_stack.depths.") :].split(".", 1)
            key = f"mtp_stack.depths.{int(local) + depth_offset}.{rest}"
        if marker in key:
            head, tail = key.split(marker, 1)
            local, rest = tail.split(".", 1)
            key = f"{head}{marker}{int(local) + expert_offset}.{rest}"
        out[key] = value
    return out


def load_global_state(gpt_model, full_state: dict[str, torch.Tensor]) -> None:
    """Load this stage's slice of a pp=1 state dict (strict).

    Keys that only exist at pp>1 (the unused `output_layer.weight` of a tied last stage that also
    holds MTP) are filled from the word embedding, which is what they mirror.
    """
    local_names = list(gpt_model.state_dict().keys())
    local_by_global = to_global_names(gpt_model, {k: k for k in local_names})
    state = {}
    for glob, local in local_by_global.items():
        if glob in full_state:
            state[local] = full_state[glob]
        elif glob == "output_layer.weight":
            state[local] = full_state["embedding.word_embeddings.weight"]
        elif glob.endswith("_extra_state"):
            continue
        else:
            raise KeyError(f"{glob} (local {local}) missing from the reference state dict")
    result = gpt_model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")


def make_microbatches(
    model: TinyGPT, num_microbatches: int, micro_batch_size: int, seed: int, *, mask_tail: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Deterministic token microbatches (labels = next token) with an optional masked tail."""
    gen = torch.Generator().manual_seed(seed)
    s = model.seq_length
    batches = []
    for _ in range(num_microbatches):
        tokens_b_s1 = torch.randint(0, model.vocab_size, (micro_batch_size, s + 1), generator=gen)
        loss_mask_bs = torch.ones(micro_batch_size, s)
        if mask_tail:
            loss_mask_bs[:, -mask_tail:] = 0.0
        batches.append(
            {
                "tokens": tokens_b_s1[:, :-1].contiguous(),
                "labels": tokens_b_s1[:, 1:].contiguous(),
                "loss_mask": loss_mask_bs,
                "position_ids": torch.arange(s).unsqueeze(0).expand(micro_batch_size, s).contiguous(),
            }
        )
    return batches


def read_mtp_tracker() -> torch.Tensor | None:
    """Per-depth sum over microbatches of Megatron's logged MTP loss (unreduced), or None."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    values = tracker.get("loss_values", tracker.get("values"))  # 0.19 renamed "values"
    return None if values is None else values.detach().clone()


def forward_backward(
    gpt_model, microbatches: list[dict[str, torch.Tensor]], *, forward_only: bool = False
) -> dict[str, Any]:
    """Run Megatron's pipeline schedule over `microbatches` on this stage.

    The loss function is Megatron-LM's pretrain_gpt convention: (masked sum, num tokens, logs),
    so the schedule divides by tokens and by the number of microbatches.
    Returns {"lm_loss": [per-microbatch mean main loss] (last stage only), "mtp_tracker": ...}.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = gpt_model.config
    data = iter(microbatches)

    def loss_func(loss_mask_bs, output_bs):
        loss_sum = (output_bs.float() * loss_mask_bs).sum()
        num_tokens = loss_mask_bs.sum().to(torch.int)
        return loss_sum, num_tokens, {"lm loss": (loss_sum.detach() / num_tokens).clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output_bs = model(
            batch["tokens"],
            batch["position_ids"],
            None,  # attention mask: causal mask built by the local attention
            labels=batch["labels"],
            loss_mask=batch["loss_mask"],
        )
        return output_bs, lambda out: loss_func(batch["loss_mask"], out)

    gpt_model.zero_grad(set_to_none=True)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[gpt_model],
        num_microbatches=len(microbatches),
        seq_length=microbatches[0]["tokens"].shape[1],
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    del config
    return {
        "lm_loss": [d["lm loss"] for d in losses],
        "mtp_tracker": read_mtp_tracker(),
    }


def build_tiny_plugin_gpt(
    model: TinyGPT, *, loss_chunk_tokens: int = 0, trunk_gradients: str = "joint", **config_overrides: Any
):
    """This pipeline stage of the plugin's MTPGPTModel with `model`'s shape and config.

    Same TransformerConfig and trunk spec as `build_tiny_gpt`, so the two hold the same parameters
    (the MTP depths under the plugin's names). Stage roles and the MTP stage come from the plugin's
    placement planner (Megatron's layout when `model.pipeline_model_parallel_layout` is set).
    """
    from megatron.core import parallel_state as ps

    from mtp_plugin.megatron import MTPGPTModel, trunk_layer_spec
    from mtp_plugin.megatron.placement import plan_pipeline

    plan = plan_pipeline(
        num_layers=model.num_layers,
        num_depths=model.mtp_num_layers or 0,
        pipeline_size=ps.get_pipeline_model_parallel_world_size(),
        layout=model.pipeline_model_parallel_layout,
    )
    # A split layout reaches Megatron as the one it accepts (placement.py), the depths per stage as `depths`.
    config_overrides.setdefault("pipeline_model_parallel_layout", plan.megatron_layout)
    config = tiny_transformer_config(model, **config_overrides)
    rank = ps.get_pipeline_model_parallel_rank()
    stage = plan.stages[rank]
    return MTPGPTModel(
        config,
        trunk_layer_spec(config),
        model.vocab_size,
        model.seq_length,
        mtp_stage=plan.mtp_stage or 0,
        depths=plan.depths_on(rank) if plan.is_split else None,
        loss_chunk_tokens=loss_chunk_tokens,
        trunk_gradients=trunk_gradients,
        pre_process="E" in stage,
        post_process="L" in stage,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
    )


def ddp_and_adam(model, *, lr: float = 1e-2):
    """`model` in Megatron's DDP (fp32 grad buffers, no distributed optimizer) and Megatron's Adam over it
    (no clipping), with the config hooks Megatron's schedules call: (ddp, optimizer)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, clip_grad=0.0), [ddp])
    return ddp, optimizer


def plugin_forward_backward(
    model, microbatches, *, lam: float, metrics=None, per_token_loss: bool = False, **step_kwargs: Any
):
    """Megatron's schedule over `microbatches` with the plugin's forward step; returns the loss reports.

    step_kwargs: more `mtp_forward_step` arguments (depth_weights, global_counts).
    """
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mtp_plugin.megatron import mtp_forward_step

    return get_forward_backward_func()(
        forward_step_func=partial(
            mtp_forward_step, lam=lam, metrics=metrics, per_token_loss=per_token_loss, **step_kwargs
        ),
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=microbatches[0]["tokens"].shape[1],
        micro_batch_size=microbatches[0]["tokens"].shape[0],
    )
