"""The GPT parts of the DeepSpeed model, in plain PyTorch plus DeepSpeed's MoE layer.

The shape follows the Megatron path's TransformerConfig (`mtp_plugin.megatron.config.transformer_config_from`):
pre-norm RMSNorm (eps 1e-6), causal self-attention with grouped-query heads and rotary embeddings
(Megatron's non-interleaved rotate-half form, rotary_percent 1), SwiGLU MLPs without biases, MoE layers
after `first_dense_layers`, each routed MLP a SwiGLU expert of `moe_ffn_hidden_size`.

MoE is `deepspeed.moe.layer.MoE` (softmax top-k gate, DeepSpeed's load-balancing aux loss, experts sharded
over the expert-parallel group by all-to-all). A shared expert is an always-on SwiGLU MLP whose output is
added to the routed one (DeepSeek-V3 / Megatron's SharedExpertMLP), not DeepSpeed's `use_residual`
(Residual MoE mixes the two with a learned softmax coefficient, a different model).

Shapes: b = batch, s = sequence, h = hidden, n = heads, g = key/value groups, d = head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6  # the Megatron path's layernorm_epsilon


@dataclass(frozen=True, kw_only=True)
class MoESettings:
    """How DeepSpeed's gate routes: `capacity_factor` 0 is dropless (every token reaches its k experts, as
    Megatron's default MoE), > 0 drops tokens past `capacity_factor * k * tokens / experts` per expert."""

    num_experts: int
    topk: int
    ffn_hidden_size: int
    shared_expert_size: int
    ep_size: int
    capacity_factor: float
    min_capacity: int


