"""Options that several commands share, as typer `Annotated` aliases: one declaration and one
help text per option, so that `--model` or `--force` reads the same in every command."""

from __future__ import annotations

from typing import Annotated

import typer

Model = Annotated[str | None, typer.Option(help="minilm, smollm2 (bundled) or a local model folder.")]
Task = Annotated[str | None, typer.Option(help="classification or causal_lm.")]
Data = Annotated[str | None, typer.Option(help="Bundled data set (rotten_tomatoes, bbc_news, arithmetic, "
                                          "iris, ...) or a .jsonl/.csv file.")]
BatchSize = Annotated[int | None, typer.Option(help="Examples per forward pass.")]
Precision = Annotated[str | None, typer.Option(help="Mixed precision: no, bf16 or fp16.")]
# The column names of a data file: the config's text_column, label_column, prompt_column, completion_column.
TextColumn = Annotated[str | None, typer.Option(help="Column of a data file holding the text to classify "
                                                "(default: text).", show_default=False)]
LabelColumn = Annotated[str | None, typer.Option(help="Column of a data file holding the class, an index or a "
                                                 "name (default: label).", show_default=False)]
PromptColumn = Annotated[str | None, typer.Option(help="causal_lm: column of a data file holding the prompt "
                                                  "(default: prompt).", show_default=False)]
CompletionColumn = Annotated[str | None, typer.Option(help="causal_lm: column of a data file holding the "
                                                      "completion, where the loss is (default: completion).",
                                                      show_default=False)]
ForceOut = Annotated[bool, typer.Option("--force", help="Write into a non-empty --out folder.")]
