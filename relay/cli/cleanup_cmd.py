"""`fastrelay cleanup`: remove what a killed relay left in the kernel.

1. Every `<pid>.json` record in the relays directory (relay/control.py) whose process is
   dead: each TC filter it recorded is deleted, in the recorded namespace, by parent, prio
   and handle, only while the filter there is still a BPF program named `fastpath_*` or
   `shim_*` that no live process holds; then the record and the stale socket go.
2. This network namespace's interfaces: bpf filters named `fastpath_*` / `shim_*` on clsact
   ingress/egress that no live relay recorded and no live process holds a descriptor of.
3. Pins of dead relays under /sys/fs/bpf/fastrelay/relays/<pid>...

A filter whose program some live process still holds (a running relay, a test, the lab) is
never touched, whatever the records say; the lab's lossy_link filters never match the names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer

from relay import control
from relay.bpfload import require_root
from relay.cli.output import JsonOption, emit_table, stdout
from relay.control import (
    HOOKS,
    OURS,
    Attachment,
    Filter,
    RelayRecord,
    bpf_filters,
    held_programs,
    tc_handle,
)
from relay.errors import FastrelayError

NETNS_DIR = Path("/run/netns")
COLUMNS = ("Action", "What", "Where", "Detail")

DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
]


@dataclass
class Row:
    action: str
    what: str
    where: str
    detail: str

    def cells(self) -> tuple[str, str, str, str]:
        return (self.action, self.what, self.where, self.detail)


def _ifname(ipr: Any, ifindex: int) -> str:
    """The interface's name, or its index when it is gone."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        links = ipr.get_links(ifindex)
    except NetlinkError:
        return str(ifindex)
    return next((link.get_attr("IFLA_IFNAME") for link in links), None) or str(ifindex)


def _where(netns: str | None, ifname: str | int, parent: str, prio: int) -> str:
    ns = f"netns {netns}" if netns else "this netns"
    return f"{ns}, {ifname} {HOOKS.get(parent, parent)} prio {prio}"


def _delete(ipr: Any, f: Filter) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("del-filter", "bpf", index=f.ifindex, handle=f.handle, parent=f.parent,
               prio=f.prio)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ENODEV):
            raise FastrelayError(f"cannot delete filter {f.name} on ifindex {f.ifindex}: "
                                 f"{exc.args[-1]}") from None


def _named_netns(inode: int | None) -> str | None:
    """The /run/netns name of the namespace with this inode, if it has one."""
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except OSError:
        return None
    return next((n for n in names if control.netns_inode(NETNS_DIR / n) == inode), None)


@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[Any]:
    from pyroute2 import IPRoute

    # flags=0: never create a namespace that is gone (pyroute2's default would).
    with IPRoute(**({"netns": netns, "flags": 0} if netns else {})) as ipr:
        yield ipr


