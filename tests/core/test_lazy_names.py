"""`import splice` loads its names on first use: every public name still resolves to what it did
when they were imported up front, whatever was imported before, and the registry finds the
built-in methods even when nothing from the top package was touched. Each case runs in a fresh
interpreter, where nothing has been imported yet."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest


def run_fresh(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr


def test_import_splice_loads_neither_torch_nor_the_methods():
    run_fresh("import sys, splice\nassert 'torch' not in sys.modules\nassert 'splice.methods' not in sys.modules")


@pytest.mark.parametrize("first", ["import splice.core.quantization, splice.core.summaries, splice.analysis.forgetting",
                                   "import splice.io", "pass"])
def test_names_shadowing_a_module_resolve_to_the_function_whatever_came_first(first):
    run_fresh(f"""{first}
import inspect, splice
from splice.core import quantize, summary
assert inspect.isfunction(quantize) and inspect.isfunction(summary)
assert splice.quantize is quantize and splice.summary is summary
from splice.analysis import forgetting
assert inspect.isfunction(forgetting)""")


def test_star_import_and_dir_list_every_public_name():
    run_fresh("""import splice
names = set(splice.__all__)
assert {"attach", "LoRA", "DoRA", "DomLoRA", "load", "save", "compress", "audit", "SpliceError"} <= names
assert names <= set(dir(splice))
namespace = {}
exec("from splice import *", namespace)
assert names <= set(namespace)
from splice.methods import __all__ as methods
from splice.core import __all__ as core
assert set(methods) | set(core) <= names""")


def test_the_registry_finds_builtin_methods_without_the_top_package():
    run_fresh("""from splice.core.registry import config_class, config_from_dict, method_names
assert config_class("lora").__name__ == "LoRA"
assert config_class("domlora").__name__ == "DomLoRA"
assert config_from_dict({"method": "dora", "r": 4}).r == 4
assert "loreft" in method_names()""")


def test_unknown_names_raise_attribute_error_naming_them():
    run_fresh("""import splice, splice.core
for module in (splice, splice.core):
    try:
        module.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("no AttributeError")
assert not hasattr(splice, "__wrapped__")""")


def test_subpackages_load_alone_on_attribute_access():
    run_fresh("""import splice
assert splice.train.TrainConfig.__name__ == "TrainConfig"
assert splice.boost.boostlora.__name__ == 'boostlora'""")


@pytest.mark.parametrize("package", ["splice", "splice.core", "splice.audit"])
def test_no_lazy_package_exports_a_name_its_own_module_would_shadow(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        if importlib.util.find_spec(f"{package}.{name}") is not None:  # then the name must be that module
            assert getattr(module, name) is importlib.import_module(f"{package}.{name}"), f"{package}.{name}"
