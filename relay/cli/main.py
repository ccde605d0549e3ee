"""The `fastrelay` command: a root with one sub-command module per noun.

Every FastrelayError surfaces as `error: <message>` on one line and exit status 1;
usage errors exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from relay import __version__, publisher, subscriber
from relay.cli import bench, cleanup_cmd, demo, lab, probe, relay_cmd, stats_cmd
from relay.errors import FastrelayError

app = typer.Typer(
    name="fastrelay",
    help="Media-over-QUIC relay with an eBPF fast path on TC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    # Boxes and colours for people at a terminal; plain click output for pipes and logs.
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
)
app.add_typer(lab.app, name="lab", rich_help_panel="Lab")
app.command("probe", rich_help_panel="Machine")(probe.probe)
app.command("demo", rich_help_panel="Lab")(demo.demo)
app.command("publish", rich_help_panel="MoQ")(publisher.publish_command)
app.command("subscribe", rich_help_panel="MoQ")(subscriber.subscribe_command)
app.command("relay", rich_help_panel="MoQ")(relay_cmd.relay_command)
app.command("stats", rich_help_panel="MoQ")(stats_cmd.stats_command)
app.command("cleanup", rich_help_panel="Machine")(cleanup_cmd.cleanup_command)
app.command("bench", rich_help_panel="Lab")(bench.bench_command)

_debug = False


def _show_version(value: bool) -> None:
    if value:
        print(f"fastrelay {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    global _debug
    _debug = debug
    # Libraries (aioquic's "quic" logger among them) would print their warnings beside our
    # one-line errors; they are for --debug.
    logging.basicConfig(level=logging.DEBUG if debug else logging.CRITICAL,
                        format="%(levelname)s %(name)s: %(message)s")


def relay_shorthand(argv: list[str]) -> list[str]:
    """`fastrelay [--debug] --crypto X [relay options]`, the form users know, is
    `fastrelay [--debug] relay --crypto X [relay options]`."""
    leading = 0
    while leading < len(argv) and argv[leading] == "--debug":
        leading += 1
    rest = argv[leading:]
    if rest and (rest[0] == "--crypto" or rest[0].startswith("--crypto=")):
        return [*argv[:leading], "relay", *rest]
    return argv


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    argv = relay_shorthand(sys.argv[1:] if argv is None else argv)
    try:
        command.main(args=argv, prog_name="fastrelay", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except FastrelayError as exc:
        if _debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug, not a user mistake: still one line unless --debug
        if _debug:
            raise
        print(f"error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1
    return 0


def console_main() -> None:
    sys.exit(main())
