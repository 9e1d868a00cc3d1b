"""Type checks of what splice reads (adapter files, YAML configs, `--set` values), with pydantic.

Every value is checked against the annotation of the field it fills, in pydantic's strict mode:
`"false"` is not a boolean, `"16"` is not a number, `2.5` is not an integer, NaN and infinity are
not numbers a config can hold. A failure becomes a `SpliceError` subclass whose message names the
file (when there is one), the key, the value and what was expected:

    runs/x/adapter/adapter_config.json: key 'use_rslora' has value 'false' (a string),
    expected true or false

Only the checking is done here; values are passed on as they were given (a tuple stays a tuple).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError

from splice.core.errors import ConfigError, SpliceError

STRICT = ConfigDict(strict=True, allow_inf_nan=False, arbitrary_types_allowed=True)
_NO_CHECK = object()  # an annotation pydantic cannot check (left to the config's own __post_init__)


@dataclass(frozen=True)
class Problem:
    """One bad value: its key, the value, and what was expected there (in words)."""

    key: str
    value: Any
    expected: str

    def __str__(self) -> str:
        return f"key {self.key!r} has value {show(self.value)}, expected {self.expected}"


def show(value: Any, limit: int = 80) -> str:
    """A short repr of a value, with its type where the repr alone would mislead ('16' vs 16)."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, str):
        return f"{text} (a string)"
    return text


