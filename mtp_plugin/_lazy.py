"""Lazy attribute exports for a package whose submodules import a slow host framework.

    __all__, __getattr__ = lazy_exports(__name__, {"RhoMeter": "meter", ...})

`package.RhoMeter` imports `package.meter` on first access (PEP 562 module `__getattr__`), so importing
the package alone (config checks, placement) stays fast and fails fast without the host installed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[list[str], Callable[[str], object]]:
    """(`__all__`, module `__getattr__`) for `package`; `exports` maps each name to its submodule."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(exports), __getattr__
