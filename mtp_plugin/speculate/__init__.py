"""Speculative decoding with the trained MTP depths (`python -m mtp_plugin.speculate`).

`SpeculativeDecoder` drafts with the model's own depths and verifies with one trunk forward, KV-cached,
exact against plain greedy decoding (decoder.py says how). Megatron-Core 0.19's dynamic inference engine
has MTP speculative decoding too, but cannot take this model on a stack without flash-attn (README,
"Decoding with the depths").
"""

from mtp_plugin.speculate.decoder import DecodeStats, SpeculativeDecoder

__all__ = ["DecodeStats", "SpeculativeDecoder"]
