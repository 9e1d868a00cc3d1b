"""Review of the lazy package names (commits 505ba64, 941b7fb: `splice/__init__.py` and
`splice/core/__init__.py` load their names on first use, the registry imports the built-in
methods on lookup): what the change broke, or left broken in the same class of problem, pinned
as fixed. Where module state matters the case runs in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import splice


def run_fresh(code: str) -> None:
    """Run `code` in a fresh interpreter, where nothing of splice has been imported yet."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_method_named_like_a_builtin_is_refused_at_registration_whatever_was_imported_before():
    # `import splice` used to register every built-in method first, so a clashing class was refused
    # where it was defined. With lazy names a class registered before any lookup took "lora"
    # silently, and the first lookup then refused splice's own LoRA (every later lookup raised):
    # register_method now loads the built-ins before a class from elsewhere.
    run_fresh("""from dataclasses import dataclass
from typing import ClassVar
from splice.core.config import AdapterConfig
from splice.core.registry import config_class, register_method
refused = None
try:
    @register_method
    @dataclass
    class Impostor(AdapterConfig):
        method: ClassVar[str] = "lora"
except TypeError as err:
    refused = str(err)
assert refused is not None and "already registered" in refused, "a second 'lora' was registered silently"
assert config_class("lora").__module__ == "splice.methods.lora"
import splice
assert splice.DoRA.__name__ == "DoRA" and splice.LoRA is config_class("lora")""")


def test_core_submodules_are_still_reached_as_attributes_after_import_splice():
    # `splice.core` used to import api, config, errors, registry, ... in its __init__, so
    # `splice.core.registry.method_names()` worked after `import splice`; its lazy `__getattr__` knew
    # only the exported names at first. It imports the package's modules too now, as the top
    # package's does (`splice.train`).
    run_fresh("""import importlib
import splice
assert splice.core.errors is importlib.import_module("splice.core.errors")
assert splice.core.registry.config_class("lora").__name__ == "LoRA"
assert splice.core.api.attach is splice.attach""")


def test_a_dotted_missing_name_is_an_attribute_error():
    # A module `__getattr__` must raise AttributeError for a missing name (getattr with a default and
    # hasattr catch only that); `find_spec("splice.no_such.thing")` raised ModuleNotFoundError.
    assert getattr(splice, "no_such.thing", None) is None
    assert not hasattr(splice, "no_such.thing")


def test_audit_word_scan_stays_the_function_after_its_module_is_imported():
    # splice.audit is lazy and exported `word_scan`, the function of its submodule `word_scan`:
    # importing that submodule bound the package attribute to the module, which then shadowed the
    # function (pre-existing; the module is now trigger_words.py).
    run_fresh("""import inspect
import splice.audit as audit
first = audit.word_scan
assert inspect.isfunction(first), first
assert audit.word_scan is first, audit.word_scan
from splice.audit import audit as run_audit, word_scan
assert word_scan is first, word_scan""")