def located(where: str | Path | None, message: str) -> str:
    """`message` prefixed by the file (or other place) it is about, if any."""
    return f"{where}: {message}" if where else message


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Every key whose value differs between a saved config and the current one, as
    "key: saved -> current", in key order (for a refused resume)."""
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)]


def raise_problems(problems: list[Problem], error: type[SpliceError], where: str | Path | None = None,
                   prefix: str = "") -> None:
    """Raise `error` listing every problem (nothing when there are none)."""
    if problems:
        raise error(located(where, prefix + "; ".join(str(p) for p in problems)))


# What users write for a key out of habit (HF PEFT's LoraConfig names, "rank"), and splice's key.
HABITUAL_KEYS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "modules_to_save": "train_also", "use_rslora": "rslora", "layers_to_transform": "layers",
    "init_lora_weights": "init", "exclude_modules": "exclude", "learning_rate": "lr",
}


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """'; did you mean 'x'?' for a near match or a habitual name, else the list of what is known."""
    known = sorted(known)
    habit = HABITUAL_KEYS.get(key)
    close = [habit] if habit in known else difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


# -- one value against one annotation --------------------------------------------------------


@functools.cache
def _adapter(annotation: Any) -> Any:
    try:
        return TypeAdapter(annotation, config=STRICT)
    except Exception:  # a type pydantic has no schema for: left to the code that uses it
        return _NO_CHECK


def check_value(annotation: Any, value: Any) -> str | None:
    """None when `value` fits `annotation` (strictly), else what was expected, in words."""
    try:
        adapter = _adapter(annotation)
    except TypeError:  # unhashable annotation
        adapter = _NO_CHECK
    if adapter is _NO_CHECK:
        return None
    try:
        adapter.validate_python(_plain(value))
    except ValidationError as err:
        expected = describe_type(annotation)
        if any(e["type"] == "finite_number" for e in err.errors()):
            return "a finite number" if expected == "a number" else f"{expected}, all finite"
        return expected
    return None


def _plain(value: Any) -> Any:
    """Tuples as lists and NumPy scalars as Python numbers (what a Python caller may hand over
    is as good as a list or an int); the rest as it is."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
          dict: "a mapping", list: "a list", range: "a range", Path: "a path"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def describe_type(annotation: Any) -> str:
    """An annotation in words: `str | list[str] | None` is 'a string, a list of strings or null'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *metadata = args
        return " ".join([describe_type(base), " and ".join(c for m in metadata if (c := _constraint(m)))]).strip()
    if origin in (typing.Union, types.UnionType):
        names = list(dict.fromkeys(describe_type(a) for a in args))
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, set, frozenset, typing.get_origin(Iterable[int])):
        item = _plural(args[0]) if args else "values"
        return f"a list of {item}"
    if origin in (dict, typing.get_origin(Mapping[str, int])):
        if len(args) == 2:
            return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
        return "a mapping"
    if annotation is Any:
        return "any value"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(annotation: Any) -> str:
    if annotation in _PLURALS:
        return _PLURALS[annotation]
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
        return " ".join([_plural(base), " and ".join(c for m in metadata if (c := _constraint(m)))]).strip()
    return describe_type(annotation)


def _constraint(metadata: Any) -> str:
    """A bound (annotated_types' Ge/Gt/Lt/Le, pydantic's Field) as text ('>= 1'); else ''."""
    for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if hasattr(metadata, attr) and getattr(metadata, attr) is not None:
            return f"{sign} {getattr(metadata, attr)}"
    inner = getattr(metadata, "metadata", None)  # pydantic's Field(ge=...) holds a list of them
    if isinstance(inner, list):
        return " and ".join(t for t in (_constraint(m) for m in inner) if t)
    return ""


# -- dataclass configs -----------------------------------------------------------------------


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each init field of a dataclass (unresolvable ones are left out)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a name the class's module cannot resolve: resolve what can be, field by field
        hints = {}
        for f in dataclasses.fields(cls):
            holder = type("_", (), {"__annotations__": {f.name: f.type}, "__module__": cls.__module__})
            try:
                hints[f.name] = typing.get_type_hints(holder)[f.name]
            except Exception:
                continue
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}


def init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def field_problems(cls: type, data: Mapping[str, Any], also: Mapping[str, Any] | None = None) -> list[Problem]:
    """Each key of `data` whose value does not fit the type of `cls`'s field of that name
    (`also`: annotations that replace a field's, for what its `__post_init__` converts)."""
    hints = {**field_types(cls), **(also or {})}
    return [Problem(key, value, expected) for key, value in data.items()
            if key in hints and (expected := check_value(hints[key], value)) is not None]


def check_config_fields(config: Any, error: type[SpliceError] = ConfigError) -> None:
    """Refuse a config dataclass instance whose fields do not fit their annotations; for a
    config's `__post_init__` (`LoRA(r=2.5)` or `LoRA(rslora="false")` from Python)."""
    values = {name: getattr(config, name) for name in init_fields(type(config))}
    problems = field_problems(type(config), values)
    raise_problems(problems, error, prefix=f"{type(config).__name__}: ")


# -- regexes and tensors ---------------------------------------------------------------------


def regex_error(pattern: str) -> str | None:
    """Why `pattern` does not compile as a regular expression, or None if it does."""
    try:
        re.compile(pattern)
    except re.error as err:
        return str(err)
    return None


def tensor_problem(tensor: Any, *, floating: bool = True, min_dim: int = 0, max_dim: int | None = None,
                   nonempty: bool = False, finite: bool = True) -> str | None:
    """Why `tensor` cannot be a weight (wrong type, dtype, shape, NaN/Inf values), or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"is a {type(tensor).__name__}, not a tensor"
    if floating and not tensor.is_floating_point():
        return f"has dtype {str(tensor.dtype).removeprefix('torch.')}; expected a floating-point tensor"
    if tensor.dim() < min_dim or (max_dim is not None and tensor.dim() > max_dim):
        shape = "a scalar (0 dimensions)" if tensor.dim() == 0 else f"shape {tuple(tensor.shape)}"
        wanted = f"{min_dim}" if max_dim == min_dim else f"at least {min_dim}" if max_dim is None else \
            f"{min_dim} to {max_dim}"
        return f"is {shape}; expected {wanted} dimensions"
    if nonempty and tensor.numel() == 0:
        return f"is empty (shape {tuple(tensor.shape)})"
    return nonfinite_problem(tensor) if finite else None


def nonfinite_problem(tensor: torch.Tensor) -> str | None:
    """'holds 3 NaN and 1 infinite values' for a floating tensor that has any, else None."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int((~finite).sum()) - nan
    parts = [f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else ""]
    return f"holds {' and '.join(p for p in parts if p)} values of {tensor.numel()}; weights must be finite"


def keyed_error(key: str, message: str) -> ConfigError:
    """A ConfigError that remembers the config key at fault (the CLI names the flag or YAML key)."""
    err = ConfigError(message)
    err.key = key
    return err


def check_fields(cls: type, data: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse the first value of `data` that does not fit its field of dataclass `cls`; the error's
    key is the section (`prefix` without its dot and index) or the field."""
    types = field_types(cls)
    for key, value in data.items():
        if key in types and (expected := check_value(types[key], value)) is not None:
            section = prefix.split("[")[0].rstrip(".") or key
            raise keyed_error(section, f"{prefix}{key} must be {expected}, got {show(value)}")


def build_named(registry: Mapping[str, type], spec: Mapping[str, Any], what: str, example: str) -> Any:
    """The registered class that `spec["name"]` names, built with the spec's other keys (its
    dataclass fields); an unknown name, option or value is refused naming `what` (a config key:
    "schedule", "selection") and the choices, e.g. `example` "{name: dmep}"."""
    options = dict(spec)
    name = options.pop("name", None)
    if name not in registry:
        raise SpliceError(f"{what} name {name!r} is not known; {what}s: {sorted(registry)} (e.g. {what}: {example})")
    cls = registry[name]
    known = set(init_fields(cls)) if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        raise SpliceError(f"{what} {name!r} has no option {unknown}; its options: {sorted(known)}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise SpliceError(f"{what} {name!r}: {err}") from None


_YAML_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_number(value: Any) -> Any:
    """`1e-3` as the number YAML 1.2 reads (PyYAML, YAML 1.1, leaves it a string); else `value`."""
    return float(value) if isinstance(value, str) and _YAML_FLOAT.fullmatch(value.strip()) else value

