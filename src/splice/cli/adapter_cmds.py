"""`splice inspect`, `splice info` and `splice merge`: look at models and adapters, fold them in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors
from splice.cli.output import Quiet, command, name_column, quieted

if TYPE_CHECKING:
    from torch import nn

    from splice.core.adapter_state import AdapterState
    from splice.merging.merge import MergeResult

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "inspect", inspect)
    command(app, "info", info)
    command(app, "merge", merge)


def _split(value: str | None) -> list[str] | str | None:
    """'all-linear' and regexes stay strings (PEFT's rule); comma-separated names become a list."""
    if value is None or value == "all-linear" or any(c in value for c in "*+?()[]|^$\\"):
        return value
    return [p.strip() for p in value.split(",") if p.strip()]


def inspect(
    model: Annotated[str, typer.Argument(help="'minilm', 'smollm2', or a local model folder.")],
    targets: Annotated[
        str | None,
        typer.Option(help="Names (comma-separated), a regex, or 'all-linear'. Default: the architecture's usual q/v."),
    ] = None,
    exclude: Annotated[str | None, typer.Option(help="Modules never targeted (same syntax).")] = None,
    layers: Annotated[str | None, typer.Option(help="Layer indices, e.g. '0,1,2' or '0-5'.")] = None,
    task: Annotated[
        str, typer.Option(help="auto | classification | causal_lm | base: which model class (and so module names).")
    ] = "auto",
    full: Annotated[bool, typer.Option("--full", help="List every module instead of folding repeated layers.")] = False,
) -> None:
    """Show a model's adaptable modules and which ones a target pattern selects.

    Example: splice inspect minilm --targets query,value --layers 0-2
    """
    import splice
    from splice.core.inventory import module_groups
    from splice.train.tasks import default_task, load_pretrained

    with user_errors():
        net = load_pretrained(model, default_task(model) if task == "auto" else task)
        config = splice.LoRA(targets=_split(targets), exclude=_split(exclude), layers=_parse_layers(layers))
        selected = {name for name, _ in splice.resolve_targets(net, config)}
    table = Table(title=f"{type(net).__name__}: modules that can host an adapter")
    name_column(table, "module")
    for column in ("type", "in->out", "selected"):
        table.add_column(column, justify="right" if column == "selected" else "left")
    for group in module_groups(net, selected):
        if full:
            rows = [(n, 1, int(n in selected)) for n in group.names]
        else:
            rows = [(group.pattern, len(group.names), group.selected)]
        for name, count, chosen in rows:
            mark = f"[green]{chosen}/{count}[/green]" if chosen else f"[dim]0/{count}[/dim]"
            table.add_row(name, group.type_name, group.shape, mark)
    console.print(table)
    console.print(f"[bold]{len(selected)}[/bold] modules selected by targets={config.targets or 'default'}")


def _parse_layers(value: str | None) -> list[int] | None:
    if not value:
        return None
    out: list[int] = []
    for part in value.split(","):
        low, _, high = part.partition("-")
        try:
            out += list(range(int(low), int(high) + 1)) if high else [int(low)]
        except ValueError:
            raise typer.BadParameter(f"takes layer numbers and ranges such as 0,2,4-7; got {part.strip()!r}",
                                     param_hint="--layers") from None
    return out


def info(
    adapter: Annotated[Path, typer.Argument(help="An adapter directory (splice's or HF PEFT's).")],
    modules: Annotated[bool, typer.Option("--modules", help="List every adapted module.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Describe an adapter directory without loading a model: method, ranks, size, portability.

    Example: splice info runs/rotten-tomatoes-lora/adapter
    """
    from splice.io.info import inspect_adapter

    with user_errors():
        found = inspect_adapter(adapter)
    if as_json:
        console.print_json(json.dumps({
            "path": str(found.path), "format": found.format, "method": found.method,
            "base_model": found.base_model, "adapter_parameters": found.adapter_parameters,
            "heads": found.heads, "file_bytes": found.file_bytes, "dtypes": found.dtypes,
            "modules": {m.name: {"rank": m.rank, "parameters": m.parameters} for m in found.modules},
            "portable_to_vllm": not found.portability, "portability_problems": found.portability,
        }))
        return
    table = Table(show_header=False, title=f"adapter {found.path}")
    table.add_column()
    name_column(table, "")  # a base model's folder, say
    ranks = sorted({m.rank for m in found.modules if m.rank is not None})
    for key, value in [
        ("format", "HF PEFT" if found.format == "peft" else "splice"),
        ("method", found.method),
        ("base model", found.base_model or "-"),
        ("modules", str(len(found.modules))),
        ("rank", ", ".join(map(str, ranks)) or "-"),
        ("alpha", str(found.config.get("lora_alpha", found.config.get("alpha", "-")))),
        ("adapter parameters", f"{found.adapter_parameters:,}"),
        ("trained heads", ", ".join(f"{h} ({n:,})" for h, n in found.heads.items()) or "-"),
        ("dtypes", ", ".join(found.dtypes)),
        ("file size", f"{found.file_bytes / 1024:,.1f} KiB"),
        ("portable to vLLM", "yes" if not found.portability else "no: " + "; ".join(found.portability)),
    ]:
        table.add_row(key, value)
    console.print(table)
    if modules:
        listing = Table()
        name_column(listing, "module")
        for column in ("rank", "parameters"):
            listing.add_column(column)
        for m in found.modules:
            listing.add_row(m.name, str(m.rank or "-"), f"{m.parameters:,}")
        console.print(listing)


Adapters = Annotated[list[Path], typer.Argument(help="Adapter directories (HF PEFT's or splice's format).")]
MergeOut = Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged adapter (or model, --into-base).")]
MergeMethod = Annotated[str, typer.Option(
    help="cat | linear | task_arithmetic | svd | ties | dare_ties | dare_linear | magnitude_prune | emr. cat and "
         "linear are exact; emr writes a unified folder plus one rebuilt adapter per input.")]
Weights = Annotated[str | None, typer.Option(help="One weight per adapter, comma-separated. Default: 1/n for cat, "
                                             "linear and svd; 1 for the others.")]
Density = Annotated[float | None, typer.Option(
    help="Fraction of entries kept by ties, dare_* and magnitude_prune (default 0.5).")]
MergeRank = Annotated[int | None, typer.Option(
    help="Rank of the result (svd: default the largest input rank; ties/dare/magnitude_prune: default the sum of "
         "ranks; emr: default exact).")]
Majority = Annotated[str | None, typer.Option(help="TIES sign election (ties, dare_ties): total | frequency "
                                               "(default total).")]
Seed = Annotated[int | None, typer.Option(help="Seed of DARE's random masks (dare_ties, dare_linear; default 0).")]
Heads = Annotated[str, typer.Option(help="Modules trained in full (classifier heads): average | first | none.")]
IntoBase = Annotated[bool, typer.Option("--into-base", help="Fold the (merged) adapter into its base model and save "
                                        "a plain transformers model instead of an adapter.")]
MergeBase = Annotated[str | None, typer.Option(
    help="Base model: 'minilm', 'smollm2' or a folder. Needed for --into-base and for DoRA inputs. Default: the "
         "adapters' recorded base model.")]
MergeForce = Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out folder.")]


def merge(
    adapters: Adapters,
    out: MergeOut,
    method: MergeMethod = "linear",
    weights: Weights = None,
    density: Density = None,
    rank: MergeRank = None,
    majority: Majority = None,
    seed: Seed = None,
    heads: Heads = "average",
    into_base: IntoBase = False,
    model: MergeBase = None,
    force: MergeForce = False,
    quiet: Quiet = False,
) -> None:
    """Merge adapters into one adapter (exact in weight-change space), or fold them into the base model.

    Correct for rsLoRA, DoRA, lora_bias and per-module ranks; the result is a PEFT LoRA folder
    (per-module ranks as rank_pattern) that splice and HF PEFT load.

    Examples:

      splice merge sentiment/ topics/ --method ties --weights 1,1 \\
          --density 0.5 --rank 16 --out merged

      splice merge runs/rotten-tomatoes-lora/adapter --into-base \\
          --model minilm --out merged-minilm
    """
    from splice.io.adapter_states import adapter_state, save_state
    from splice.io.files import check_output_dir
    from splice.merging import merge_adapters
    from splice.train.adapter_base import adapter_base

    with user_errors(), quieted(console, quiet) as tables:
        if len(adapters) == 1 and not into_base and method not in ("svd", "emr"):
            raise typer.BadParameter("one adapter: pass --into-base to fold it into its base model, or give "
                                     "several adapters to merge", param_hint="ADAPTERS")
        if into_base and method == "emr":
            raise typer.BadParameter("emr keeps one adapter per task; it has no single model to fold in",
                                     param_hint="--method")
        _check_used(method, density=density, majority=majority, seed=seed)
        numbers = _weights(weights)  # before any adapter loads
        check_output_dir(out, overwrite=force)  # refused before the work; written whole (or not at all) after it
        if into_base and len(adapters) == 1 and method == "linear" and rank is None and not weights:
            # the adapter as it is (any form, splice's own format too); a rank, weight or svd merges first
            _fold_one(adapters[0], model, out, force)
            return
        states = [adapter_state(path) for path in adapters]
        base = adapter_base(adapters[:1], model).load() if into_base or any(s.dora for s in states) else None
        if method == "emr":
            _unify(adapters, states, base, rank, out, force)
            return
        result = merge_adapters(states, method, weights=numbers,
                                density=0.5 if density is None else density, rank=rank,
                                majority=majority or "total", seed=seed or 0, base=base, heads=heads)
        if into_base:
            _fold_merged(result, base, out, force)
            return
        save_state(result.state, out, overwrite=force)
    _print_merge(result, tables)
    console.print(f"-> {out}")


def _weights(text: str | None) -> list[float] | None:
    """--weights as numbers (None: the method's default)."""
    if not text:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"takes one number per adapter, comma-separated (e.g. 0.7,0.3); got {text!r}",
                                 param_hint="--weights") from None


# The merge methods that read each option; an option given to another method would be ignored, so it is refused.
_OPTION_USERS = {"density": ("ties", "dare_ties", "dare_linear", "magnitude_prune"),
                 "majority": ("ties", "dare_ties"), "seed": ("dare_ties", "dare_linear")}


def _check_used(method: str, **given: object) -> None:
    """Refuse --density, --majority or --seed given to a merge method that does not read it (an
    unknown method is left to merge_adapters, which lists the methods)."""
    from splice.merging.merge import METHODS

    for option, value in given.items():
        if value is not None and method in (*METHODS, "emr") and method not in _OPTION_USERS[option]:
            raise typer.BadParameter(f"--method {method} does not use --{option} (only "
                                     f"{', '.join(_OPTION_USERS[option])} do); leave it out",
                                     param_hint=f"--{option}")


def _fold_one(adapter: Path, model: str | None, out: Path, force: bool) -> None:
    """Fold one adapter into its base model and save the plain model."""
    from splice.io.files import atomic_directory
    from splice.merging import fold_into_base
    from splice.train.adapter_base import adapter_base

    net = fold_into_base(adapter_base([adapter], model, task="auto").load(), adapter)
    with atomic_directory(out, overwrite=force) as folder:
        net.save_pretrained(folder)
    console.print(f"merged [bold]{adapter}[/bold] into {type(net).__name__} -> {out}")


def _unify(adapters: list[Path], states: list[AdapterState], base: nn.Module | None, rank: int | None, out: Path,
           force: bool) -> None:
    """EMR: one unified adapter (out/unified) and each task's adapter rebuilt from it (out/task-*)."""
    from splice.io.adapter_states import save_state
    from splice.io.files import atomic_directory
    from splice.merging import unify_adapters

    unified = unify_adapters(states, base=base)
    with atomic_directory(out, overwrite=force) as folder:
        unified.save(folder / "unified")
        for i, path in enumerate(adapters):
            save_state(unified.decouple(i, rank), folder / f"task-{i}-{path.name}")
    console.print(f"unified {len(adapters)} adapters -> {out}/unified (scales "
                  f"{[round(x, 4) for x in unified.unified.scales]}), rebuilt adapters in {out}/task-*")


def _fold_merged(result: MergeResult, base: nn.Module, out: Path, force: bool) -> None:
    """Fold the merged adapter into the loaded base model and save the plain model."""
    from splice.io.files import atomic_directory
    from splice.merging import fold_into_base

    fold_into_base(base, result.state)
    with atomic_directory(out, overwrite=force) as folder:
        base.save_pretrained(folder)
    console.print(f"{result.summary()}\nfolded into {type(base).__name__} -> {out}")


def _print_merge(result: MergeResult, tables: Console, limit: int = 40) -> None:
    """Per-module ranks and truncation errors to `tables` (a summary line alone for large models)."""
    if len(result.state.modules) > limit:
        tables.print(result.summary())
        return
    table = Table(title=result.summary())
    name_column(table, "module")
    for column in ("rank", "relative error"):
        table.add_column(column)
    for name, update in result.state.modules.items():
        table.add_row(name, str(update.rank), f"{result.errors.get(name, 0.0):.2e}")
    tables.print(table)
