"""Model shape: the schema Hydra's `model/` group fills. Validated at construction."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    """A GPT / DeepSeek-shaped MoE decoder.

    num_experts = 0 gives a dense model; otherwise layers after the first `first_dense_layers` are MoE
    with `moe_router_topk` of `num_experts` routed experts (each `moe_ffn_hidden_size` wide) plus
    `moe_shared_expert_size` worth of always-on shared expert width (0 = none).
    `vocab_size` is the tokenizer's; the embedding table is padded to `padded_vocab_size` as Megatron
    pads it (`make_vocab_size_divisible_by`).
    `hidden_dropout` / `attention_dropout` default to 0.0, not Megatron-LM's 0.1: DeepSeek-V3 pretrains
    without dropout (its Hugging Face config: attention_dropout 0.0). Set them for a run that wants it;
    the checkpoints save every rank's RNG states, so a resume draws the same dropout masks.
    """

    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int = 512
    seq_length: int = 128
    vocab_size: int = 50257
    make_vocab_size_divisible_by: int = 128
    num_experts: int = 0
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_size: int = 0
    first_dense_layers: int = 1
    moe_aux_loss_coeff: float = 0.0
    moe_token_dispatcher_type: str = "alltoall"
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    rotary_base: int = 10000
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "seq_length",
            "vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_attention_heads="
                f"{self.num_attention_heads}"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                f"model.num_query_groups={groups}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_experts < 0:
            raise ValueError(f"model.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.moe_router_topk <= self.num_experts:
                raise ValueError(
                    f"model.moe_router_topk={self.moe_router_topk} must be in [1, num_experts={self.num_experts}]"
                )
            if not 0 <= self.first_dense_layers < self.num_layers:
                raise ValueError(
                    f"model.first_dense_layers={self.first_dense_layers} must be in [0, num_layers={self.num_layers}) "
                    "so that at least one layer is MoE; set num_experts=0 for a dense model"
                )
            if self.moe_token_dispatcher_type not in ("alltoall", "allgather"):
                raise ValueError(
                    f"model.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}; use alltoall or allgather"
                )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m
