"""Package names imported on first use (PEP 562), so that importing a package, or one of its light
modules (the `splice` command's `--help`, `splice.core.errors`), does not pay the seconds torch and
transformers take to import until a name that needs them is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports` maps each public name to the module of the
    package that defines it, imported when the name is first looked up."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
