"""Exact greedy self-speculative decoding with the model's own MTP depths, KV caches and rollback.

Entries. The trunk's entry u consumes token t_u and yields out_0[u], whose head predicts t_{u+1}. Depth k
(1..D) at training position i consumes h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+1+k}; indexed by the
token it consumes, depth k's entry u = i + k consumes (t_u, out_{k-1}[u-1]) and predicts t_{u+1}, like the
trunk. Its KV cache holds entry u at slot i = u - k with RoPE position i, as in training
(`mtp_plugin.megatron.model.MTPGPTModel`, `mtp_plugin.core.MTPStack`).

A round, with t_0..t_n committed and t_n not yet consumed by the trunk:
  verify  the trunk consumes [t_n, d_1..d_K] at slots n..n+K in one forward (causal inside the block);
          g_i = argmax of entry n+i predicts t_{n+i+1}. A row accepts a = the longest prefix with
          d_i == g_{i-1}; the batch commits the smallest a (rows decode in lockstep) and the bonus g_a.
          The trunk's cache keeps slots <= n+a: the next write starts at n' = n+a+1 (rollback is moving
          that offset; stale slots are overwritten before they are read, since attention reads [0, end)).
  draft   depth 1 consumes its committed entries n+1..n' (out_0 from the verify forward); its last output
          drafts d_1. Depth k >= 2 consumes entries n+1..n'+k-1, the last k-1 of which hold drafts, with
          out_{k-1} from the depth before (entry n from the previous round); its last output drafts d_k.
          Drafts beyond D chain depth D on its own output (vLLM's reuse of the last MTP layer). Each
          depth's cache keeps its committed entries (<= n'); its draft entries are overwritten next round.
So every depth sees exactly the inputs it was trained on for committed tokens, and the drafts only where
tokens are not known yet. The output equals plain greedy decoding token for token: every committed token
is the trunk's own argmax given the committed prefix (exact in fp32; in bf16 a verify forward over K+1
tokens may round differently from a one-token step and flip a near-tie).

Megatron's own modules run every step: the embedding, the TransformerBlock and each depth's
TransformerLayer with a `StaticInferenceContext` each (its KV cache, written at `sequence_len_offset`),
an explicit causal mask (Megatron drops its causal mask when the offset is > 0), the output layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeStats:
    """What one decoding run measured. Per draft position i (1..K): how often a row drafted it, how often
    it was accepted (all drafts before it accepted too); `accepted_per_round` is the mean accepted drafts
    per row and verify forward (a row's own run, before the batch's lockstep minimum)."""

    num_draft_tokens: int
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0
    row_rounds: int = 0
    row_accepted: int = 0
    committed_per_round: list[int] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        """P(d_i accepted | d_1..d_{i-1} accepted)."""
        reached = [self.row_rounds, *self.accepted[:-1]]
        return [a / max(r, 1) for a, r in zip(self.accepted, reached)]

    @property
    def mean_accepted_length(self) -> float:
        return self.row_accepted / max(self.row_rounds, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def _causal_mask(num_queries: int, offset: int, device) -> torch.Tensor:
    """[1, 1, s, offset + s] bool, True = masked: query i (at slot offset + i) sees slots <= offset + i."""
    keys = torch.arange(offset + num_queries, device=device)
    queries = torch.arange(num_queries, device=device)[:, None] + offset
    return (keys[None, :] > queries)[None, None]


class SpeculativeDecoder:
    """Greedy decoding of an `MTPGPTModel` (one stage: pp = tp = 1), plain or speculative, KV-cached.

    `greedy(prompt_bs, n)` and `speculative(prompt_bs, n, k)` return ([b, n] new tokens, DecodeStats). All
    rows of a batch share one prompt length.
    """

    def __init__(self, model) -> None:
        if not (model.pre_process and model.post_process):
            raise ValueError("the decoder needs the whole model on one stage (pipeline size 1)")
        self.model = model
        self.num_depths = getattr(model, "num_mtp_depths", 0)
        self.max_positions = model.max_sequence_length
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ Megatron's modules, one call each

    def _head(self, hidden_sbh: torch.Tensor) -> torch.Tensor:
        model = self.model
        weight = (
            model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        )
        logits, _ = model.output_layer(hidden_sbh, weight=weight)
        return logits  # [s b V]

    def _embed(self, ids_bs: torch.Tensor) -> torch.Tensor:
        return self.model.embedding(input_ids=ids_bs, position_ids=None)  # [s b h]

    def _context(self, batch: int, length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(batch, length)

    def _trunk(self, ids_bs: torch.Tensor, context, offset: int) -> torch.Tensor:
        """out_0 for the tokens at slots offset.. (the trunk after its final norm), [s b h]."""
        context.sequence_len_offset = offset
        return self.model.decoder(
            hidden_states=self._embed(ids_bs),
            attention_mask=_causal_mask(ids_bs.shape[1], offset, self.device),
            inference_context=context,
            rotary_pos_emb=self._rope,
        )

    def _depth(self, k: int, ids_bs: torch.Tensor, hidden_sbh: torch.Tensor, context, slot: int):
        context.sequence_len_offset = slot
        return self.model.mtp_stack.depths[k - 1](
            hidden_sbh,
            self._embed(ids_bs),
            attention_mask=_causal_mask(ids_bs.shape[1], slot, self.device),
            inference_context=context,
            rotary_pos_emb=self._rope,
        )

    def _start(self, prompt_bs: torch.Tensor, max_new_tokens: int, draft_tokens: int):
        batch, prompt_len = prompt_bs.shape
        length = prompt_len + max_new_tokens + draft_tokens + 1
        # MLA applies its own RoPE (YaRN too) from the context's sequence_len_offset; GPTModel has no table.
        self._rope = None if self.model.config.multi_latent_attention else self.model.rotary_pos_emb(length)
        return self._context(batch, length)

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def greedy(self, prompt_bs: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, DecodeStats]:
        stats = DecodeStats(num_draft_tokens=0)
        self._sync()
        start = time.perf_counter()
        context = self._start(prompt_bs, max_new_tokens, 0)
        out = self._trunk(prompt_bs, context, 0)
        token_b = self._head(out[-1:])[0].argmax(-1)
        tokens = [token_b]
        offset = prompt_bs.shape[1]
        while len(tokens) < max_new_tokens:
            out = self._trunk(token_b[:, None], context, offset)
            token_b = self._head(out)[0].argmax(-1)
            tokens.append(token_b)
            offset += 1
        new_bn = torch.stack(tokens, dim=1)
        self._sync()
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = new_bn.numel()
        return new_bn, stats

    @torch.no_grad()
    def speculative(
        self, prompt_bs: torch.Tensor, max_new_tokens: int, draft_tokens: int
    ) -> tuple[torch.Tensor, DecodeStats]:
        if self.num_depths < 1:
            raise ValueError("the model has no MTP depths: plain decoding (greedy) is the only mode")
        if draft_tokens < 1:
            raise ValueError(f"draft tokens must be >= 1, got {draft_tokens}")
        num_depths = min(self.num_depths, draft_tokens)
        stats = DecodeStats(
            num_draft_tokens=draft_tokens, proposed=[0] * draft_tokens, accepted=[0] * draft_tokens
        )
        self._sync()
        start = time.perf_counter()
        batch, prompt_len = prompt_bs.shape
        trunk_ctx = self._start(prompt_bs, max_new_tokens, draft_tokens)
        depth_ctx = [self._context(batch, trunk_ctx.max_sequence_length) for _ in range(num_depths)]

        seq_bt = prompt_bs  # committed tokens t_0..t_n
        out0 = self._trunk(prompt_bs, trunk_ctx, 0)  # out_0[0..P-1]
        seq_bt = torch.cat([seq_bt, self._head(out0[-1:])[0].argmax(-1)[:, None]], dim=1)
        frontier = None  # the previous commit point n (None before the first draft)
        carry: list[torch.Tensor | None] = [None] * (num_depths + 1)  # out_k[n] per level k >= 1
        level_in = out0  # level 0's outputs for entries [frontier or 0, ...]

        while seq_bt.shape[1] - prompt_len < max_new_tokens:
            n = seq_bt.shape[1] - 1
            drafts = self._draft(seq_bt, n, frontier, level_in, carry, depth_ctx, draft_tokens, num_depths)
            # verify: the trunk consumes [t_n, d_1..d_K] at slots n..n+K.
            out0 = self._trunk(torch.cat([seq_bt[:, -1:], drafts], dim=1), trunk_ctx, n)
            greedy_bk = self._head(out0).argmax(-1).t()  # [b, K+1]: g_0..g_K
            agree_bk = (drafts == greedy_bk[:, :-1]).long().cumprod(dim=1)
            accepted_b = agree_bk.sum(dim=1)
            self._count(stats, agree_bk, accepted_b)
            a = int(accepted_b.min())
            seq_bt = torch.cat([seq_bt, drafts[:, :a], greedy_bk[:, a : a + 1]], dim=1)
            stats.committed_per_round.append(a + 1)
            frontier, level_in = n, out0[: a + 1]  # out_0[n..n+a] are the committed trunk outputs

        new_bn = seq_bt[:, prompt_len : prompt_len + max_new_tokens]
        self._sync()
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = new_bn.numel()
        return new_bn, stats

    def _draft(self, seq_bt, n, frontier, level_in, carry, depth_ctx, draft_tokens, num_depths):
        """Depths 1..D consume the entries committed since `frontier` and draft d_1..d_K; returns [b, K].

        level_in: out_0 for entries f..n-1 (f = frontier, or 0 at the start); carry[k]: out_k[f] from the
        previous round (None at the start), replaced here by out_k[n].
        """
        drafts: list[torch.Tensor] = []
        prev_out = level_in
        new_carry = list(carry)
        for k in range(1, num_depths + 1):
            first = k if frontier is None else frontier + 1  # the first entry depth k consumes this round
            # Entries first..n+k-1: committed tokens, then the drafts d_1..d_{k-1}.
            tokens_bs = torch.cat([seq_bt[:, first:], *[d[:, None] for d in drafts]], dim=1)
            # out_{k-1} for entries first-1..n+k-2: the previous round's out_{k-1}[f], then this round's.
            hidden = prev_out if k == 1 or carry[k - 1] is None else torch.cat([carry[k - 1], prev_out])
            assert hidden.shape[0] == tokens_bs.shape[1], (hidden.shape, tokens_bs.shape)
            prev_out = self._depth(k, tokens_bs, hidden, depth_ctx[k - 1], first - k)
            drafts.append(self._head(prev_out[-1:])[0].argmax(-1))
            new_carry[k] = prev_out[n - first : n - first + 1]  # out_k[n]: committed, the next round's f
        carry[:] = new_carry
        # Beyond D: depth D chains on its own last output, one entry per draft, after its own entries.
        for m in range(num_depths + 1, draft_tokens + 1):
            entry = n + m - 1
            prev_out = self._depth(
                num_depths, drafts[-1][:, None], prev_out[-1:], depth_ctx[num_depths - 1], entry - num_depths
            )
            drafts.append(self._head(prev_out)[0].argmax(-1))
        return torch.stack(drafts, dim=1)

    def _count(self, stats: DecodeStats, agree_bk: torch.Tensor, accepted_b: torch.Tensor) -> None:
        stats.rounds += 1
        stats.row_rounds += agree_bk.shape[0]
        stats.row_accepted += int(accepted_b.sum())
        for i, hits in enumerate(agree_bk.sum(dim=0).tolist()):
            stats.proposed[i] += agree_bk.shape[0]
            stats.accepted[i] += hits

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
