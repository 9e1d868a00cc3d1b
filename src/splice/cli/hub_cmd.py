"""`splice push`: upload an adapter folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from splice.cli.errors import user_errors
from splice.cli.output import command

console = Console()


def register(app: typer.Typer) -> None:
    command(app, "push", push)


def push(
    folder: Annotated[Path, typer.Argument(help="An adapter folder (splice's or HF PEFT's, one adapter or several "
                                                "in subfolders), as splice.save wrote it.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repo, 'owner/name'; created if it does not exist.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps "
                                                            "its visibility).")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to push to (created from main if missing); "
                                                      "default: main.")] = None,
    message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
) -> None:
    """Upload an adapter folder to a Hub repo, where `PeftModel.from_pretrained(base, REPO_ID)` and
    `splice.load(model, REPO_ID)` find it. Uses the login of `hf auth login` (or HF_TOKEN). Every
    adapter in the folder is read first: a corrupt or incomplete one is refused before any upload.

    Example: splice push runs/rotten-tomatoes-lora/adapter \\
                 me/minilm-rotten-tomatoes-lora --private
    """
    from splice.io.hub import push_folder

    with user_errors():
        url = push_folder(folder, repo_id, private=private, revision=revision, commit_message=message)
    console.print(f"pushed {folder} to {repo_id}: {url}", soft_wrap=True)  # a URL stays whole
