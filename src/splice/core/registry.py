"""Method name -> config class. Methods register themselves; the core never imports them."""

from __future__ import annotations

from typing import Any, TypeVar

from splice.core.config import AdapterConfig
from splice.core.errors import AdapterFileError

_METHODS: dict[str, type[AdapterConfig]] = {}

C = TypeVar("C", bound=type[AdapterConfig])


def register_method(config_cls: C) -> C:
    """Class decorator: make `config_cls.method` known to loading, the CLI and YAML configs."""
    name = config_cls.method.lower()  # looked up case-insensitively, as files may spell it
    if not name:
        raise TypeError(f"{config_cls.__name__} must set the class attribute `method`")
    if name in _METHODS and _METHODS[name] is not config_cls:
        raise TypeError(f"method {name!r} is already registered by {_METHODS[name].__name__}")
    _METHODS[name] = config_cls
    return config_cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def config_class(method: str) -> type[AdapterConfig]:
    try:
        return _METHODS[method.lower()]
    except KeyError:
        raise AdapterFileError(
            f"unknown adapter method {method!r}; known methods: {', '.join(method_names())}"
        ) from None


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from `AdapterConfig.to_dict()` output (or a YAML mapping)."""
    data = dict(data)
    method = data.pop("method", None)
    if method is None:
        raise AdapterFileError(f"adapter config has no 'method' key: {sorted(data)}")
    cls = config_class(method)
    try:
        return cls(**data)
    except TypeError as err:
        raise AdapterFileError(f"bad {method!r} config: {err}") from None
