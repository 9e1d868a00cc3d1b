"""Method name -> config class. Methods register themselves; the core never imports them by
name: a lookup first imports the packages that hold the built-in ones (`BUILTIN_METHOD_PACKAGES`),
since `import splice` no longer does it up front."""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from splice.core.config import AdapterConfig
from splice.core.errors import AdapterFileError, ConfigError, SpliceError
from splice.core.validation import did_you_mean, field_problems, init_fields, located, raise_problems, show

_METHODS: dict[str, type[AdapterConfig]] = {}
# Importing these registers splice's own forms (every method file, and DomLoRA's placement).
BUILTIN_METHOD_PACKAGES = ("splice.methods", "splice.placement")

C = TypeVar("C", bound=type[AdapterConfig])


def register_method(config_cls: C) -> C:
    """Class decorator: make `config_cls.method` known to loading, the CLI and YAML configs."""
    name = config_cls.method.lower()  # looked up case-insensitively, as files may spell it
    if not name:
        raise TypeError(f"{config_cls.__name__} must set the class attribute `method`")
    if not config_cls.__module__.startswith(BUILTIN_METHOD_PACKAGES):
        _registered()  # the built-in names first, so that a clash is refused here, not at a later lookup
    if name in _METHODS and _METHODS[name] is not config_cls:
        raise TypeError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
    _METHODS[name] = config_cls
    _name_unknown_keywords(config_cls)
    return config_cls


def _name_unknown_keywords(config_cls: type[AdapterConfig]) -> None:
    """`LoRA(rank=8)` fails as any Python call with an unknown keyword does (TypeError), but
    says which key was meant, as YAML configs and `--set` do."""
    init = config_cls.__init__

    @functools.wraps(init)
    def checked_init(self: AdapterConfig, *args: Any, **kwargs: Any) -> None:
        known = init_fields(type(self))
        for key in kwargs:
            if key not in known:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}"
                                f"{did_you_mean(key, known)}")
        init(self, *args, **kwargs)

    config_cls.__init__ = checked_init


def _registered() -> dict[str, type[AdapterConfig]]:
    """Every registered method, the built-in ones included whatever has been imported so far."""
    for package in BUILTIN_METHOD_PACKAGES:
        importlib.import_module(package)
    return _METHODS


def method_names() -> list[str]:
    return sorted(_registered())


def config_class(method: str, error: type[SpliceError] = AdapterFileError) -> type[AdapterConfig]:
    if not isinstance(method, str):
        raise error(f"the adapter method must be a string naming one of {', '.join(method_names())}; "
                    f"got {show(method)}")
    try:
        return _registered()[method.lower()]
    except KeyError:
        close = difflib.get_close_matches(method.lower(), method_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise error(f"unknown adapter method {method!r}{hint} (known methods: {', '.join(method_names())})") from None


# Fields whose __post_init__ takes more than the annotation says (a single name for a list).
_ALSO_ACCEPTED: dict[str, Any] = {"train_also": str | list[str]}


def config_from_dict(data: Mapping[str, Any], *, source: str | Path | None = None,
                     error: type[SpliceError] | None = None) -> AdapterConfig:
    """Rebuild a config from `AdapterConfig.to_dict()` output (or a YAML mapping, `--set` values,
    the `config` of a splice adapter file), checking every key and value first.

    A key the method does not have is refused with the closest one it has; a value that does not
    fit the field's annotation (strictly: `"false"` is not a bool, `2.5` not an int, NaN not a
    number) is refused naming the key, the value and what was expected. `source` (the file the
    mapping came from) starts every message; `error` is the error class (default: AdapterFileError
    with a `source`, ConfigError without).
    """
    error = error or (AdapterFileError if source is not None else ConfigError)
    if not isinstance(data, Mapping):
        raise error(located(source, f"an adapter config must be a mapping with a 'method' key, got {show(data)}"))
    data = dict(data)
    method = data.pop("method", None)
    if method is None:
        raise error(located(source, f"adapter config has no 'method' key: {sorted(data)}"))
    try:
        cls = config_class(method, error)
    except SpliceError as err:
        raise error(located(source, str(err))) from None
    bad = f"bad {method!r} config: "
    for key in data:
        if not isinstance(key, str) or key not in init_fields(cls):
            raise error(located(source, f"{bad}unknown key {key!r}{did_you_mean(str(key), init_fields(cls))}"))
    raise_problems(field_problems(cls, data, _ALSO_ACCEPTED), error, source, bad)
    try:
        return cls(**data)
    except (TypeError, ValueError, re.error) as err:  # SpliceError is a ValueError
        raise error(located(source, f"{bad}{err}")) from None
