"""The MTP module and stack (DESIGN.md §2; DeepSeek-V3 §2.2, Fig. 3).

    h'_i^k = eh_proj( concat( enorm(Emb(t_{i+k})), hnorm(h_i^{k-1}) ) )    # embedding FIRST
    h^k    = final_norm_k( TRM_k(h'^k) )

Names (enorm, hnorm, eh_proj, final norm) follow Megatron-Core and the Hugging Face DeepSeek-V3 checkpoint
(`model.layers.{L+k-1}.enorm|hnorm|eh_proj|shared_head.norm`). As in Megatron, h^0 is the trunk output after
the trunk's final norm, and each depth hands its own final-normed state to the next depth and the head.

The transformer block and norms come from factories the adapter passes in (a Megatron ModuleSpec, a
DeepSpeed layer, a plain torch block), and the embedding and output head are the trunk's own, passed in
at call time, never owned or copied by this module: a shared weight cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtp_plugin.core.targets import shift_left

BlockFactory = Callable[[int], nn.Module]  # depth (1-based) -> causal transformer block
NormFactory = Callable[[int], nn.Module]  # hidden size -> norm module


def rms_norm_factory(eps: float = 1e-6) -> NormFactory:
    return lambda hidden_size: nn.RMSNorm(hidden_size, eps=eps)


class MTPDepth(nn.Module):
    """One MTP module: enorm/hnorm, projection of [emb; hidden] 2h -> h, a causal block, a final norm.

    The parts are passed in so that an adapter can use its framework's own modules (a Megatron
    ColumnParallelLinear, a TransformerLayer built from the model's ModuleSpec); `eh_proj` and `block`
    must map a tensor to a tensor.
    """

    def __init__(
        self,
        *,
        enorm: nn.Module,
        hnorm: nn.Module,
        eh_proj: nn.Module,
        block: nn.Module,
        final_norm: nn.Module,
    ) -> None:
        super().__init__()
        self.enorm = enorm
        self.hnorm = hnorm
        self.eh_proj = eh_proj
        self.block = block
        self.final_norm = final_norm

    def forward(self, hidden_prev: torch.Tensor, emb_next: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """hidden_prev: h^{k-1}; emb_next: Emb(t_{i+k}) in the same layout. Returns final_norm(h^k)."""
        # Embedding first, as Megatron's MultiTokenPredictionLayer and the HF checkpoint order eh_proj's input.
        x = torch.cat([self.enorm(emb_next), self.hnorm(hidden_prev)], dim=-1)
        return self.final_norm(self.block(self.eh_proj(x), **block_kwargs))


EmbedFn = Callable[[torch.Tensor, int], torch.Tensor]  # (input ids shifted by k, k) -> embeddings


class MTPStack(nn.Module):
    """D sequential MTP depths; depth k consumes h^{k-1} and Emb(t_{i+k})."""

    def __init__(self, depths: list[MTPDepth]) -> None:
        super().__init__()
        if not depths:
            raise ValueError("an MTP stack needs at least one depth (num_depths >= 1)")
        self.depths = nn.ModuleList(depths)

    @property
    def num_depths(self) -> int:
        return len(self.depths)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids_bs: torch.Tensor,
        embed: EmbedFn,
        *,
        first_depth: int = 1,
        **block_kwargs,
    ) -> list[torch.Tensor]:
        """Returns [h^1, ..., h^D] (each after its final norm), in `hidden`'s layout.

        `embed(ids_bs, k)` maps the ids shifted left by k to embeddings in the layout of `hidden`, through the
        trunk's shared embedding (k lets an adapter shift position ids the same way). `first_depth`: the
        depth k of this stack's first module when a pipeline splits the depths over stages (`hidden` is
        then h^(first_depth - 1)).
        """
        seq_len = input_ids_bs.shape[-1]
        last_depth = first_depth - 1 + self.num_depths
        if last_depth >= seq_len:
            # Depth k predicts t_(i+1+k): a window of S tokens has a target for depth k only while k < S.
            raise ValueError(
                f"MTPStack has {last_depth} depths but the window holds {seq_len} tokens; depth k needs "
                f"k < sequence length, so lower num_depths below {seq_len} or train on longer sequences"
            )
        outputs = []
        for k, depth in enumerate(self.depths, start=first_depth):
            hidden = depth(hidden, embed(shift_left(input_ids_bs, k), k), **block_kwargs)
            outputs.append(hidden)
        return outputs


def build_mtp_stack(
    *,
    num_depths: int,
    hidden_size: int,
    block_factory: BlockFactory,
    norm_factory: NormFactory | None = None,
) -> MTPStack:
    """An MTP stack from plain torch parts: RMSNorms and a bias-free nn.Linear projection."""
    if num_depths < 1:
        raise ValueError(f"num_depths must be >= 1, got {num_depths}")
    norm_factory = norm_factory or rms_norm_factory()
    return MTPStack(
        [
            MTPDepth(
                enorm=norm_factory(hidden_size),
                hnorm=norm_factory(hidden_size),
                eh_proj=nn.Linear(2 * hidden_size, hidden_size, bias=False),
                block=block_factory(k),
                final_norm=norm_factory(hidden_size),
            )
            for k in range(1, num_depths + 1)
        ]
    )
