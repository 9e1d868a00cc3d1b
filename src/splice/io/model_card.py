"""The README.md model card of every adapter folder splice writes, as PEFT writes one.

Front matter (YAML) with the keys PEFT's `create_or_update_model_card` writes and the Hub reads:
`base_model` (only when it is a Hub id; a local path would mean nothing there), `library_name`
("peft" for a file in PEFT's format, so the Hub offers PEFT's loading snippet; "splice"
otherwise), `tags` (the method and "base_model:adapter:<base>", as PEFT tags them, and
"splice") and, for a causal LM, `pipeline_tag: text-generation`. Then what the adapter is:
method, targets, rank, trainable parameters, and the metrics when a training run wrote it.

A README.md a user wrote is never overwritten silently. The generated part sits between two
markers, and when a folder is written again:
- a README with the markers gets only the part between them replaced; the user's text around
  them and the front-matter keys splice does not write (license, datasets, ...) are kept;
- a README without them (written by a user, or PEFT's template) keeps all of its text: the keys
  above are updated in its front matter (tags merged) and the generated part is appended;
- a README whose front matter is not valid YAML is left exactly as it was, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

import splice
from splice.io.adapter_files import CARD_NAME, WEIGHTS_NAME
from splice.io.base_names import is_repo_id
from splice.io.files import write_text
from splice.io.info import AdapterInfo, summarize

START = "<!-- splice:model-card: generated on every save; text outside these two markers is kept -->"
END = "<!-- /splice:model-card -->"
OWNED_KEYS = ("base_model", "library_name", "pipeline_tag")


@dataclass(frozen=True)
class CardEntry:
    """One adapter a card describes: its name, its subfolder ("" for the root) and its files."""

    name: str
    subfolder: str
    info: AdapterInfo


def card_entry(name: str, subfolder: str, folder: Path, config: dict[str, Any],
               tensors: dict[str, torch.Tensor]) -> CardEntry:
    """The entry of an adapter just written into `folder` (`subfolder` of the folder being written)."""
    return CardEntry(name, subfolder, summarize(folder, config, tensors, (folder / WEIGHTS_NAME).stat().st_size))


def write_card(folder: Path, entries: list[CardEntry], *, metrics: Mapping[str, Any] | None = None,
               previous: Path | None = None) -> None:
    """Write `folder`/README.md describing `entries`, merged with the README at `previous` (the
    one of the folder being replaced) as the module doc says."""
    generated = render(entries, metrics)
    old = _read(previous)
    write_text(folder / CARD_NAME, generated if old is None else merge(old, generated, previous))


def write_cards(folder: Path, entries: list[CardEntry], *, metrics: Mapping[str, Any] | None = None,
                replacing: Path | None = None) -> None:
    """The cards of a folder just written: at its root one for all its adapters, in each subfolder
    one for its own; each merged with the README of the folder `replacing` it replaces."""
    write_card(folder, entries, metrics=metrics, previous=replacing / CARD_NAME if replacing else None)
    for entry in entries:
        if entry.subfolder:
            write_card(folder / entry.subfolder, [entry],
                       previous=replacing / entry.subfolder / CARD_NAME if replacing else None)


def carry_over(previous: Path, card: Path) -> None:
    """Merge the README at `previous` into the just generated `card`, when there is one (for a
    card written aside and then moved over `previous`)."""
    old = _read(previous)
    if old is not None:
        write_text(card, merge(old, card.read_text(encoding="utf-8"), previous))


def render(entries: list[CardEntry], metrics: Mapping[str, Any] | None = None) -> str:
    """The whole generated card for these adapters."""
    bases = sorted({e.info.base_model for e in entries if e.info.base_model})
    front: dict[str, Any] = {}
    hub_bases = [b for b in bases if is_repo_id(b)]
    if hub_bases:
        front["base_model"] = hub_bases[0] if len(hub_bases) == 1 else hub_bases
    front["library_name"] = "peft" if all(e.info.format == "peft" for e in entries) else "splice"
    tags = {e.info.method for e in entries} | {f"base_model:adapter:{b}" for b in hub_bases} | {"splice"}
    tags |= {"lora"} if "dora" in tags else set()  # PEFT tags a DoRA adapter by its peft_type, LORA
    front["tags"] = sorted(tags)
    if any(e.info.config.get("task_type") == "CAUSAL_LM" for e in entries):
        front["pipeline_tag"] = "text-generation"
    methods = "/".join(sorted({e.info.method for e in entries}))
    lines = [START, f"# {methods} adapter{'s' if len(entries) > 1 else ''} for {bases[0] if bases else 'a model'}",
             ""]
    lines += _loading(entries)
    for entry in entries:
        if len(entries) > 1:
            lines += ["", f"## {entry.name}" + (f" (`{entry.subfolder}/`)" if entry.subfolder else " (the root)")]
        lines += ["", *_facts(entry.info)]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_number(value)} |" for name, value in _flat(metrics).items()]
    lines += ["", "### Framework versions", "", f"- splice {splice.__version__}", END]
    return _join(front, "\n".join(lines) + "\n")


def _loading(entries: list[CardEntry]) -> list[str]:
    """How to load the folder, in the library its files are for."""
    if all(e.info.format == "peft" for e in entries):
        nested = " (`subfolder=NAME` for an adapter in a subfolder)" if any(e.subfolder for e in entries) else ""
        return [f"Written by splice in HF PEFT's format: `PeftModel.from_pretrained(base_model, path)` loads "
                f"it{nested}, and so does `splice.load(model, path)`."]
    return ["Written by splice in its own format (the method is not one PEFT has): load it with "
            "`splice.load(model, path)`."]


def _facts(info: AdapterInfo) -> list[str]:
    leaves = sorted({m.name.rsplit(".", 1)[-1] for m in info.modules})
    ranks = sorted({m.rank for m in info.modules if m.rank is not None})
    trainable = f"{info.adapter_parameters:,} in the adapter"
    if info.heads:
        trainable += f" + {sum(info.heads.values()):,} in modules trained in full ({', '.join(info.heads)})"
    return ["| | |", "|---|---|", f"| method | {info.method} |",
            f"| targets | {', '.join(leaves) or '-'} ({len(info.modules)} modules) |",
            f"| rank | {', '.join(map(str, ranks)) or '-'} |", f"| trainable parameters | {trainable} |"]


def merge(previous: str, generated: str, where: Path | None = None) -> str:
    """`previous` (a README already there) with the `generated` card merged in, as the module doc says."""
    try:
        front, body = _split(previous)
    except ValueError as err:
        warnings.warn(f"{where}: its front matter is not valid YAML ({err}); the README was left as it was",
                      stacklevel=3)
        return previous
    new_front, new_body = _split(generated)
    merged = dict(front or {})
    merged.update({key: new_front[key] for key in OWNED_KEYS if key in new_front})
    merged["tags"] = sorted(set(_as_list(merged.get("tags"))) | set(new_front.get("tags", [])))
    if START in body and END in body[body.index(START):]:
        start, end = body.index(START), body.index(END, body.index(START)) + len(END)
        body = body[:start] + new_body.strip() + body[end:]
    else:
        body = body.rstrip() + "\n\n" + new_body
    return _join(merged, body)


def _split(text: str) -> tuple[dict[str, Any] | None, str]:
    """(front matter, body) of a README; ValueError if its front matter is not a YAML mapping."""
    if not text.startswith("---\n"):
        return None, text
    end = text.find("\n---", 3)
    if end < 0:
        raise ValueError("the front matter has no closing ---")
    try:
        front = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError as err:
        raise ValueError(str(err).splitlines()[0]) from None
    if not isinstance(front, dict):
        raise ValueError(f"the front matter is a {type(front).__name__}, not a mapping")
    return front, text[end + 4:].lstrip("\n")


def _join(front: dict[str, Any], body: str) -> str:
    return f"---\n{yaml.safe_dump(front, sort_keys=False, allow_unicode=True)}---\n\n{body}"


def _read(path: Path | None) -> str | None:
    """The README at `path`, if there is one; bytes that are not UTF-8 survive the round trip."""
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape") if path and path.is_file() else None
    except OSError:
        return None


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)] if value else []


def _flat(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics ({"validation": {"accuracy": 0.9}}) as one level ("validation accuracy")."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        flat |= _flat(value, f"{name} ") if isinstance(value, Mapping) else {name: value}
    return flat


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