def _init_normal(module: nn.Module, std: float) -> None:
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.normal_(param, mean=0.0, std=std)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down; fc1 holds [gate; up] as Megatron's gated linear_fc1 does."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, *, std: float, out_std: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * ffn_hidden_size, bias=False)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        nn.init.normal_(self.fc1.weight, std=std)
        nn.init.normal_(self.fc2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * up)


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, ...]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs_sd = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb_sd = torch.cat([freqs_sd, freqs_sd], dim=-1)
    return emb_sd.cos().to(dtype), emb_sd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class SelfAttention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_groups: int,
        *,
        rotary_base: float,
        std: float,
        out_std: float,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_groups = num_heads, num_groups
        self.head_dim = hidden_size // num_heads
        self.rotary_base = rotary_base
        self.qkv = nn.Linear(hidden_size, (num_heads + 2 * num_groups) * self.head_dim, bias=False)
        self.proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        nn.init.normal_(self.qkv.weight, std=std)
        nn.init.normal_(self.proj.weight, std=out_std)

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_bsh.shape
        d, n, g = self.head_dim, self.num_heads, self.num_groups
        q, k, v = self.qkv(x_bsh).split([n * d, g * d, g * d], dim=-1)
        q_bnsd = q.view(b, s, n, d).transpose(1, 2)
        k_bgsd = k.view(b, s, g, d).transpose(1, 2)
        v_bgsd = v.view(b, s, g, d).transpose(1, 2)
        cos_sd, sin_sd = rotary_cos_sin(s, d, self.rotary_base, x_bsh.device, x_bsh.dtype)
        q_bnsd = q_bnsd * cos_sd + _rotate_half(q_bnsd) * sin_sd
        k_bgsd = k_bgsd * cos_sd + _rotate_half(k_bgsd) * sin_sd
        if g != n:
            k_bgsd = k_bgsd.repeat_interleave(n // g, dim=1)
            v_bgsd = v_bgsd.repeat_interleave(n // g, dim=1)
        out_bnsd = F.scaled_dot_product_attention(q_bnsd, k_bgsd, v_bgsd, is_causal=True)
        return self.proj(out_bnsd.transpose(1, 2).reshape(b, s, n * d))


class MoEMLP(nn.Module):
    """DeepSpeed's MoE layer (+ a shared expert when configured); returns (output, DeepSpeed's aux loss)."""

    def __init__(self, hidden_size: int, settings: MoESettings, *, std: float, out_std: float) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        expert = SwiGLU(hidden_size, settings.ffn_hidden_size, std=std, out_std=out_std)
        self.moe = MoE(
            hidden_size=hidden_size,
            expert=expert,
            num_experts=settings.num_experts,
            ep_size=settings.ep_size,
            k=settings.topk,
            capacity_factor=settings.capacity_factor or 1.0,
            eval_capacity_factor=settings.capacity_factor or 1.0,
            min_capacity=settings.min_capacity,
            drop_tokens=settings.capacity_factor > 0,
            # Deterministic routing: no random token selection, no Gumbel-sampled second expert.
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        nn.init.normal_(self.moe.deepspeed_moe.gate.wg.weight, std=std)
        # DeepSpeed deep-copies one expert module into every local expert; draw each expert's own weights,
        # seeded by its global index, so that experts differ and do not depend on the expert-parallel size.
        self._expert_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        self._std, self._out_std = std, out_std
        self.settings = settings
        self.shared = (
            SwiGLU(hidden_size, settings.shared_expert_size, std=std, out_std=out_std)
            if settings.shared_expert_size
            else None
        )

    def init_local_experts(self, ep_rank: int) -> None:
        """Give each local expert the weights of global expert `ep_rank * num_local + j`."""
        experts = self.moe.deepspeed_moe.experts.deepspeed_experts
        for j, expert in enumerate(experts):
            gen = torch.Generator().manual_seed(self._expert_seed + ep_rank * len(experts) + j)
            with torch.no_grad():
                for linear, std in ((expert.fc1, self._std), (expert.fc2, self._out_std)):
                    w = torch.randn(linear.weight.shape, generator=gen) * std
                    linear.weight.copy_(w.to(linear.weight.device, linear.weight.dtype))

    def forward(self, x_bsh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_bsh, aux, _ = self.moe(x_bsh)
        if self.shared is not None:
            out_bsh = out_bsh + self.shared(x_bsh)
        return out_bsh, aux


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer; forward returns (hidden, aux loss of its MoE gate or 0)."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_groups: int,
        ffn_hidden_size: int,
        rotary_base: float,
        std: float,
        num_layers: int,
        moe: MoESettings | None,
    ) -> None:
        super().__init__()
        # Megatron's output_layer_init_method: std / sqrt(2 * num_layers) for the projections into the residual.
        out_std = std / math.sqrt(2.0 * num_layers)
        self.input_norm = nn.RMSNorm(hidden_size, eps=NORM_EPS)
        self.attention = SelfAttention(
            hidden_size, num_heads, num_groups, rotary_base=rotary_base, std=std, out_std=out_std
        )
        self.mlp_norm = nn.RMSNorm(hidden_size, eps=NORM_EPS)
        if moe is None:
            self.mlp = SwiGLU(hidden_size, ffn_hidden_size, std=std, out_std=out_std)
        else:
            self.mlp = MoEMLP(hidden_size, moe, std=std, out_std=out_std)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEMLP)

    def forward(self, x_bsh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_bsh = x_bsh + self.attention(self.input_norm(x_bsh))
        if self.is_moe:
            mlp_bsh, aux = self.mlp(self.mlp_norm(x_bsh))
        else:
            mlp_bsh, aux = self.mlp(self.mlp_norm(x_bsh)), x_bsh.new_zeros(())
        return x_bsh + mlp_bsh, aux


class TransformerBlockOnly(nn.Module):
    """A TransformerLayer as tensor -> tensor (the core MTPDepth's `block`), keeping the aux loss aside.

    The MTP depth reads `last_aux` right after the call to carry it through the pipe.
    """

    def __init__(self, layer: TransformerLayer) -> None:
        super().__init__()
        self.layer = layer
        self.last_aux: torch.Tensor | None = None

    def forward(self, x_bsh: torch.Tensor) -> torch.Tensor:
        out_bsh, self.last_aux = self.layer(x_bsh)
        return out_bsh
