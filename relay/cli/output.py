"""One way to show data: a rich table for people, JSON for scripts, built from the same rows.

stdout carries data only; progress, warnings and errors go to stderr.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated, Any, Iterable, Mapping, Sequence

import typer
from rich.console import Console
from rich.table import Table

# Rich would cut tables to 80 columns in a pipe or log; give those the room a wide terminal has.
_PIPE_WIDTH = 160
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True,
                 width=None if sys.stderr.isatty() else _PIPE_WIDTH)

JsonOption = Annotated[
    bool, typer.Option("--json", help="Write machine-readable JSON to stdout instead of a table.")
]


def snake_case(header: str) -> str:
    """'Drop counter' -> 'drop_counter': JSON keys are the column headers."""
    return re.sub(r"[^0-9a-z]+", "_", header.lower()).strip("_")


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def emit_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    as_json: bool,
    title: str | None = None,
) -> None:
    """Print rows as a table, or as a JSON list of objects keyed by snake_case column names."""
    rows = list(rows)
    if as_json:
        keys = [snake_case(c) for c in columns]
        emit_json([dict(zip(keys, row)) for row in rows])
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    stdout.print(table)


def emit_mapping(sections: Mapping[str, Mapping[str, Any]], *, as_json: bool) -> None:
    """Print named sections of key/value facts (one two-column table each), or one JSON object."""
    if as_json:
        emit_json({snake_case(name): dict(values) for name, values in sections.items()})
        return
    for name, values in sections.items():
        emit_table(("Item", "Value"), values.items(), as_json=False, title=name)


def progress(message: str) -> None:
    stderr.print(message)
