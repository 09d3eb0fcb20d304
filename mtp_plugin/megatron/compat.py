"""Compatibility with the supported megatron-core range (0.16.1 - 0.19.x).

megatron-core 0.16.1's `moe_utils` imports `te_general_gemm` only when TransformerEngine is installed
but reads the name unconditionally in the router's gating linear, so every MoE forward without TE raises
NameError. 0.17 defines the name as None when TE is absent; `ensure_moe_router_without_te()` does
exactly that on 0.16.x, and nothing on versions that already define it. It changes no behaviour of a
working install: with the name defined, Megatron takes its own non-TE code path.

Likewise without TransformerEngine, `megatron.core.extensions.transformer_engine` still imports (its TE
classes become MagicMock stand-ins), so `multi_latent_attention` believes TE is there (`HAVE_TE = True`)
and `isinstance(linear_proj, TELinear)` raises TypeError while building every MLA layer.
`ensure_mla_without_te()` sets `HAVE_TE = False` there when TransformerEngine is not importable, the
value that module's own ImportError branch gives; with TE installed it does nothing.
"""

from __future__ import annotations

import importlib


def ensure_moe_router_without_te() -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def ensure_mla_without_te() -> None:
    from importlib.util import find_spec

    if find_spec("transformer_engine") is None:
        importlib.import_module("megatron.core.transformer.multi_latent_attention").HAVE_TE = False


def optional_accelerators() -> dict[str, bool]:
    """Which optional kernel packages are importable. Neither is on PyPI for every platform (apex never is);
    Megatron uses them when present (fused norms, fused Adam, TE layers) and falls back to torch otherwise,
    and so does everything in this plugin."""
    from importlib.util import find_spec

    return {name: find_spec(name) is not None for name in ("apex", "transformer_engine")}
