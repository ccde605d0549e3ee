"""`fastrelay stats`: a running relay's counters, asked over its control socket.

Which relay: --socket PATH, else --pid N, else the only live relay recorded in the relays
directory (relay/control.py). The table view flattens nested counters into dotted rows
(`counters.objects_in`); `--json` writes the relay's reply as one object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.markup import escape

from relay import control
from relay.cli.output import JsonOption, emit_json, emit_table
from relay.errors import FastrelayError

PidOption = Annotated[
    int | None, typer.Option("--pid", metavar="PID", help="The relay to ask, by process id.")
]
SocketOption = Annotated[
    Path | None,
    typer.Option("--socket", metavar="PATH",
                 help="Ask the relay on this control socket instead of looking it up."),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", metavar="S", min=0.01, help="Wait this long for the reply.")
]


def choose_socket(pid: int | None, sock: Path | None) -> Path:
    """The control socket to ask, or a one-line error saying why there is none."""
    if sock is not None:
        return sock
    directory = control.relays_dir()
    if pid is not None:
        path = control.socket_path(pid, directory)
        if not path.exists():
            raise FastrelayError(f"no running fastrelay relay with pid {pid} (no control "
                                 f"socket {path})")
        return path
    if directory.is_dir() and not os.access(directory, os.R_OK | os.X_OK):
        raise FastrelayError(f"cannot read {directory}: permission denied (it belongs to the "
                             "relays' user; rerun as that user or root)")
    relays = [r for r in control.running_relays(directory)
              if control.socket_path(r.pid, directory).exists()]
    if not relays:
        dead = sorted(int(p.stem) for p in directory.glob("*.json")
                      if p.stem.isdigit() and not control.pid_alive(int(p.stem)))
        left = "" if not dead else (
            f"; {', '.join(map(str, dead))} died without cleaning up: run 'fastrelay cleanup' "
            "as root")
        raise FastrelayError(f"no running fastrelay relay (no live relay's control socket in "
                             f"{directory}{left})")
    if len(relays) > 1:
        pids = ", ".join(str(r.pid) for r in relays)
        raise FastrelayError(f"{len(relays)} fastrelay relays are running (pids {pids}); "
                             "choose one with --pid")
    return control.socket_path(relays[0].pid, directory)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict) and not value:
        return "none"
    return str(value)


def _is_traffic(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"packets", "bytes"}


def flatten(stats: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Rows (dotted key, shown value); a {packets, bytes} pair (a reason's count) stays one
    row, as do empty maps."""
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not _is_traffic(value):
            yield from flatten(value, f"{name}.")
        elif _is_traffic(value):
            yield name, f"{value['packets']} packets, {value['bytes']} bytes"
        else:
            yield name, _value(value)


def stats_command(
    pid: PidOption = None,
    sock: SocketOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = control.DEFAULT_TIMEOUT,
) -> None:
    """A running relay's counters: sessions, objects, bytes, fast-path punts and drops."""
    path = choose_socket(pid, sock)
    reply = control.query(path, "stats", timeout)
    reply.pop("ok", None)
    if as_json:
        emit_json(reply)
        return
    stats = dict(reply.get("stats") or {})
    fastpath = stats.pop("fastpath", None)
    ctl = reply.get("control") or {}
    relay_rows = [("pid", reply.get("pid")), ("listen", reply.get("listen")),
                  ("started", reply.get("started")), ("uptime_s", reply.get("uptime_s")),
                  ("control requests", ctl.get("requests")),
                  ("control errors", ctl.get("errors"))]

    def show(title: str, rows: Any) -> None:
        emit_table(("Item", "Value"), [(escape(str(k)), escape(_value(v))) for k, v in rows],
                   as_json=False, title=title)

    show("Relay", relay_rows)
    show("Counters", flatten(stats))
    if isinstance(fastpath, dict):
        show("Fast path", flatten(fastpath))
    elif fastpath is not None:
        show("Fast path", [("fastpath", fastpath)])
