"""Per-rank ρ meter for Megatron-Core training (DESIGN.md §3): F, B and cluster ρ, through forward hooks.

    meter = RhoMeter(model_cfg, mtp_cfg, parallel_cfg, peak_tflops=989.0)
    meter.attach(model_chunks)            # registers forward hooks; nothing else changes in the model
    for step ...:
        forward_backward(...); optimizer.step()
        meter.end_step()                  # closes the step: its FLOPs join the log window
        if step % log_interval == 0:
            fields = meter.reduce(metrics=metrics)   # one all-reduce over the world group
            metrics.reset(); meter.reset()
    meter.detach()

**F (this rank's executed matmul FLOPs).** Forward hooks (a PyTorch extension point; no Megatron code is
patched) on the modules this rank holds observe the token counts, and the analytic formulas of
``mtp_plugin.accounting.flops`` turn them into FLOPs, with shapes read from the module's Megatron
``TransformerConfig``:

- every TransformerLayer (trunk and MTP blocks): attention projections (``self_attention``), attention
  scores (``core_attention``: query tokens x key length), dense MLP, or MoE router / routed experts /
  shared experts. Routed experts are counted with the ``tokens_per_expert`` Megatron passes to the
  experts module (``SequentialMLP``/``GroupedMLP``/``TEGroupedMLP``) on this rank: the tokens the router
  really sent to the local experts this step (padding included under drop-and-pad: it is computed).
  The counts are accumulated where they live (on device) and read once per ``reduce``.
- MTP projections (``MTPProjection``), the main head (``output_layer``; under ``loss_chunk_tokens > 0``,
  which scores it without calling ``output_layer``, from the model's output) and each depth's head (a
  forward hook on ``MTPGPTModel``, whose output carries one loss per depth), on the stage that runs them.
- Tensor parallelism: each count is divided by the tensor-parallel size (experts: by the expert
  tensor-parallel size); with sequence parallelism the local token count is multiplied back by it. The
  router is counted on the tokens this rank routes.
- Forward + backward: a hook call whose output is differentiated (grad enabled and the output requires
  grad) is counted x3 (the backward of a matmul is two matmuls of its size); any other call in training
  mode x1 (``mtp_plugin.accounting.meter.forward_cost``). That covers the first forward of a recomputed
  region (Megatron's checkpoint runs it under ``no_grad``; the recompute in backward runs with grad and
  is counted x3), so a recomputed layer costs 4x its forward, as ``config.recompute_granularity`` (full
  or selective: core_attn, mlp, moe, shared_experts) asks, with no config parsing; and what is not
  trained: under ``trunk_gradients="frozen"`` the trunk and the main head (frozen weights on constant
  inputs keep no graph) cost their forward only, and depths that λ ≡ 0 leaves untrained run without
  grad and cost theirs. Under ``detached`` and ``frozen`` the depth heads cost x2: their weight enters
  the depth losses detached (input gradient, no weight gradient). Modules in eval mode are not counted.
- **Causal convention:** with ``causal_half=True`` (default; Megatron-LM's
  ``num_floating_point_operations`` and the PaLM MFU convention) ``Q K^T`` and ``A V`` count half of the
  full ``s x s`` products; ``causal_half=False`` counts the full products a dense masked softmax runs.
- The head FLOPs use the padded vocabulary (what the matmul runs); the embedding lookups, norms,
  softmax and activations are not counted (flops.py conventions).

The seed's ``6·N_active·T`` is reported next to F: ``N_active`` = matmul weights a token touches in the
trunk + main head (balanced top-k routing, padded vocabulary), T = main-head tokens of the training
forwards (a frozen trunk's too: 6NT stays the joint step's estimate, for comparison).

**B (bits of the targets this rank scored).** From the caller's ``MTPMetrics`` of the same window
(``reduce(metrics=...)``): B_ceiling = valid targets x log2 V (main and each depth), B_effective = loss
sums / ln 2, V = ``model_cfg.vocab_size`` (the tokenizer's, not the padded table). Every tensor-parallel
rank of the last stage holds the same loss sums; only tensor-parallel rank 0 contributes them.

No process-global state: the meter, its hooks and its tallies belong to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_plugin.accounting.flops import (
    AttentionShape,
    LayerShape,
    MLAShape,
    MLPShape,
    ModelShape,
    MoEShape,
    attention_projection_flops,
    attention_score_flops,
    linear_flops,
    mla_projection_flops,
    mlp_flops,
    model_forward_flops,
    output_head_flops,
)
from mtp_plugin.accounting.meter import WindowMeter, forward_cost

__all__ = ["RhoMeter", "n_active_from_config"]


def _tensor_arg(args: tuple, kwargs: dict, index: int, name: str) -> torch.Tensor:
    if len(args) > index:
        return args[index]
    if name in kwargs:
        return kwargs[name]
    raise ValueError(f"RhoMeter: cannot find argument {name!r} of a hooked Megatron module")


def _tokens(x: torch.Tensor) -> int:
    """Rows of a [..., hidden] activation (s*b for [s, b, h])."""
    return x.numel() // x.shape[-1] if x.dim() else 0


def _moe_layer_count(config) -> int:
    if not config.num_moe_experts:
        return 0
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return sum(1 for i in range(config.num_layers) if i % freq == 0)
    return sum(int(f) for f in freq)


def _attention_shape(config) -> AttentionShape | MLAShape:
    if getattr(config, "multi_latent_attention", False):
        return MLAShape(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=config.kv_lora_rank,
            qk_nope_head_dim=config.qk_head_dim,
            qk_rope_head_dim=config.qk_pos_emb_head_dim,
            v_head_dim=config.v_head_dim,
        )
    return AttentionShape(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.kv_channels,
        num_query_groups=config.num_query_groups,
    )


def _moe_shape(config) -> MoEShape:
    shared = config.moe_shared_expert_intermediate_size
    return MoEShape(
        hidden_size=config.hidden_size,
        num_experts=config.num_moe_experts,
        top_k=config.moe_router_topk,
        expert_ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
        num_shared_experts=1 if shared else 0,
        shared_expert_ffn_hidden_size=shared or None,
        gated=config.gated_linear_unit,
    )


def n_active_from_config(config, vocab_size: int) -> float:
    """The seed's N: matmul weights one token touches in the trunk + main head (top-k of the experts)."""
    attention = _attention_shape(config)
    dense = LayerShape(
        attention=attention,
        mlp=MLPShape(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size,
            gated=config.gated_linear_unit,
        ),
    )
    num_moe = _moe_layer_count(config)
    layer = LayerShape(attention=attention, mlp=_moe_shape(config)) if num_moe else dense
    shape = ModelShape(
        name="megatron",
        num_layers=config.num_layers,
        vocab_size=vocab_size,
        seq_length=1,
        layer=layer,
        num_dense_layers=config.num_layers - num_moe if num_moe else 0,
        dense_layer=dense if num_moe else None,
    )
    return model_forward_flops(shape, num_tokens=1, include_scores=False).trunk / 2


