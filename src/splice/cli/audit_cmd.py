"""`splice audit`: can this adapter be trusted (provenance, weights, behaviour, contamination);
`splice keygen` and `splice sign`: the keys and signatures provenance checks."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from splice.cli.errors import user_errors
from splice.cli.output import Quiet, command, quieted, to_stderr
from splice.core.errors import AdapterFileError, SpliceError

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "audit", audit)
    command(app, "keygen", keygen)
    command(app, "sign", sign)


def audit(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder to audit (splice's or HF PEFT's format).",
                                            show_default=False)],
    model: Annotated[str | None, typer.Option(help="Its base model: minilm, smollm2 (bundled) or a local folder "
                                              "(default: the one the adapter records).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="In a folder of several adapters: the one whose weights and "
                                             "behaviour are audited (all have their provenance checked; default: "
                                             "the root's).", show_default=False)] = None,
    reference: Annotated[list[Path] | None, typer.Option(help="A benign adapter of the same base, repeatable: the "
                                                         "static audit scores each module against them (3 or "
                                                         "more).", show_default=False)] = None,
    public_key: Annotated[Path | None, typer.Option(help="PEM Ed25519 public key: the folder must carry a valid "
                                                    "signature by it (splice sign).", show_default=False)] = None,
    scan: Annotated[str | None, typer.Option(help="Behaviour scan: auto (a causal LM's trigger sweep; a "
                                             "classifier's trigger-word scan when --texts is given), on or off "
                                             "(default: auto).", show_default=False)] = None,
    triggers: Annotated[Path | None, typer.Option(help="Triggers to sweep instead of the built-in years, dates and "
                                                  "deployment strings: a file, one per line.",
                                                  show_default=False)] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts each trigger is put before: a file, one per line "
                                                 "(or .jsonl with text, for prompts of several lines).",
                                                 show_default=False)] = None,
    texts: Annotated[Path | None, typer.Option(help="Classifier scan: texts to insert candidate words into "
                                               "(one per line, or .jsonl with text).", show_default=False)] = None,
    suspect: Annotated[Path | None, typer.Option(help="Contamination test: the evaluation set the adapter may "
                                                 "have been trained on (.jsonl: prompt and completion, or "
                                                 "text).", show_default=False)] = None,
    control: Annotated[Path | None, typer.Option(help="Contamination test: comparable items it cannot have seen "
                                                 "(same format).", show_default=False)] = None,
    fail_on: Annotated[str | None, typer.Option(help="Exit with status 3 on: flag, warning (flags too) or never "
                                                "(default: flag).", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for audit.json, audit.md and the PNGs.",
                                             show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file of these settings (keys as the flags, with _ "
                                                "for -, paths read from the current folder) and a few of its own: "
                                                "template (default '{trigger}\\n{prompt}'), new_tokens (8), "
                                                "batch_size (8), cdd_samples (20), k (0.2); flags win.",
                                                show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
    quiet: Quiet = False,
) -> None:
    """Audit an adapter before you use it: exit status 0 when nothing is flagged, 3 when
    something is (--fail-on), 1 on an error.

    - Provenance: the SHA-256 manifest splice.save writes (files, tensors, the targeted base
    weights) and, with --public-key, its signature.

    - Static weight audit: per module, the weight change's norm relative to the base, top singular
    values and effective rank; outliers against --reference adapters (robust z-scores).

    - Behaviour scan: base vs base+adapter over trigger sweeps (years and dates in a prefix,
    deployment strings): token-level KL and changed greedy continuations, spikes flagged with
    their trigger; for a classifier, words whose insertion flips predictions.

    - Contamination (--suspect and --control): perplexity, Min-K% Prob and CDD of both sets,
    AUROC; CDD is unreliable after PEFT fine-tuning, the report says so.

    Examples:

      splice audit downloaded-adapter --model smollm2 --out audit-report

      splice audit my-lora --reference benign-1 --reference benign-2 \\
          --reference benign-3 --fail-on warning

      splice audit my-lora --public-key author.pub \\
          --suspect eval.jsonl --control fresh.jsonl
    """
    from splice.audit.settings import read_audit_settings

    flags = {"model": model, "name": name, "references": [str(r) for r in reference] if reference else None,
             "public_key": str(public_key) if public_key else None, "scan": scan,
             "triggers": str(triggers) if triggers else None, "prompts": str(prompts) if prompts else None,
             "texts": str(texts) if texts else None, "suspect": str(suspect) if suspect else None,
             "control": str(control) if control else None, "fail_on": fail_on, "out": str(out) if out else None}
    with user_errors(), quieted(console, quiet) as tables:
        settings = read_audit_settings(config, flags)
        report = _run(adapter, settings, tables, force)
        if settings.out is not None:
            report.write(settings.out, overwrite=force)
    _print(report, settings.out, quiet)
    raise typer.Exit(report.exit_code(settings.fail_on))


def _run(adapter: Path, settings: Any, tables: Console, force: bool) -> Any:
    """Load the base and what the settings name, then audit."""
    from transformers import AutoTokenizer

    from splice.audit.runner import ScanSettings, unloadable_audit
    from splice.audit.runner import audit as run_audit
    from splice.audit.settings import read_items, read_lines
    from splice.io.files import check_output_dir
    from splice.io.info import inspect_adapter
    from splice.train.adapter_base import adapter_base
    from splice.train.tasks import model_path

    if settings.out is not None:
        check_output_dir(Path(settings.out), overwrite=force)  # refused before the work
    try:
        base = adapter_base([adapter], settings.model)
    except AdapterFileError as err:  # unreadable: tampering when the manifest shows it, else the error
        return unloadable_audit(adapter, err, name=settings.name, public_key=settings.public_key,
                                settings=asdict(settings))
    causal = base.task == "causal_lm"
    scanning = settings.scan == "on" or (settings.scan == "auto" and (causal or settings.texts is not None))
    if scanning and not causal and settings.texts is None:
        raise SpliceError("--scan on: a classifier's scan inserts words into texts; pass --texts")
    needs_tokenizer = scanning or settings.suspect is not None
    recorded = inspect_adapter(adapter).base_model if settings.model is not None else None
    other = f"; the adapter records {recorded}" if recorded and not _same_model(recorded, base.model) else ""
    tables.print(f"auditing {adapter} on {base.model} ({base.task}){other}", highlight=False)
    model = base.load().eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path(base.model)) if needs_tokenizer else None
    scan = ScanSettings(
        triggers=read_lines(settings.triggers) if settings.triggers else None,
        prompts=read_lines(settings.prompts) if settings.prompts else None, template=settings.template,
        texts=read_lines(settings.texts) if settings.texts else None, new_tokens=settings.new_tokens,
        batch_size=settings.batch_size) if scanning else None
    contamination = {"k": settings.k, "cdd_samples": settings.cdd_samples, "batch_size": settings.batch_size}
    return run_audit(adapter, model, tokenizer, name=settings.name, settings=asdict(settings),
                     references=[Path(r) for r in settings.references],
                     public_key=settings.public_key, scan=scan,
                     suspect=read_items(settings.suspect) if settings.suspect else None,
                     control=read_items(settings.control) if settings.control else None, contamination=contamination)


def _same_model(recorded: str, given: str) -> bool:
    """Whether the base an adapter records is the one given (a Hub id and its bundled copy are)."""
    from splice.train.tasks import model_path

    try:
        return model_path(recorded) == model_path(given)
    except SpliceError:  # a base neither bundled nor here
        return recorded == given


def _print(report: Any, out: str | None, quiet: bool) -> None:
    """The findings as a table (not with --quiet), then the closing line."""
    from rich.table import Table

    counts = ", ".join(f"{report.count(s)} {s}(s)" for s in ("flag", "warning", "note"))
    if quiet:  # no table, but every flag and warning on a line of its own (stderr), so a CI log says why
        for finding in report.findings:
            if finding.severity != "note":
                to_stderr(f"{finding.severity}: {finding.check}: {finding.subject}: {finding.message}", markup=False)
        console.print(counts + (f"; report in {out}" if out else ""), highlight=False)
        return

    table = Table(title=f"audit of {report.adapter}", show_lines=False)
    for column in ("severity", "check", "subject", "finding"):
        table.add_column(column, overflow="fold")
    colour = {"flag": "red", "warning": "yellow", "note": "dim"}
    for finding in sorted(report.findings, key=lambda f: ("flag", "warning", "note").index(f.severity)):
        table.add_row(f"[{colour[finding.severity]}]{finding.severity}[/]", finding.check, finding.subject,
                      finding.message)
    console.print(table)
    console.print(f"{counts}" + (f"; report in {out}" if out else ""), highlight=False)


def keygen(
    private: Annotated[Path, typer.Argument(help="Where to write the private key (PEM; keep it secret).",
                                            show_default=False)],
    public: Annotated[Path | None, typer.Option(help="Where to write the public key (default: PRIVATE with "
                                                ".pub).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
) -> None:
    """Make an Ed25519 key pair to sign adapters with (splice sign, or splice.save(sign_with=...)).

    Example:

      splice keygen ~/.splice/me.pem        # writes me.pem (mode 600) and me.pub
    """
    from splice.io.signing import generate_key

    with user_errors():
        written = generate_key(private, public or private.with_suffix(".pub"), overwrite=force)
    console.print(f"private key {written[0]} (keep it secret), public key {written[1]} (share it)", highlight=False)


def sign(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder (saved by splice, with its manifest).",
                                            show_default=False)],
    key: Annotated[Path, typer.Option(help="PEM Ed25519 private key (splice keygen).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing signature.")] = False,
) -> None:
    """Sign an adapter folder's manifest (and, in a folder of several adapters, each one's), so
    that users can check who wrote it (splice audit --public-key, splice.load(public_key=...)).

    Example:

      splice sign runs/my-lora/adapter --key ~/.splice/me.pem
    """
    from splice.io.signing import sign_tree

    with user_errors():
        written = sign_tree(adapter, key, overwrite=force)
    console.print("signed: " + ", ".join(str(w) for w in written), highlight=False)
