"""`fastrelay lab ...`: the network-namespace lab (placeholder, filled by the lab work)."""

import typer

app = typer.Typer(help="Bring the namespace lab up and down, inspect it, run commands in it.",
                  no_args_is_help=True)
