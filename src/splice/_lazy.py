"""Package names imported on first use (PEP 562), so that importing a package, or one of its light
modules (the `splice` command's `--help`, `splice.core.errors`), does not pay the seconds torch and
transformers take to import until a name that needs them is used.

A lazy package must not export a name that is also one of its modules: importing that module
(which anything may do first) binds the package attribute to the module for good, and the
exported name would no longer be reached (tests/core/test_lazy_names.py checks every lazy package).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def submodule(package: str, name: str) -> ModuleType | None:
    """`package.name` imported, if it is a module of the package; None for any other name."""
    if name.startswith("__") or "." in name or importlib.util.find_spec(f"{package}.{name}") is None:
        return None
    return importlib.import_module(f"{package}.{name}")


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `exports` maps each public name to the module of the
    package that defines it, imported when the name is first looked up; the package's modules are
    reached as attributes too, as they were when the package imported them up front."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        module = submodule(package, name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return module

    return __getattr__