class Cleaner:
    """Decides what to remove and removes it, one row per decision.

    Who holds which program is read again after the filters are listed and before any is
    deleted: a process loads its program before it attaches it, so a filter attached
    while cleanup runs is always seen as held."""

    def __init__(self, *, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.rows: list[Row] = []
        self.held: dict[int, int] = {}
        self.removing = "would remove" if dry_run else "removed"
        self.here = control.netns_inode()

    def _held_by(self, f: Filter) -> int | None:
        return None if f.prog_id is None else self.held.get(f.prog_id)

    def _remove_filter(self, ipr: Any, f: Filter, where: str, why: str) -> None:
        if not self.dry_run:
            _delete(ipr, f)
        self.rows.append(Row(self.removing, f"tc filter {f.name}", where, why))

    def _namespace_of(self, record: RelayRecord, a: Attachment) -> tuple[str | None, str | None]:
        """(namespace name to open, None for this one; why it cannot be, or None)."""
        if a.netns is not None:
            if not (NETNS_DIR / a.netns).exists():
                return a.netns, "the namespace no longer exists"
            return a.netns, None
        if record.netns_inode in (None, self.here):
            return None, None
        named = _named_netns(record.netns_inode)
        if named is not None:
            return named, None
        return None, (f"the relay ran in network namespace net:[{record.netns_inode}], which "
                      "has no name in /run/netns (gone, or run cleanup inside it)")

    def recorded(self, record: RelayRecord) -> None:
        """A dead relay's filters, then its files."""
        owner = f"relay {record.pid} (dead)"
        by_ns: dict[str | None, list[Attachment]] = {}
        for a in record.interfaces:
            netns, unreachable = self._namespace_of(record, a)
            if unreachable is not None:
                self.rows.append(Row("gone", f"tc filter {a.program or '?'}",
                                     _where(netns, a.ifindex, a.parent, a.prio),
                                     f"{owner}: {unreachable}"))
                continue
            by_ns.setdefault(netns, []).append(a)
        for netns, attachments in by_ns.items():
            with _ipr(netns) as ipr:
                found = [(a, self._find(ipr, a)) for a in attachments]
                self.held = held_programs()
                for a, f in found:
                    self._recorded_one(ipr, netns, a, f, owner)
        self._remove_file(record.path, f"record of {owner}")
        self._remove_file(control.socket_path(record.pid, record.path.parent if record.path
                                              else None), f"control socket of {owner}")

    @staticmethod
    def _find(ipr: Any, a: Attachment) -> Filter | None:
        want = (a.parent, a.prio, tc_handle(a.handle))
        return next((f for f in bpf_filters(ipr, a.ifindex)
                     if (f.parent, f.prio, f.handle) == want), None)

    def _recorded_one(self, ipr: Any, netns: str | None, a: Attachment, f: Filter | None,
                      owner: str) -> None:
        where = _where(netns, _ifname(ipr, a.ifindex), a.parent, a.prio)
        if f is None:
            self.rows.append(Row("gone", f"tc filter {a.program or '?'}", where,
                                 f"{owner}: already removed"))
            return
        holder = self._held_by(f)
        if not f.name.startswith(OURS):
            self.rows.append(Row("kept", f"tc filter {f.name or '?'}", where,
                                 f"{owner} recorded it, but it is not a fastpath_/shim_ "
                                 "program now"))
        elif holder is not None:
            self.rows.append(Row("kept", f"tc filter {f.name}", where,
                                 f"{owner} recorded it, but live process {holder} holds "
                                 "its program"))
        else:
            self._remove_filter(ipr, f, where, f"left by {owner}")

    def _remove_file(self, path: Path | None, what: str) -> None:
        if path is None or not (path.exists() or path.is_symlink()):
            return
        if not self.dry_run:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.rows.append(Row(self.removing, "file", str(path), what))

    def stale_sockets(self, directory: Path) -> None:
        """Sockets of dead pids with no record beside them."""
        for sock in sorted(directory.glob("*.sock")):
            if sock.stem.isdigit() and not control.record_path(int(sock.stem),
                                                                directory).exists() \
                    and not control.pid_alive(int(sock.stem)):
                self._remove_file(sock, f"control socket of relay {sock.stem} (dead)")

    def orphans(self, live: list[RelayRecord]) -> None:
        """Our programs' filters in this namespace that nobody alive owns."""
        protected = {(a.ifindex, a.parent, a.prio, tc_handle(a.handle))
                     for r in live for a in r.interfaces
                     if self._namespace_of(r, a) == (None, None)
                     or (a.netns and control.netns_inode(NETNS_DIR / a.netns) == self.here)}
        with _ipr(None) as ipr:
            found = [(link.get_attr("IFLA_IFNAME") or str(link["index"]), f)
                     for link in ipr.get_links() for f in bpf_filters(ipr, link["index"])
                     if f.name.startswith(OURS)
                     and (f.ifindex, f.parent, f.prio, f.handle) not in protected]
            self.held = held_programs()
            for ifname, f in found:
                where = _where(None, ifname, f.parent, f.prio)
                if f.prog_id is None:  # cannot tell whether a live process holds it
                    self.rows.append(Row("kept", f"tc filter {f.name}", where,
                                         "the kernel reports no program id, so it cannot be "
                                         "told apart from a live relay's"))
                elif self._held_by(f) is None:
                    self._remove_filter(ipr, f, where,
                                        "orphan: no live relay recorded it or holds it")

    def pins(self, base: Path) -> None:
        """bpffs entries named after a dead relay's pid (`<pid>` or `<pid>_...`)."""
        if not base.is_dir():
            return
        for entry in sorted(base.iterdir()):
            m = re.match(r"(\d+)", entry.name)
            if m is None or control.pid_alive(int(m.group(1))):
                continue
            if not self.dry_run:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            self.rows.append(Row(self.removing, "bpf pin", str(entry),
                                 f"pinned by relay {m.group(1)} (dead)"))


def cleanup(*, dry_run: bool = False, directory: Path | None = None,
            pins: Path | None = None) -> list[Row]:
    directory = directory or control.relays_dir()
    cleaner = Cleaner(dry_run=dry_run)
    live: list[RelayRecord] = []
    if directory.is_dir():
        for path in sorted(directory.glob("*.json")):
            if not path.stem.isdigit():
                continue
            try:
                record = RelayRecord.load(path)
            except (ValueError, OSError) as exc:
                cleaner.rows.append(Row("kept", "file", str(path), f"unreadable: {exc}"))
                continue
            if record.alive():
                live.append(record)
            else:
                cleaner.recorded(record)
        cleaner.stale_sockets(directory)
    cleaner.orphans(live)
    cleaner.pins(pins or control.pins_dir())
    return cleaner.rows


def cleanup_command(
    as_json: JsonOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Remove the TC filters, records, sockets and pins a killed relay left behind."""
    require_root("fastrelay cleanup")
    rows = cleanup(dry_run=dry_run)
    if as_json:
        emit_table(COLUMNS, [r.cells() for r in rows], as_json=True)
    elif not rows:
        stdout.print("nothing to clean up: no dead relay's records, orphan fast-path filters "
                     "or pins")
    else:
        emit_table(COLUMNS, [r.cells() for r in rows], as_json=False,
                   title="Cleanup (dry run)" if dry_run else "Cleanup")
