"""A Linear layer stored as frozen orthonormal bases around a small trainable core, and its files.

    y = U C Vᵀ x + b,    U: [out, k],  V: [in, k]  (orthonormal columns, frozen),
                         C: [k, k] (the only trainable tensor),  b: the original bias (frozen)

It is what joint compression (JACTUS, `splice.compression.jactus`) deploys in place of a dense
`nn.Linear`: (in + out) k + k² numbers instead of in * out, and no copy of the dense weight.
The forward runs right to left, ((x V) Cᵀ) Uᵀ, so it costs (in + out) k + k² multiply-adds per
token, as many as it stores numbers, and never forms the [out, in] product: at an 80% parameter
budget (k ≈ 0.34 d for a square d x d layer) it does 0.8x the dense layer's work.

Unlike the adapters in `splice.methods`, this module *replaces* the base layer (a compressed model
carries no dense W to hook onto), so it is not a splice host and `splice.attach` cannot put an
adapter on it; `save_factorized` / `load_factorized` are its file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from splice.core.errors import AdapterFileError, ShapeMismatchError
from splice.core.validation import nonfinite_problem
from splice.io.files import atomic_directory, base_model_name, write_json, write_tensors

FORMAT = "splice-factorized"
FORMAT_VERSION = 1
CONFIG_NAME = "factorized_config.json"
WEIGHTS_NAME = "factorized_model.safetensors"


class FactorizedLinear(nn.Module):
    """y = ((x V) Cᵀ) Uᵀ + b with frozen U, V, b and a trainable core C.

    U, V and the bias are frozen `nn.Parameter`s rather than buffers so that parameter counts
    (`model.num_parameters()`, `splice.summary`) see the deployed size; only `core` has
    `requires_grad`. The forward computes in the input's dtype (factors are cast when they
    differ, e.g. under autocast), on whatever device the module lives on.
    """

    def __init__(self, U: torch.Tensor, core: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        k = core.shape[0]
        if core.shape != (k, k) or U.ndim != 2 or V.ndim != 2 or U.shape[1] != k or V.shape[1] != k:
            raise ShapeMismatchError(f"FactorizedLinear needs U [out, k], core [k, k], V [in, k]; got U "
                                     f"{tuple(U.shape)}, core {tuple(core.shape)}, V {tuple(V.shape)}")
        if bias is not None and bias.shape != (U.shape[0],):
            raise ShapeMismatchError(f"bias of shape {tuple(bias.shape)} does not fit {U.shape[0]} outputs")
        self.in_features, self.out_features = V.shape[0], U.shape[0]
        # Own contiguous copies: the matmul kernels (and so the rounding) depend on the strides,
        # and a factor from a QR is column-major; a reloaded model must compute bit-identically.
        self.U = nn.Parameter(_own(U), requires_grad=False)
        self.V = nn.Parameter(_own(V), requires_grad=False)
        self.core = nn.Parameter(_own(core))
        self.bias = None if bias is None else nn.Parameter(_own(bias), requires_grad=False)

    @property
    def rank(self) -> int:
        return self.core.shape[0]

    @property
    def weight_parameters(self) -> int:
        """Numbers the layer stores in place of the dense weight: (in + out) k + k² (bias apart)."""
        return self.U.numel() + self.V.numel() + self.core.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, C, V = (t if t.dtype == x.dtype else t.to(x.dtype) for t in (self.U, self.core, self.V))
        y = torch.matmul(torch.matmul(torch.matmul(x, V), C.T), U.T)
        if self.bias is not None:
            y = y + (self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype))
        return y

    def dense_weight(self) -> torch.Tensor:
        """U C Vᵀ, the [out, in] weight this layer applies (for checks; the forward never forms it)."""
        return self.U @ self.core @ self.V.T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


def factorized_modules(model: nn.Module) -> dict[str, FactorizedLinear]:
    """Every FactorizedLinear in the model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` in place of the module there."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def freeze_except(model: nn.Module, trained: list[str]) -> None:
    """Freeze every parameter except the FactorizedLinear cores and the modules named in `trained`."""
    model.requires_grad_(False)
    for module in factorized_modules(model).values():
        module.core.requires_grad_(True)
    for name in trained:
        model.get_submodule(name).requires_grad_(True)


# -------------------------------------------------------------------------------------- files


def save_factorized(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write the factorized layers and every other trainable parameter (trained heads) to `path`.

    Two files: `factorized_model.safetensors` (`<module>.U/.V/.core/.bias` per FactorizedLinear,
    and `<parameter name>` for each trainable parameter outside them, e.g. `classifier.weight`)
    and `factorized_config.json` (format name and version, rank and shape per module, the names
    of the trained tensors, the base model). A folder that already holds files is refused unless
    `overwrite`; the folder is written whole or not at all (`io.files.atomic_directory`). Returns
    the folder.
    """
    layers = factorized_modules(model)
    if not layers:
        raise AdapterFileError("the model has no FactorizedLinear layers to save; run jactus(model, ...) first")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors |= {f"{name}.{key}": value for key, value in layer.state_dict().items()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad and n not in tensors]
    tensors |= {n: p for n, p in model.named_parameters() if n in trained}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modules": {name: {"rank": layer.rank, "in_features": layer.in_features,
                           "out_features": layer.out_features, "bias": layer.bias is not None}
                    for name, layer in layers.items()},
        "trained": trained,
        "base_model_name_or_path": base_model_name(model),
    }
    with atomic_directory(path, overwrite) as folder:
        write_json(folder / CONFIG_NAME, config, sort_keys=True)
        write_tensors(folder / WEIGHTS_NAME, {k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()},
                      metadata={"format": "pt"})
    return Path(path)


def load_factorized(model: nn.Module, path: str | Path) -> nn.Module:
    """Rebuild the factorized layers saved in `path` on `model` (a fresh copy of the same base
    model, or one already factorized the same way) and copy the trained tensors in.

    Everything is checked before anything changes: the format, that every saved module exists
    and is a Linear (or FactorizedLinear) of the saved shape, and every tensor's shape; a refusal
    names the module and both shapes, and leaves the model untouched. Afterwards the model is in
    the state `jactus` leaves it: cores and the saved trained tensors trainable, all else frozen.
    """
    config, tensors = _read(Path(path))
    modules: dict[str, dict] = config["modules"]
    present = dict(model.named_modules())
    built: dict[str, FactorizedLinear] = {}
    for name, spec in modules.items():
        module = present.get(name)
        if module is None:
            raise ShapeMismatchError(f"{path} holds module {name!r}, which this model does not have")
        shape = _linear_shape(module)
        if shape is None:
            raise ShapeMismatchError(f"{name!r} is a {type(module).__name__}; the file needs a Linear there")
        saved = (spec["out_features"], spec["in_features"])
        if shape != saved:
            raise ShapeMismatchError(f"{name!r}: the file's layer is [out, in] = {list(saved)}, "
                                     f"the model's is {list(shape)}")
        k = spec["rank"]
        expected = {"U": (saved[0], k), "V": (saved[1], k), "core": (k, k)}
        if spec["bias"]:
            expected["bias"] = (saved[0],)
        for key, want in expected.items():
            got = tensors.get(f"{name}.{key}")
            if got is None:
                raise AdapterFileError(f"{path}: tensor {name}.{key} is missing")
            if tuple(got.shape) != want:
                raise ShapeMismatchError(f"{name}.{key}: file has shape {tuple(got.shape)}, rank {k} needs {want}")
        like = next(module.parameters())
        t = {key: tensors[f"{name}.{key}"].to(device=like.device, dtype=like.dtype) for key in expected}
        built[name] = FactorizedLinear(t["U"], t["core"], t["V"], t.get("bias"))
    params = dict(model.named_parameters())
    for key in config["trained"]:
        if key not in params:
            raise ShapeMismatchError(f"{path} holds trained tensor {key!r}, which this model does not have")
        if params[key].shape != tensors[key].shape:
            raise ShapeMismatchError(f"{key}: file has shape {tuple(tensors[key].shape)}, "
                                     f"model has {tuple(params[key].shape)}")
    for name, layer in built.items():
        replace_module(model, name, layer)
    with torch.no_grad():
        for key in config["trained"]:
            params[key].copy_(tensors[key])
    model.requires_grad_(False)
    for layer in built.values():
        layer.core.requires_grad_(True)
    for key in config["trained"]:
        params[key].requires_grad_(True)
    return model


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear or FactorizedLinear, None for anything else."""
    if isinstance(module, (nn.Linear, FactorizedLinear)):
        return module.out_features, module.in_features
    return None


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
        raise AdapterFileError(f"{path} is not a factorized model folder: it needs {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} (found {present})")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise AdapterFileError(f"{config_file} is not a {FORMAT} file (format {found!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{config_file}: format version {config.get('format_version')!r} is not supported "
                               f"(this splice reads version {FORMAT_VERSION})")
    if not isinstance(config.get("modules"), dict) or not isinstance(config.get("trained"), list):
        raise AdapterFileError(f"{config_file} lacks its 'modules' mapping or 'trained' list")
    for name, spec in config["modules"].items():
        fields = ("rank", "in_features", "out_features")
        if not isinstance(spec, dict) or not all(isinstance(spec.get(f), int) and spec[f] > 0 for f in fields) \
                or not isinstance(spec.get("bias"), bool):
            raise AdapterFileError(f"{config_file}: module {name!r} needs positive integer {', '.join(fields)} "
                                   f"and a boolean bias, got {spec!r}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{weights_file} is corrupt or unreadable: {err}") from None
    missing = [k for k in config["trained"] if k not in tensors]
    if missing:
        raise AdapterFileError(f"{weights_file} lacks trained tensors {missing[:5]} that its config lists")
    for key, tensor in tensors.items():
        problem = nonfinite_problem(tensor)
        if problem:
            raise AdapterFileError(f"{weights_file}: tensor {key} {problem}; a model loaded from it would "
                                   "compute NaN")
    return config, tensors
