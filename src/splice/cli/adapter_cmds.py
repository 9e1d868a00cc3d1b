"""`splice inspect`, `splice info` and `splice merge`: look at models and adapters, fold them in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from splice.cli.errors import user_errors

console = Console()


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("info")(info)
    app.command("merge")(merge)


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
    for column in ("module", "type", "in->out", "selected"):
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
        out += list(range(int(low), int(high) + 1)) if high else [int(low)]
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
        listing = Table("module", "rank", "parameters")
        for m in found.modules:
            listing.add_row(m.name, str(m.rank or "-"), f"{m.parameters:,}")
        console.print(listing)


def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory to fold into its base model.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model (save_pretrained format).")],
    model: Annotated[
        str | None,
        typer.Option(help="Base model: 'minilm', 'smollm2' or a folder. Default: the adapter's recorded base model."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty --out folder.")] = False,
) -> None:
    """Merge an adapter into its base model and save a plain transformers model.

    Example: splice merge runs/rotten-tomatoes-lora/adapter --model minilm --out merged-minilm
    """
    import splice
    from splice.io.files import prepare_output_dir
    from splice.io.info import inspect_adapter
    from splice.train.tasks import load_pretrained

    with user_errors():
        found = inspect_adapter(adapter)
        base = model or found.base_model
        if not base:
            raise typer.BadParameter("the adapter names no base model; pass --model", param_hint="--model")
        prepare_output_dir(out, overwrite=force)
        labels = tuple(str(i) for i in range(num_labels(adapter, list(found.heads))))
        net = load_pretrained(base, _task_of(found.config), labels)
        splice.load(net, adapter)
        splice.unload(net)
        net.save_pretrained(out)
    console.print(f"merged [bold]{adapter}[/bold] into {type(net).__name__} -> {out}")


def _task_of(config: dict) -> str:
    return {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}.get(config.get("task_type"), "base")


def num_labels(path: Path, heads: list[str]) -> int:
    """A classification head's output size: rows of its last saved weight (2 if none)."""
    from splice.io.files import read_weights

    weights = [v for k, v in sorted(read_weights(path).items())
               if k.endswith("weight") and any(f".{h}." in f".{k}" for h in heads)]
    return weights[-1].shape[0] if weights else 2
