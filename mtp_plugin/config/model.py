"""Model shape: the schema Hydra's `model/` group fills. Validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from mtp_plugin.config.checks import check_finite


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

    Every field below maps one to one onto a Megatron-Core `TransformerConfig` / `MLATransformerConfig`
    field of the same name (mtp_plugin.megatron.config.transformer_config_from), so Megatron's own
    modules do the work; the MTP depths are built from the trunk's last-layer spec, so an MLA trunk gets
    MLA MTP blocks.

    Attention. `multi_latent_attention` selects DeepSeek-V2/V3 MLA (Megatron's MLASelfAttention):
      q_lora_rank: rank of the query's low-rank projection (None: one full q projection, as V2-Lite);
      kv_lora_rank: rank of the joint K/V latent; qk_head_dim / qk_pos_emb_head_dim: the per-head
      no-RoPE and RoPE parts of q and k (HF `qk_nope_head_dim` / `qk_rope_head_dim`); v_head_dim.
      qk_layernorm: MLA's latent norms (HF q_a_layernorm / kv_a_layernorm); with GQA, q/k norms.
      Off, attention is GQA with `num_query_groups` (None: plain MHA).
    RoPE. rope_type "rope" or "yarn" (YaRN, MLA only: Megatron's MLA applies its own RoPE from these
      fields): rotary_scaling_factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
      mscale_all_dim. mscale and mscale_all_dim also set MLA's softmax scale; Megatron's config and CLI
      defaults differ from the Hugging Face checkpoints (DeepSeek-V3: 40, 4096, 32, 1, 1.0, 1.0).
    Routing. moe_router_score_function "softmax" or "sigmoid" (DeepSeek-V3); moe_router_pre_softmax:
      softmax over all experts before the top-k, unnormalised (DeepSeek-V2); with
      moe_router_enable_expert_bias the auxiliary-loss-free balancing bias (only selects experts; it is
      updated by `finalize_model_grads` after each global batch at moe_router_bias_update_rate);
      moe_router_num_groups / moe_router_group_topk: node-limited routing (experts split into groups, a
      token's experts from at most group_topk groups); moe_router_topk_scaling_factor scales the routed
      weights (V3: 2.5); moe_router_load_balancing_type "aux_loss" | "seq_aux_loss" (V3's sequence-wise
      loss) | "global_aux_loss" | "none", weighted by moe_aux_loss_coeff (None: "aux_loss" when the
      coefficient is > 0, else "none"); moe_router_dtype "fp32" routes in fp32 (None: the params' dtype).
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
    # Multi-head latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    qk_layernorm: bool = False
    # RoPE extension (YaRN); used by MLA.
    rope_type: str = "rope"
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Routing (DeepSeek-V3: sigmoid scores, bias balancing, node-limited groups, scaled weights).
    moe_router_score_function: str = "softmax"
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    moe_router_topk_scaling_factor: float | None = None
    moe_router_load_balancing_type: str | None = None
    moe_router_dtype: str | None = None

    def __post_init__(self) -> None:
        check_finite(self, "model")
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
        if self.multi_latent_attention:
            self._check_mla()
        elif self.rope_type != "rope":
            raise ValueError(
                f"model.rope_type={self.rope_type!r} needs model.multi_latent_attention=true (Megatron applies "
                "YaRN inside MLA); set model.rope_type=rope"
            )
        elif self.hidden_size % self.num_attention_heads:
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
            self._check_routing()

    def _check_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"model.{name} must be >= 1 with multi_latent_attention, got {getattr(self, name)}"
                )
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(
                f"model.q_lora_rank must be >= 1 or null (no query LoRA), got {self.q_lora_rank}"
            )
        if self.qk_pos_emb_head_dim % 2:
            raise ValueError(
                f"model.qk_pos_emb_head_dim={self.qk_pos_emb_head_dim} must be even (RoPE rotates pairs of "
                "channels); DeepSeek-V3 uses 64"
            )
        # The latents compress the hidden state; wider than it they hold nothing the heads could not.
        for name in ("q_lora_rank", "kv_lora_rank"):
            rank = getattr(self, name)
            if rank is not None and rank > self.hidden_size:
                raise ValueError(
                    f"model.{name}={rank} exceeds model.hidden_size={self.hidden_size}: a low-rank latent must be "
                    f"narrower than the hidden state; lower model.{name}"
                )
        if self.kv_lora_rank > self.num_attention_heads * (self.qk_head_dim + self.v_head_dim):
            raise ValueError(
                f"model.kv_lora_rank={self.kv_lora_rank} is wider than the heads it expands to "
                f"(num_attention_heads x (qk_head_dim + v_head_dim) = "
                f"{self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)}); lower model.kv_lora_rank"
            )
        if self.num_query_groups not in (None, self.num_attention_heads):
            raise ValueError(
                f"model.num_query_groups={self.num_query_groups} has no meaning with multi_latent_attention "
                "(every head reads the shared latent); set it to null"
            )
        if self.rope_type not in ("rope", "yarn"):
            raise ValueError(f"model.rope_type={self.rope_type!r}; use rope or yarn")
        if self.rope_type == "yarn" and self.rotary_scaling_factor < 1:
            raise ValueError(
                f"model.rotary_scaling_factor={self.rotary_scaling_factor} must be >= 1 for YaRN "
                "(DeepSeek-V3: 40)"
            )

    def _check_routing(self) -> None:
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ValueError(
                f"model.moe_router_score_function={self.moe_router_score_function!r}; use softmax or sigmoid"
            )
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError(
                "model.moe_router_enable_expert_bias needs model.moe_router_score_function=sigmoid "
                "(Megatron's aux-loss-free balancing); set one of them"
            )
        if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
            raise ValueError(
                "model.moe_router_num_groups and model.moe_router_group_topk go together (node-limited "
                "routing); set both or neither"
            )
        if self.moe_router_num_groups is not None:
            groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
            if groups < 1 or self.num_experts % groups:
                raise ValueError(
                    f"model.moe_router_num_groups={groups} must divide model.num_experts={self.num_experts}"
                )
            if not 1 <= group_topk <= groups:
                raise ValueError(
                    f"model.moe_router_group_topk={group_topk} must be in [1, moe_router_num_groups={groups}]"
                )
            if (
                self.moe_router_topk % group_topk
                or self.moe_router_topk // group_topk > self.num_experts // groups
            ):
                raise ValueError(
                    f"model.moe_router_topk={self.moe_router_topk} must be a multiple of moe_router_group_topk="
                    f"{group_topk} with at most {self.num_experts // groups} experts per group (Megatron scores a "
                    "group by its top topk/group_topk experts); change one of them"
                )
        balancing = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
        if self.moe_router_load_balancing_type not in (None, *balancing):
            raise ValueError(
                f"model.moe_router_load_balancing_type={self.moe_router_load_balancing_type!r}; use one of "
                f"{balancing} or null"
            )
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            raise ValueError(f"model.moe_router_dtype={self.moe_router_dtype!r}; use fp32, fp64 or null")
        if (
            self.moe_router_topk == 1
            and self.moe_router_score_function == "softmax"
            and not self.moe_router_pre_softmax
        ):
            raise ValueError(
                "model.moe_router_topk=1 with softmax over the chosen expert has a zero router gradient; set "
                "model.moe_router_pre_softmax=true, moe_router_topk >= 2 or moe_router_score_function=sigmoid"
            )

    @property
    def load_balancing_type(self) -> str:
        """Megatron's moe_router_load_balancing_type: the field, else aux_loss when its coefficient is set."""
        if self.moe_router_load_balancing_type is not None:
            return self.moe_router_load_balancing_type
        return "aux_loss" if self.moe_aux_loss_coeff > 0 else "none"

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
