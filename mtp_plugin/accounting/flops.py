"""Analytic matmul FLOPs of the modules an MTP training step runs, as pure functions of shapes.

Conventions (DESIGN.md §3):

- A matmul ``(m x k) @ (k x n)`` costs ``2*m*k*n`` FLOPs (one multiply + one add), the same count as
  ``torch.utils.flop_counter.FlopCounterMode``. Only matmuls are counted: norms, softmax, activations,
  residual adds, rotary embeddings and embedding lookups are ignored (they are O(h) per token, the
  matmuls O(h^2)).
- Every ``*_flops`` function returns **forward** FLOPs for ``num_tokens`` tokens. Training cost is
  ``training_flops(forward, recomputed_forward=...)``: x3 for forward + backward (the backward of a
  matmul is two matmuls of the same size: activation gradient and weight gradient), plus one more
  forward for whatever is recomputed (activation checkpointing).
- **Causal attention scores:** with ``causal_half=True`` the ``Q K^T`` and ``A V`` products are counted
  as half of the full ``T x T`` products, ``T^2/2`` per head (not ``T(T+1)/2``): the convention of
  Megatron-LM's ``num_floating_point_operations`` and of the PaLM/Chinchilla MFU formulas for causal
  kernels that skip masked tiles. With ``causal_half=False`` the full ``T x T`` products are counted,
  which is what a dense ``softmax(QK^T) V`` with a mask (and ``FlopCounterMode``) executes.
- A token here is one position of one sequence; attention scores additionally need the sequence
  length, because each query attends to ``seq_length`` (or ``seq_length / 2``) keys.

The seed text's ``6*N*T`` is ``seed_flops``; it counts weights only (no attention scores).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "AttentionShape",
    "MLAShape",
    "MLPShape",
    "MoEShape",
    "LayerShape",
    "ModelShape",
    "linear_flops",
    "attention_projection_flops",
    "mla_projection_flops",
    "attention_score_flops",
    "mlp_flops",
    "moe_flops",
    "transformer_layer_flops",
    "output_head_flops",
    "mtp_depth_flops",
    "model_forward_flops",
    "training_flops",
    "seed_flops",
]


def _require_positive(owner: str, **fields: int | None) -> None:
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{owner}.{name} must be a positive int, got {value!r}; set it to the model's size"
            )


@dataclass(frozen=True, kw_only=True)
class AttentionShape:
    """Multi-head attention with grouped-query K/V (Megatron's ``num_query_groups``).

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` (Megatron's ``kv_channels``);
    ``num_query_groups`` defaults to ``num_attention_heads`` (plain MHA).
    """

    hidden_size: int
    num_attention_heads: int
    head_dim: int | None = None
    num_query_groups: int | None = None

    def __post_init__(self) -> None:
        _require_positive(
            "AttentionShape",
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            num_query_groups=self.num_query_groups,
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"AttentionShape: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; pass head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"AttentionShape: num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_query_groups {self.num_query_groups}; pick a divisor of the head count"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.head_dim


@dataclass(frozen=True, kw_only=True)
class MLAShape:
    """DeepSeek-V2/V3 multi-head latent attention (Hugging Face ``DeepseekV3Attention`` layout).

    Projections: ``q_a_proj h->q_lora_rank``, ``q_b_proj q_lora_rank->heads*(nope+rope)`` (or one
    ``q_proj h->heads*(nope+rope)`` when ``q_lora_rank`` is None), ``kv_a_proj_with_mqa
    h->kv_lora_rank+rope``, ``kv_b_proj kv_lora_rank->heads*(nope+v)``, ``o_proj heads*v->h``.
    Counted as the training-time (non-absorbed) computation.
    """

    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        _require_positive(
            "MLAShape",
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True)
class MLPShape:
    """Dense MLP. ``gated=True`` is SwiGLU (gate and up ``h->ffn``, down ``ffn->h``: 3 matrices);
    ``gated=False`` is ``h->ffn->h`` (2 matrices)."""

    hidden_size: int
    ffn_hidden_size: int
    gated: bool = True

    def __post_init__(self) -> None:
        _require_positive("MLPShape", hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size)


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """Routed experts (top-k of ``num_experts``) plus always-on shared experts, DeepSeek-MoE style.

    ``shared_expert_ffn_hidden_size`` is the ffn size of *one* shared expert and defaults to
    ``expert_ffn_hidden_size`` (DeepSeek-V3: 1 shared expert of 2048).
    """

    hidden_size: int
    num_experts: int
    top_k: int
    expert_ffn_hidden_size: int
    num_shared_experts: int = 0
    shared_expert_ffn_hidden_size: int | None = None
    gated: bool = True

    def __post_init__(self) -> None:
        _require_positive(
            "MoEShape",
            hidden_size=self.hidden_size,
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_ffn_hidden_size=self.expert_ffn_hidden_size,
            shared_expert_ffn_hidden_size=self.shared_expert_ffn_hidden_size,
        )
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(
                f"MoEShape.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEShape.top_k {self.top_k} exceeds num_experts {self.num_experts}; lower top_k"
            )
        if self.shared_expert_ffn_hidden_size is None:
            object.__setattr__(self, "shared_expert_ffn_hidden_size", self.expert_ffn_hidden_size)

    def expert_mlp(self) -> MLPShape:
        return MLPShape(
            hidden_size=self.hidden_size, ffn_hidden_size=self.expert_ffn_hidden_size, gated=self.gated
        )

    def shared_mlp(self) -> MLPShape:
        return MLPShape(
            hidden_size=self.hidden_size, ffn_hidden_size=self.shared_expert_ffn_hidden_size, gated=self.gated
        )


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """One transformer layer: attention then MLP or MoE (also the block of an MTP depth)."""

    attention: AttentionShape | MLAShape
    mlp: MLPShape | MoEShape

    def __post_init__(self) -> None:
        if not isinstance(self.attention, AttentionShape | MLAShape):
            raise ValueError(
                f"LayerShape.attention must be AttentionShape or MLAShape, got {self.attention!r}"
            )
        if not isinstance(self.mlp, MLPShape | MoEShape):
            raise ValueError(f"LayerShape.mlp must be MLPShape or MoEShape, got {self.mlp!r}")
        if self.attention.hidden_size != self.mlp.hidden_size:
            raise ValueError(
                f"LayerShape: attention.hidden_size {self.attention.hidden_size} != mlp.hidden_size "
                f"{self.mlp.hidden_size}; both must be the model's hidden size"
            )

    @property
    def hidden_size(self) -> int:
        return self.attention.hidden_size


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder-only trunk: ``num_dense_layers`` layers of ``dense_layer`` first, then the rest of
    ``num_layers`` as ``layer`` (DeepSeek-V3: 3 dense, then 58 MoE), then the output head.

    ``mtp_layer`` is the block inside each MTP depth; it defaults to ``layer`` (Megatron builds the
    MTP block from the trunk's layer spec, so it is MoE when the trunk is).
    """

    name: str
    num_layers: int
    vocab_size: int
    seq_length: int
    layer: LayerShape
    num_dense_layers: int = 0
    dense_layer: LayerShape | None = None
    mtp_layer: LayerShape | None = None

    def __post_init__(self) -> None:
        _require_positive(
            "ModelShape", num_layers=self.num_layers, vocab_size=self.vocab_size, seq_length=self.seq_length
        )
        if not 0 <= self.num_dense_layers <= self.num_layers:
            raise ValueError(
                f"ModelShape.num_dense_layers must be in [0, num_layers={self.num_layers}], "
                f"got {self.num_dense_layers}"
            )
        if self.num_dense_layers and self.dense_layer is None:
            raise ValueError("ModelShape: num_dense_layers > 0 needs dense_layer; pass its LayerShape")
        if self.mtp_layer is None:
            object.__setattr__(self, "mtp_layer", self.layer)
        for other in (self.dense_layer, self.mtp_layer):
            if other is not None and other.hidden_size != self.layer.hidden_size:
                raise ValueError("ModelShape: dense_layer / mtp_layer must share layer's hidden_size")

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size


def linear_flops(num_tokens: int, in_features: int, out_features: int) -> int:
    """``x_nk @ W_km``: ``2 * num_tokens * in_features * out_features``."""
    return 2 * num_tokens * in_features * out_features


def attention_projection_flops(shape: AttentionShape, num_tokens: int) -> int:
    """Q (``h -> heads*d``), K and V (``h -> groups*d`` each, GQA) and output (``heads*d -> h``)."""
    h, d = shape.hidden_size, shape.head_dim
    q_width = shape.num_attention_heads * d
    kv_width = shape.num_query_groups * d
    return (
        linear_flops(num_tokens, h, q_width)
        + 2 * linear_flops(num_tokens, h, kv_width)
        + linear_flops(num_tokens, q_width, h)
    )


def mla_projection_flops(shape: MLAShape, num_tokens: int) -> int:
    """The five MLA projections (see ``MLAShape``), non-absorbed as in training."""
    h, heads = shape.hidden_size, shape.num_attention_heads
    q_width = heads * shape.qk_head_dim
    if shape.q_lora_rank is None:
        q = linear_flops(num_tokens, h, q_width)
    else:
        q = linear_flops(num_tokens, h, shape.q_lora_rank) + linear_flops(
            num_tokens, shape.q_lora_rank, q_width
        )
    kv_a = linear_flops(num_tokens, h, shape.kv_lora_rank + shape.qk_rope_head_dim)
    kv_b = linear_flops(num_tokens, shape.kv_lora_rank, heads * (shape.qk_nope_head_dim + shape.v_head_dim))
    out = linear_flops(num_tokens, heads * shape.v_head_dim, h)
    return q + kv_a + kv_b + out


def attention_score_flops(
    shape: AttentionShape | MLAShape, *, num_tokens: int, seq_length: int, causal_half: bool
) -> int:
    """``Q K^T`` and ``A V`` for ``num_tokens`` queries in sequences of ``seq_length``.

    Per query and head: ``2*seq*d_qk + 2*seq*d_v``; halved when ``causal_half`` (module docstring).
    K/V heads are broadcast to all query heads under GQA, so the count uses ``num_attention_heads``.
    """
    per_query = 2 * seq_length * shape.num_attention_heads * (shape.qk_head_dim + shape.v_head_dim)
    full = num_tokens * per_query
    return full // 2 if causal_half else full


def mlp_flops(shape: MLPShape, num_tokens: int) -> int:
    """Dense MLP: ``(3 if gated else 2) * 2 * h * ffn`` per token."""
    num_matrices = 3 if shape.gated else 2
    return num_matrices * linear_flops(num_tokens, shape.hidden_size, shape.ffn_hidden_size)


def moe_flops(shape: MoEShape, *, num_tokens: int, tokens_per_expert: Iterable[int] | None = None) -> int:
    """Router ``h -> num_experts`` on every token, each routed expert's MLP on the tokens it received,
    and the shared experts on every token.

    ``tokens_per_expert`` is what the router actually did (length ``num_experts``, or only the local
    experts of an expert-parallel rank); ``None`` assumes no token was dropped, i.e.
    ``num_tokens * top_k`` expert-token pairs. Expert FLOPs are linear in tokens, so only the sum
    matters for the total; the vector is taken so a per-rank meter can pass its local slice.
    """
    if tokens_per_expert is None:
        routed_tokens = num_tokens * shape.top_k
    else:
        counts = [int(c) for c in tokens_per_expert]
        if any(c < 0 for c in counts):
            raise ValueError(f"moe_flops: tokens_per_expert must be >= 0, got {counts}")
        routed_tokens = sum(counts)
    router = linear_flops(num_tokens, shape.hidden_size, shape.num_experts)
    routed = mlp_flops(shape.expert_mlp(), routed_tokens)
    shared = shape.num_shared_experts * mlp_flops(shape.shared_mlp(), num_tokens)
    return router + routed + shared


def transformer_layer_flops(
    layer: LayerShape,
    *,
    num_tokens: int,
    seq_length: int,
    causal_half: bool,
    tokens_per_expert: Iterable[int] | None = None,
) -> int:
    """Attention projections + scores + MLP or MoE of one layer."""
    if isinstance(layer.attention, MLAShape):
        proj = mla_projection_flops(layer.attention, num_tokens)
    else:
        proj = attention_projection_flops(layer.attention, num_tokens)
    scores = attention_score_flops(
        layer.attention, num_tokens=num_tokens, seq_length=seq_length, causal_half=causal_half
    )
    if isinstance(layer.mlp, MoEShape):
        mlp = moe_flops(layer.mlp, num_tokens=num_tokens, tokens_per_expert=tokens_per_expert)
    else:
        if tokens_per_expert is not None:
            raise ValueError("transformer_layer_flops: tokens_per_expert given for a dense layer; drop it")
        mlp = mlp_flops(layer.mlp, num_tokens)
    return proj + scores + mlp


def output_head_flops(*, hidden_size: int, vocab_size: int, num_tokens: int) -> int:
    """Output projection ``h -> V`` (the shared head; every MTP depth runs it once more)."""
    return linear_flops(num_tokens, hidden_size, vocab_size)


def mtp_depth_flops(
    layer: LayerShape,
    *,
    vocab_size: int,
    num_tokens: int,
    seq_length: int,
    causal_half: bool,
    tokens_per_expert: Iterable[int] | None = None,
) -> int:
    """One MTP depth (DeepSeek-V3 §2.2): ``eh_proj 2h -> h`` + a full transformer block + the head."""
    h = layer.hidden_size
    eh_proj = linear_flops(num_tokens, 2 * h, h)
    block = transformer_layer_flops(
        layer,
        num_tokens=num_tokens,
        seq_length=seq_length,
        causal_half=causal_half,
        tokens_per_expert=tokens_per_expert,
    )
    head = output_head_flops(hidden_size=h, vocab_size=vocab_size, num_tokens=num_tokens)
    return eh_proj + block + head


@dataclass(frozen=True, kw_only=True)
class ForwardFlops:
    """Forward FLOPs of a whole model for ``num_tokens`` tokens, split as a ρ report needs them."""

    trunk_layers: int
    head: int
    mtp_per_depth: int

    @property
    def trunk(self) -> int:
        """Trunk layers + the main output head (the k=1, NTP step)."""
        return self.trunk_layers + self.head

    def with_depths(self, num_mtp_depths: int) -> int:
        return self.trunk + num_mtp_depths * self.mtp_per_depth


def model_forward_flops(
    model: ModelShape, *, num_tokens: int | None = None, causal_half: bool = True, include_scores: bool = True
) -> ForwardFlops:
    """Analytic forward FLOPs of ``model`` for ``num_tokens`` (default: one sequence), balanced routing.

    ``include_scores=False`` drops the attention-score matmuls, leaving the weight matmuls only
    (``2 * N_active`` per token, the quantity ``6*N*T`` approximates).
    """
    if num_tokens is None:
        num_tokens = model.seq_length
    seq = model.seq_length

    def layer_cost(layer: LayerShape) -> int:
        cost = transformer_layer_flops(layer, num_tokens=num_tokens, seq_length=seq, causal_half=causal_half)
        if not include_scores:
            cost -= attention_score_flops(
                layer.attention, num_tokens=num_tokens, seq_length=seq, causal_half=causal_half
            )
        return cost

    num_main = model.num_layers - model.num_dense_layers
    trunk_layers = num_main * layer_cost(model.layer)
    if model.num_dense_layers:
        trunk_layers += model.num_dense_layers * layer_cost(model.dense_layer)
    h = model.hidden_size
    head = output_head_flops(hidden_size=h, vocab_size=model.vocab_size, num_tokens=num_tokens)
    mtp = linear_flops(num_tokens, 2 * h, h) + layer_cost(model.mtp_layer) + head
    return ForwardFlops(trunk_layers=trunk_layers, head=head, mtp_per_depth=mtp)


def training_flops(forward_flops: int, *, recomputed_forward_flops: int = 0) -> int:
    """Forward + backward (x3: the backward of each matmul is two matmuls of its size) plus the
    forward again of whatever is recomputed under activation checkpointing."""
    if forward_flops < 0 or recomputed_forward_flops < 0:
        raise ValueError("training_flops: FLOP counts must be >= 0")
    if recomputed_forward_flops > forward_flops:
        raise ValueError(
            f"training_flops: recomputed_forward_flops {recomputed_forward_flops} exceeds the forward "
            f"{forward_flops}; only part of the forward can be recomputed"
        )
    return 3 * forward_flops + recomputed_forward_flops


def seed_flops(n_active: float, tokens: float) -> float:
    """The seed text's ``F = 6 * N * T`` (2 forward + 4 backward FLOPs per parameter per token)."""
    return 6 * n_active * tokens
