"""Per-rank ρ meter for the DeepSpeed pipeline (DESIGN.md §3), the Megatron meter's units and log fields.

Forward hooks on the modules this rank holds (`mtp_plugin.deepspeed.layers`) turn executed shapes into
matmul FLOPs with `mtp_plugin.accounting.flops`: attention projections and scores (causal half, as the
Megatron meter's default), dense MLPs, the MoE router on every local token, the routed experts on the
[ep, local experts, capacity, h] block DeepSpeed's all-to-all hands this rank's experts (capacity padding
included: it is computed), shared experts, MTP eh_proj, and every head the loss scores (read from the
`MTPLoss`, which applies the head chunk by chunk outside any module call). A call under grad counts x3
(forward + backward), one in eval mode is not counted. Bits come from the caller's `MTPMetrics` of the
window; the window becomes log fields as the Megatron meter's does (`mtp_plugin.accounting.meter.WindowMeter`).
"""

from __future__ import annotations

import torch

from mtp_plugin.accounting.flops import (
    AttentionShape,
    MLPShape,
    attention_projection_flops,
    attention_score_flops,
    linear_flops,
    mlp_flops,
    output_head_flops,
)
from mtp_plugin.accounting.meter import WindowMeter
from mtp_plugin.config import ModelConfig
from mtp_plugin.deepspeed.layers import MoEMLP, SelfAttention, SwiGLU


def _attention_shape(model: ModelConfig) -> AttentionShape:
    return AttentionShape(
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
    )


def n_active(model: ModelConfig) -> float:
    """The seed's N: matmul weights one token touches in the trunk and main head (balanced top-k)."""
    h = model.hidden_size
    attention = attention_projection_flops(_attention_shape(model), 1) / 2
    dense = mlp_flops(MLPShape(hidden_size=h, ffn_hidden_size=model.ffn_hidden_size), 1) / 2
    moe = dense
    if model.is_moe:
        expert = mlp_flops(MLPShape(hidden_size=h, ffn_hidden_size=model.expert_ffn_hidden_size), 1) / 2
        shared = (
            mlp_flops(MLPShape(hidden_size=h, ffn_hidden_size=model.moe_shared_expert_size), 1) / 2
            if model.moe_shared_expert_size
            else 0.0
        )
        moe = h * model.num_experts + model.moe_router_topk * expert + shared
    num_moe = model.num_layers - model.first_dense_layers if model.is_moe else 0
    layers = model.num_layers * attention + (model.num_layers - num_moe) * dense + num_moe * moe
    return layers + h * model.padded_vocab_size


class DeepSpeedRhoMeter(WindowMeter):
    """`attach(pipe, loss)`, then per step `end_step()`, per log interval `reduce(metrics=...)`, `reset()`."""

    def __init__(self, model: ModelConfig, num_depths: int, *, peak_tflops: float | None = None) -> None:
        super().__init__(num_depths=num_depths, vocab_size=model.vocab_size, peak_tflops=peak_tflops)
        self.model = model
        self._n_active = n_active(model)
        self._loss = None

    def _hook(self, module: torch.nn.Module, fn) -> None:
        def hook(mod, args, output):
            if not mod.training:
                return
            fn(args[0], 3 if torch.is_grad_enabled() else 1)

        self._handles.append(module.register_forward_hook(hook))

    def attach(self, pipe, loss) -> DeepSpeedRhoMeter:
        model, add = self.model, self.tally.add
        attention = _attention_shape(model)
        seq = model.seq_length

        def rows(x: torch.Tensor) -> int:
            return x.numel() // x.shape[-1]

        for module in pipe.modules():
            if isinstance(module, SelfAttention):

                def on_attention(x, mult):
                    add("attention_projections", mult * attention_projection_flops(attention, rows(x)))
                    add(
                        "attention_scores",
                        mult
                        * attention_score_flops(
                            attention, num_tokens=rows(x), seq_length=seq, causal_half=True
                        ),
                    )

                self._hook(module, on_attention)
            elif isinstance(module, MoEMLP):
                self._attach_moe(module)
        for module in pipe.modules():
            if isinstance(module, SwiGLU) and not getattr(module, "_counted_by_moe", False):
                shape = MLPShape(hidden_size=model.hidden_size, ffn_hidden_size=module.fc2.in_features)
                self._hook(module, lambda x, mult, shape=shape: add("mlp", mult * mlp_flops(shape, rows(x))))
            elif isinstance(module, torch.nn.Linear) and getattr(module, "_is_eh_proj", False):
                h = model.hidden_size
                self._hook(
                    module,
                    lambda x, mult, h=h: add("mtp_projections", mult * linear_flops(rows(x), 2 * h, h)),
                )
        self._loss = loss
        self._loss_tokens_seen = loss.scored_tokens
        return self

    def _attach_moe(self, moe: MoEMLP) -> None:
        add, h = self.tally.add, self.model.hidden_size
        experts = moe.moe.deepspeed_moe.experts.deepspeed_experts
        for expert in experts:
            expert._counted_by_moe = True
        if moe.shared is not None:
            moe.shared._counted_by_moe = True
            shared = MLPShape(hidden_size=h, ffn_hidden_size=moe.settings.shared_expert_size)
            self._hook(
                moe.shared, lambda x, mult: add("shared_experts", mult * mlp_flops(shared, x.numel() // h))
            )
        num_experts = moe.settings.num_experts
        self._hook(
            moe.moe.deepspeed_moe.gate,
            lambda x, mult: add("router", mult * linear_flops(x.numel() // h, h, num_experts)),
        )
        expert_shape = MLPShape(hidden_size=h, ffn_hidden_size=moe.settings.ffn_hidden_size)
        # Experts.forward gets [ep, local experts, capacity, h]: every row is computed (padding too).
        self._hook(
            moe.moe.deepspeed_moe.experts,
            lambda x, mult: add("experts", mult * mlp_flops(expert_shape, x.numel() // h)),
        )

    def _heads(self) -> None:
        """Fold in the heads the loss scored since the last call (x3: each is differentiated)."""
        scored = self._loss.scored_tokens
        main, depths = scored[0] - self._loss_tokens_seen[0], scored[1] - self._loss_tokens_seen[1]
        self._loss_tokens_seen = tuple(scored)
        h, v = self.model.hidden_size, self.model.padded_vocab_size
        self.tally.add("head", 3 * output_head_flops(hidden_size=h, vocab_size=v, num_tokens=main))
        self.tally.add("mtp_heads", 3 * output_head_flops(hidden_size=h, vocab_size=v, num_tokens=depths))
        self.tally.pending_tokens += main

    def end_step(self) -> None:
        self._heads()
        super().end_step()
