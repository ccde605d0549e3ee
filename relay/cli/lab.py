"""`fastrelay lab up|down|status|exec`: the network-namespace lab (hw/lab.py)."""

from __future__ import annotations

import subprocess
import time
from typing import Annotated, Any, Optional

import typer

from relay.cli.output import JsonOption, emit_json, emit_table, progress, stdout
from relay.errors import FastrelayError, NotFoundError

app = typer.Typer(help="Bring the namespace lab up and down, inspect it, run commands in it.",
                  no_args_is_help=True)

# Loss and rate are of what arrives at the interface (rate in bit/s, 0 = no limit).
_HOST_COLUMNS = ("Host", "Role", "Namespace", "Interface", "Peer", "IPv4", "IPv6", "MTU", "Loss",
                 "Rate in")
_STATUS_COLUMNS = ("Host", "Role", "Namespace", "Present", "Interface", "Peer", "IPv4", "IPv6",
                   "MTU", "Loss", "Rate in", "Packets in", "Dropped in")
_LIST_COLUMNS = ("Name", "Topology", "Status", "Hosts", "Links", "Namespaces", "Created", "PID")


def _host_rows(lab: Any) -> list[tuple[Any, ...]]:
    return [
        (h.name, h.role, h.netns, i.name, i.peer, str(i.ipv4), str(i.ipv6), i.mtu, i.loss,
         i.rate)
        for h in lab.hosts.values() for i in h.interfaces
    ]


@app.command("up")
def up(
    topology: Annotated[str, typer.Argument(
        help="A topology name from hw/topologies/ or a path to a .toml file.")] = "default",
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Lab name (default: <topology>-<4 hex digits>).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a lab: one namespace per host, veth pairs, addresses, loss programs."""
    from hw.lab import Lab
    from hw.topology import load_topology

    topo = load_topology(topology)  # validate before asking for root
    started = time.monotonic()
    lab = Lab.up(topo, name=name)
    progress(f"lab {lab.name} is up: {len(lab.hosts)} hosts, {len(topo.links)} links "
             f"({time.monotonic() - started:.1f} s); "
             f"remove it with `fastrelay lab down {lab.name}`")
    rows = _host_rows(lab)
    if as_json:
        keys = ["host", "role", "namespace", "interface", "peer", "ipv4", "ipv6", "mtu", "loss",
                "rate_in"]
        emit_json({"name": lab.name, "topology": topo.name,
                   "interfaces": [dict(zip(keys, r)) for r in rows]})
        return
    stdout.print(lab.name)
    emit_table(_HOST_COLUMNS, rows, as_json=False, title=f"lab {lab.name} ({topo.name})")


@app.command("down")
def down(
    name: Annotated[Optional[str], typer.Argument(help="The lab to remove.")] = None,
    all_labs: Annotated[bool, typer.Option(
        "--all", help="Remove every lab on this machine.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Confirm --all.")] = False,
) -> None:
    """Remove a lab (namespaces, links, filters, pins, state), even a half-built one."""
    from hw.lab import down_lab, list_labs

    if (name is None) == (not all_labs):
        raise typer.BadParameter("give a lab NAME or --all, not both or neither")
    if name is not None:
        if down_lab(name):
            progress(f"lab {name} removed")
        else:
            progress(f"lab {name}: nothing to remove")
        return
    names = [info.name for info in list_labs()]
    if not names:
        progress("no labs to remove")
        return
    if not yes:
        raise FastrelayError(f"lab down --all would remove {len(names)} lab(s) "
                             f"({', '.join(names)}); rerun with --yes")
    for n in names:
        down_lab(n)
        progress(f"lab {n} removed")


@app.command("status")
def status(
    name: Annotated[Optional[str], typer.Argument(
        help="A lab to show in detail; without it, list every lab.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List labs, or show one lab's hosts, interfaces, addresses and loss counters."""
    from hw.lab import Lab, list_labs

    if name is None:
        rows = [(i.name, i.topology, i.status, i.hosts, i.links, i.namespaces_present,
                 i.created, i.pid) for i in list_labs()]
        emit_table(_LIST_COLUMNS, rows, as_json=as_json, title="labs")
        return
    lab = Lab.attach(name)
    info = next((i for i in list_labs() if i.name == name), None)
    rows = lab.status_rows()
    if as_json:
        emit_json({"name": lab.name, "topology": lab.topology.name,
                   "status": info.status if info else lab.status, "created": lab.created,
                   "interfaces": rows})
        return
    table = [tuple("yes" if v is True else "no" if v is False else v for v in r.values())
             for r in rows]
    emit_table(_STATUS_COLUMNS, table, as_json=False,
               title=f"lab {lab.name} ({lab.topology.name}, {info.status if info else lab.status})")


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_(
    host: Annotated[str, typer.Argument(help="The host to run in (e.g. sub1).")],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    lab_name: Annotated[Optional[str], typer.Option(
        "--lab", help="The lab (may be omitted when only one lab exists).")] = None,
) -> None:
    """Run a command inside a host (`ip netns exec`); exits with the command's status."""
    from hw.lab import Lab, list_labs
    from relay.bpfload import require_root

    require_root("lab exec")
    if lab_name is None:
        labs = [i.name for i in list_labs()]
        if not labs:
            raise NotFoundError("no lab exists; start one with `fastrelay lab up`")
        if len(labs) > 1:
            raise FastrelayError(f"{len(labs)} labs exist ({', '.join(labs)}); "
                                 f"choose one with --lab")
        lab_name = labs[0]
    if command and command[0] == "--":  # click keeps it once options are closed
        command = command[1:]
    if not command:
        raise typer.BadParameter("give the command to run after --")
    lab = Lab.attach(lab_name)
    argv = lab.command(host, command)
    try:
        code = subprocess.run(argv).returncode
    except FileNotFoundError:
        raise FastrelayError(
            "the `ip` command (iproute2) is not installed; run hw/setup.sh") from None
    raise typer.Exit(code)