@dataclass
class _ExpertSlot:
    """Token counts of one experts module (one MoE layer's local experts), kept where Megatron has them."""

    name: str
    flops_per_token: float  # forward FLOPs of one routed token on this rank (÷ expert TP)
    first_expert: int  # global index of the first local expert
    pending_weighted: torch.Tensor | None = None  # Σ multiplier x tokens_per_expert (this step)
    pending_trained: torch.Tensor | None = None  # Σ tokens_per_expert of differentiated forwards
    window_weighted: torch.Tensor | None = None
    window_trained: torch.Tensor | None = None

    def add(self, tokens_per_expert, multiplier: int) -> None:
        tpe = tokens_per_expert
        if not torch.is_tensor(tpe):
            tpe = torch.as_tensor(list(tpe), dtype=torch.long)
        tpe = tpe.detach().to(torch.long)
        if self.pending_weighted is None:
            self.pending_weighted = torch.zeros_like(tpe)
            self.pending_trained = torch.zeros_like(tpe)
            self.window_weighted = torch.zeros_like(tpe)
            self.window_trained = torch.zeros_like(tpe)
        tpe = tpe.to(self.pending_weighted.device, non_blocking=True)
        self.pending_weighted.add_(tpe, alpha=multiplier)
        if multiplier == 3:
            self.pending_trained.add_(tpe)

    def end_step(self) -> None:
        if self.pending_weighted is not None:
            self.window_weighted.add_(self.pending_weighted)
            self.window_trained.add_(self.pending_trained)
            self.pending_weighted.zero_()
            self.pending_trained.zero_()

    def reset(self) -> None:
        for t in (self.pending_weighted, self.pending_trained, self.window_weighted, self.window_trained):
            if t is not None:
                t.zero_()


class RhoMeter(WindowMeter):
    """Per-rank F and B for ρ; the caller owns it (see the module docstring for what is counted).

    model_cfg: the plugin's ``ModelConfig`` (``vocab_size`` = V of B_ceiling, the tokenizer's).
    mtp_cfg: the plugin's ``MTPConfig`` (``num_depths`` log fields).
    parallel_cfg: optional ``ParallelConfig``; its tensor-parallel size is checked against the model's.
    peak_tflops: per-device peak for MFU (e.g. 989 for H100 SXM dense BF16); None leaves MFU out.
    causal_half: count causal attention scores as half the full products (Megatron's convention).
    """

    def __init__(
        self,
        model_cfg,
        mtp_cfg,
        parallel_cfg=None,
        *,
        peak_tflops: float | None = None,
        causal_half: bool = True,
    ) -> None:
        super().__init__(
            num_depths=int(mtp_cfg.num_depths) if mtp_cfg is not None else 0,
            vocab_size=model_cfg.vocab_size,
            peak_tflops=peak_tflops,
        )
        self.parallel_cfg = parallel_cfg
        self.causal_half = causal_half
        self._experts: list[_ExpertSlot] = []

    # ---------------------------------------------------------------------------------------------
    # Hooks.

    def attach(self, model_chunks) -> RhoMeter:
        """Register forward hooks on every GPTModel found in ``model_chunks`` (wrapped or not)."""
        from megatron.core.models.gpt import GPTModel

        if self._handles:
            raise RuntimeError("RhoMeter.attach: already attached; call detach() first")
        chunks = model_chunks if isinstance(model_chunks, list | tuple) else [model_chunks]
        models = [m for chunk in chunks for m in chunk.modules() if isinstance(m, GPTModel)]
        if not models:
            raise ValueError("RhoMeter.attach: no megatron GPTModel in the given model chunks")
        self._experts = []
        for model in models:
            self._attach_model(model)
        self.reset()
        return self

    def _hook(self, module: torch.nn.Module, fn) -> None:
        """``fn(args, kwargs, output, multiplier)`` after each counted forward of ``module``."""

        def hook(mod, args, kwargs, output):
            if not mod.training:
                return
            fn(args, kwargs, output, forward_cost(output))

        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _attach_model(self, model) -> None:
        from megatron.core.transformer.mlp import MLP
        from megatron.core.transformer.moe.moe_layer import MoELayer
        from megatron.core.transformer.transformer_layer import TransformerLayer

        from mtp_plugin.megatron.model import MTPGPTModel, MTPProjection

        config = model.config
        tp_group = getattr(getattr(model, "pg_collection", None), "tp", None)
        tp = tp_group.size() if tp_group is not None else config.tensor_model_parallel_size
        self._scores_bits = tp_group is None or tp_group.rank() == 0
        if self.parallel_cfg is not None and self.parallel_cfg.tensor_model_parallel_size != tp:
            raise ValueError(
                f"RhoMeter: parallel_cfg.tensor_model_parallel_size={self.parallel_cfg.tensor_model_parallel_size} "
                f"but the model is split {tp}-way; pass the ParallelConfig the model was built with"
            )
        sp = tp if config.sequence_parallel else 1
        h = config.hidden_size
        padded_vocab = model.vocab_size
        self._n_active = n_active_from_config(config, padded_vocab)
        attention = _attention_shape(config)
        projection_flops = (
            mla_projection_flops if isinstance(attention, MLAShape) else attention_projection_flops
        )
        causal_half = self.causal_half
        add = self.tally.add

        def on_attention(args, kwargs, out, mult):
            tokens = _tokens(_tensor_arg(args, kwargs, 0, "hidden_states")) * sp
            add("attention_projections", mult * projection_flops(attention, tokens) / tp)

        def on_scores(args, kwargs, out, mult):
            query = _tensor_arg(args, kwargs, 0, "query")
            key = _tensor_arg(args, kwargs, 1, "key")
            if query.dim() != 4:
                raise NotImplementedError(
                    "RhoMeter counts attention scores for [s, b, heads, d] inputs; packed (THD) sequences "
                    "are not supported"
                )
            tokens, seq = query.shape[0] * query.shape[1], key.shape[0]
            flops = attention_score_flops(
                attention, num_tokens=tokens, seq_length=seq, causal_half=causal_half
            )
            add("attention_scores", mult * flops / tp)

        def dense_mlp(category: str, ffn: int):
            shape = MLPShape(hidden_size=h, ffn_hidden_size=ffn, gated=config.gated_linear_unit)

            def on_mlp(args, kwargs, out, mult):
                tokens = _tokens(_tensor_arg(args, kwargs, 0, "hidden_states")) * sp
                add(category, mult * mlp_flops(shape, tokens) / tp)

            return on_mlp

        for name, module in model.named_modules():
            if isinstance(module, TransformerLayer):
                self._hook(module.self_attention, on_attention)
                self._hook(module.self_attention.core_attention, on_scores)
                mlp = module.mlp
                if isinstance(mlp, MoELayer):
                    self._attach_moe(f"{name}.mlp", mlp, sp, tp)
                elif isinstance(mlp, MLP):
                    self._hook(mlp, dense_mlp("mlp", mlp.config.ffn_hidden_size))
            elif isinstance(module, MTPProjection):

                def on_proj(args, kwargs, out, mult):
                    tokens = _tokens(_tensor_arg(args, kwargs, 0, "x")) * sp
                    add("mtp_projections", mult * linear_flops(tokens, 2 * h, h) / tp)

                self._hook(module, on_proj)

        if model.post_process:
            tp_rank0 = self._scores_bits

            def count_head(tokens: int, mult: int) -> None:
                add(
                    "head",
                    mult * output_head_flops(hidden_size=h, vocab_size=padded_vocab, num_tokens=tokens) / tp,
                )
                if torch.is_grad_enabled() and tp_rank0:
                    self.tally.pending_tokens += tokens

            def on_head(args, kwargs, out, mult):
                count_head(_tokens(_tensor_arg(args, kwargs, 0, "input_")) * sp, mult)

            self._hook(model.output_layer, on_head)

            if isinstance(model, MTPGPTModel) and model.num_mtp_depths:

                def on_model(args, kwargs, out, mult):
                    if not (isinstance(out, tuple) and len(out) == 3):
                        return  # logits (no labels): no depth heads ran
                    main_loss_bs, depth_sums, _ = out
                    if model.loss_chunk_tokens > 0:
                        # The chunked path scores the main head too, without calling output_layer.
                        count_head(main_loss_bs.numel(), forward_cost(main_loss_bs))
                    flops = output_head_flops(
                        hidden_size=h, vocab_size=padded_vocab, num_tokens=main_loss_bs.numel()
                    )
                    # The depths' own cost: a frozen trunk's main loss needs no backward, the depths' may.
                    mult = forward_cost(depth_sums)
                    if mult == 3 and model.trunk_gradients != "joint":
                        # detached / frozen: the head weight enters the depth losses detached, so their
                        # backward computes the input gradient only (one matmul, no weight gradient).
                        mult = 2
                    add("mtp_heads", mult * depth_sums.shape[0] * flops / tp)

                self._hook(model, on_model)

    def _attach_moe(self, name: str, moe, sp: int, tp: int) -> None:
        config = moe.config
        shape = _moe_shape(config)
        add = self.tally.add

        def on_router(args, kwargs, out, mult):
            tokens = _tokens(_tensor_arg(args, kwargs, 0, "input"))
            add("router", mult * linear_flops(tokens, shape.hidden_size, shape.num_experts))

        self._hook(moe.router, on_router)

        experts = moe.experts
        expert_tp_group = getattr(experts, "tp_group", None)
        etp = expert_tp_group.size() if expert_tp_group is not None else config.expert_tensor_parallel_size
        slot = _ExpertSlot(
            name=f"{name}.experts",
            flops_per_token=mlp_flops(shape.expert_mlp(), 1) / etp,
            first_expert=int(moe.local_expert_indices[0]),
        )
        self._experts.append(slot)
        self._hook(
            experts,
            lambda args, kwargs, out, mult: slot.add(_tensor_arg(args, kwargs, 1, "tokens_per_expert"), mult),
        )

        if getattr(moe, "shared_experts", None) is not None:
            shared = shape.shared_mlp()

            # Hooked on its fc2 (a RowParallelLinear, whose input holds every token of the sequence even
            # under sequence parallelism): with shared_expert_overlap the dispatcher runs the shared
            # expert's parts without calling the SharedExpertMLP module itself.
            def on_shared(args, kwargs, out, mult):
                tokens = _tokens(_tensor_arg(args, kwargs, 0, "input_"))
                add("shared_experts", mult * mlp_flops(shared, tokens) / tp)

            self._hook(moe.shared_experts.linear_fc2, on_shared)

    # ---------------------------------------------------------------------------------------------
    # Steps and windows.

    def end_step(self) -> None:
        super().end_step()
        for slot in self._experts:
            slot.end_step()

    def reset(self) -> None:
        super().reset()
        for slot in self._experts:
            slot.reset()

    def _expert_window(self) -> tuple[float, list[list[int]]]:
        """(expert FLOPs of the window, trained tokens per local expert per slot): one device read."""
        slots = [s for s in self._experts if s.window_weighted is not None]
        if not slots:
            return 0.0, [[] for _ in self._experts]
        weighted = torch.stack([s.window_weighted.sum() for s in slots]).cpu().tolist()
        trained = torch.cat([s.window_trained for s in slots]).cpu().tolist()
        flops = sum(w * s.flops_per_token for w, s in zip(weighted, slots))
        per_slot, pos = {}, 0
        for s in slots:
            n = s.window_trained.numel()
            per_slot[id(s)] = trained[pos : pos + n]
            pos += n
        return flops, [per_slot.get(id(s), []) for s in self._experts]

    def _extra_flops(self) -> dict[str, float]:
        expert_flops, _ = self._expert_window()
        return {"experts": expert_flops}

    def expert_tokens(self) -> dict[str, dict[int, int]]:
        """Trained tokens the router sent to each local expert in the window: {experts module: {global expert: n}}."""
        _, per_slot = self._expert_window()
        return {
            s.name: {s.first_expert + i: int(n) for i, n in enumerate(counts)}
            for s, counts in zip(self._experts, per_slot)
        }
