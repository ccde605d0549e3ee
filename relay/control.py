"""A running relay's control socket and its record of what it attached in the kernel.

Each relay process serves a Unix stream socket at `<relays dir>/<pid>.sock` inside its
asyncio loop: one JSON request per line (`{"cmd": "stats"}`), one JSON line back
(`{"ok": true, ...}` or `{"ok": false, "error": "..."}`). Beside it, `<pid>.json` records the
relay (pid, start time, listen address) and every TC filter it attached, so that
`fastrelay cleanup` can remove what a killed relay left behind. Both files go away on a
clean stop.

Filters reach the record two ways: the fast-path loader reports each attach/detach to
current_registry() while a control server runs in the process, and a starting control
server adopts the fastpath_/shim_ filters of its own namespace whose programs the process
already holds (the relay attaches before it serves the socket). The record also keeps the
process's start time (a reused pid is not the relay) and its network namespace's inode
(what "netns": null means to a cleanup run from elsewhere).

The relays directory is /run/fastrelay/relays (mode 0700), or $FASTRELAY_RELAYS_DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from relay.errors import FastrelayError

RELAYS_DIR = Path("/run/fastrelay/relays")
RELAYS_DIR_ENV = "FASTRELAY_RELAYS_DIR"
#: Per-relay pins on bpffs (removed by `fastrelay cleanup` once their relay is dead).
PINS_DIR = Path("/sys/fs/bpf/fastrelay/relays")
PINS_DIR_ENV = "FASTRELAY_PINS_DIR"
#: A request line longer than this is malformed (the reader's buffer limit).
MAX_REQUEST = 4096
DEFAULT_TIMEOUT = 2.0
RECORD_VERSION = 1


def relays_dir() -> Path:
    return Path(os.environ.get(RELAYS_DIR_ENV) or RELAYS_DIR)


def pins_dir() -> Path:
    return Path(os.environ.get(PINS_DIR_ENV) or PINS_DIR)


def socket_path(pid: int, directory: Path | None = None) -> Path:
    return (directory or relays_dir()) / f"{pid}.sock"


def record_path(pid: int, directory: Path | None = None) -> Path:
    return (directory or relays_dir()) / f"{pid}.json"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- processes ---------------------------------------------------------------------------

def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or None when the
    process does not exist or is a zombie: with the pid it tells a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) "
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def netns_inode(path: str | Path = "/proc/self/ns/net") -> int | None:
    """The inode that names a network namespace (of this process, or of a
    /run/netns/<name> bind mount); None when it cannot be read."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """True when /proc/<pid> is a live process (and, if given, the one started then)."""
    ticks = process_start_ticks(pid)
    if ticks is None:
        return False
    return start_ticks is None or ticks == start_ticks


# --- the record ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Attachment:
    """One TC filter a relay attached: enough to find it again and check it is ours."""

    ifindex: int
    netns: str | None
    """pyroute2 namespace name (/run/netns/<name>); None: the relay's own namespace."""
    parent: str
    """clsact hook, "ffff:fff2" (ingress) or "ffff:fff3" (egress)."""
    prio: int
    handle: str
    program: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ifindex": self.ifindex, "netns": self.netns, "parent": self.parent,
                "prio": self.prio, "handle": self.handle, "program": self.program}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attachment:
        return cls(ifindex=int(d["ifindex"]), netns=d.get("netns"), parent=str(d["parent"]),
                   prio=int(d["prio"]), handle=str(d["handle"]), program=d.get("program"))

    def same_filter(self, other: Attachment) -> bool:
        return (self.ifindex, self.netns, self.parent, self.prio, self.handle) == \
            (other.ifindex, other.netns, other.parent, other.prio, other.handle)


@dataclass
class RelayRecord:
    """`<pid>.json`: who the relay is and which filters it attached."""

    pid: int
    started: str
    listen: str
    start_ticks: int | None = None
    netns_inode: int | None = None
    """The relay's own network namespace (what an attachment's netns None means)."""
    interfaces: list[Attachment] = field(default_factory=list)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "pid": self.pid, "started": self.started,
                "start_ticks": self.start_ticks, "netns_inode": self.netns_inode,
                "listen": self.listen,
                "interfaces": [a.to_dict() for a in self.interfaces]}

    @classmethod
    def load(cls, path: Path) -> RelayRecord:
        """Read a record; a file that is not one raises ValueError."""
        try:
            d = json.loads(path.read_text())
            return cls(pid=int(d["pid"]), started=str(d.get("started", "")),
                       listen=str(d.get("listen", "")), start_ticks=d.get("start_ticks"),
                       netns_inode=d.get("netns_inode"),
                       interfaces=[Attachment.from_dict(a) for a in d.get("interfaces", [])],
                       path=path)
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a relay record ({exc})") from None

    def alive(self) -> bool:
        return pid_alive(self.pid, self.start_ticks)

    def write(self) -> None:
        """Replace the file atomically (a reader never sees half a record)."""
        assert self.path is not None
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.path)


class RelayRegistry:
    """The running process's record: the fast-path loader reports each filter it attaches
    or detaches here (through current_registry()), and the file follows."""

    def __init__(self, record: RelayRecord) -> None:
        self.record = record

    def register_attachment(self, ifindex: int, netns: str | None, parent: str, prio: int,
                            handle: str, program: str | None = None) -> None:
        new = Attachment(ifindex, netns, parent, prio, handle, program)
        self.record.interfaces = [a for a in self.record.interfaces if not a.same_filter(new)]
        self.record.interfaces.append(new)
        self._write()

    def unregister_attachment(self, ifindex: int, netns: str | None, parent: str, prio: int,
                              handle: str) -> None:
        gone = Attachment(ifindex, netns, parent, prio, handle)
        kept = [a for a in self.record.interfaces if not a.same_filter(gone)]
        if len(kept) != len(self.record.interfaces):
            self.record.interfaces = kept
            self._write()

    def _write(self) -> None:
        # Attaching must not fail for the record's sake; the orphan scan is the backstop.
        try:
            self.record.write()
        except OSError as exc:
            print(f"warning: cannot update {self.record.path}: {exc.strerror or exc}",
                  file=sys.stderr, flush=True)


_current: RelayRegistry | None = None


def current_registry() -> RelayRegistry | None:
    """This process's registry while a control server runs in it, else None."""
    return _current


def running_relays(directory: Path | None = None) -> list[RelayRecord]:
    """Records of live relays, by pid (a record whose process is gone is not listed)."""
    directory = directory or relays_dir()
    found = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stem):
        if not path.stem.isdigit():
            continue
        try:
            record = RelayRecord.load(path)
        except (ValueError, OSError):
            continue
        if record.alive():
            found.append(record)
    return sorted(found, key=lambda r: r.pid)


# --- filters in the kernel --------------------------------------------------------------------

#: Names of the programs fastrelay attaches to TC (the fast path, the soft crypto shim).
OURS = ("fastpath_", "shim_")
HOOKS = {"ffff:fff2": "ingress", "ffff:fff3": "egress"}
TCA_BPF_ID = 11          # include/uapi/linux/pkt_cls.h: the attached program's id (u32)


def tc_handle(text: str | int) -> int:
    """"ffff:fff2" -> 0xfffffff2, ":1" -> 1 (tc's major:minor, hex)."""
    if isinstance(text, int):
        return text
    if ":" not in text:
        return int(text, 16)
    major, minor = (int(x or "0", 16) for x in text.split(":", 1))
    return (major << 16) | minor


def held_programs(pids: Iterable[int] | None = None) -> dict[int, int]:
    """BPF program id -> pid of a live process holding a descriptor of it (every process,
    or only those pids)."""
    held: dict[int, int] = {}
    procs = (Path("/proc").iterdir() if pids is None
             else (Path(f"/proc/{pid}") for pid in pids))
    for proc in procs:
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != "anon_inode:bpf-prog":
                    continue
                info = (proc / "fdinfo" / fd.name).read_text()
            except OSError:
                continue
            m = re.search(r"^prog_id:\s*(\d+)", info, re.M)
            if m:
                held.setdefault(int(m.group(1)), int(proc.name))
    return held


@dataclass(frozen=True)
class Filter:
    ifindex: int
    parent: str
    prio: int
    handle: int
    name: str
    prog_id: int | None


def _prog_id(options: Any) -> int | None:
    """TCA_BPF_ID from the raw TCA_OPTIONS (pyroute2 does not decode it)."""
    data, off, length = options.data, options.offset, options.length
    pos, end = off + 4, off + length
    while pos + 4 <= end:
        nla_len, nla_type = struct.unpack_from("HH", data, pos)
        if nla_len < 4:
            break
        if (nla_type & 0x3FFF) == TCA_BPF_ID and nla_len >= 8:
            return int(struct.unpack_from("I", data, pos + 4)[0])
        pos += (nla_len + 3) & ~3
    return None


def bpf_filters(ipr: Any, ifindex: int) -> Iterator[Filter]:
    """The bpf filters on an interface's clsact hooks (none when it has no clsact)."""
    from pyroute2.netlink.exceptions import NetlinkError

    for parent in HOOKS:
        try:
            found = ipr.get_filters(index=ifindex, parent=tc_handle(parent))
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                continue
            raise
        for f in found:
            options = f.get_attr("TCA_OPTIONS")
            if f.get_attr("TCA_KIND") != "bpf" or not f["handle"] or options is None:
                continue
            yield Filter(ifindex, parent, f["info"] >> 16, f["handle"],
                         options.get_attr("TCA_BPF_NAME") or "", _prog_id(options))


def format_handle(handle: int) -> str:
    """1 -> ":1", 0xfffffff2 -> "ffff:fff2" (tc's notation, as the loader writes it)."""
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:{minor:x}" if major else f":{minor:x}"


def filters_held_by(pid: int) -> list[Attachment]:
    """Our programs' filters in this network namespace whose program the process holds:
    what it attached before its registry existed (the fast path, the soft shim)."""
    from pyroute2 import IPRoute

    held = held_programs([pid])
    found = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            for f in bpf_filters(ipr, link["index"]):
                if f.name.startswith(OURS) and f.prog_id in held:
                    found.append(Attachment(f.ifindex, None, f.parent, f.prio,
                                            format_handle(f.handle), f.name))
    return found


# --- the server ----------------------------------------------------------------------------

class ControlServer:
    """Serves `{"cmd": "stats"}` for one relay from its asyncio loop; keeps its record."""

    def __init__(self, stats: Callable[[], dict[str, Any]], *, listen: str = "",
                 directory: Path | None = None, pid: int | None = None) -> None:
        self.stats = stats
        self.listen = listen
        self.directory = directory or relays_dir()
        self.pid = os.getpid() if pid is None else pid
        self.socket_path = socket_path(self.pid, self.directory)
        self.record = RelayRecord(pid=self.pid, started=_utc_now(), listen=listen,
                                  start_ticks=process_start_ticks(self.pid),
                                  netns_inode=netns_inode(f"/proc/{self.pid}/ns/net"),
                                  path=record_path(self.pid, self.directory))
        self.registry = RelayRegistry(self.record)
        self.requests = 0
        self.errors = 0
        self._started_monotonic = time.monotonic()
        self._server: asyncio.AbstractServer | None = None
        #: why start() could not serve (the relay runs on without a control socket)
        self.unavailable: str | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Write the record, serve the socket and make the registry current; when the
        directory cannot be used, warn on stderr and carry on without them."""
        global _current
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            # Our pid's name: anything there was left by a dead process that had this pid.
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            await self._adopt_earlier_filters()
            self.record.write()
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.socket_path), limit=MAX_REQUEST)
            os.chmod(self.socket_path, 0o600)
        except OSError as exc:
            # The relay still serves MoQ; only `fastrelay stats` and cleanup lose sight of it.
            self._remove_files()
            self.unavailable = f"{self.socket_path}: {exc.strerror or exc}"
            print(f"warning: no control socket ({self.unavailable}); `fastrelay stats` cannot "
                  "reach this relay", file=sys.stderr, flush=True)
            return
        _current = self.registry

    async def _adopt_earlier_filters(self) -> None:
        """Record the filters this relay attached before the registry existed."""
        try:
            # pyroute2's synchronous API runs its own event loop: not inside this one.
            found = await asyncio.to_thread(filters_held_by, self.pid)
        except Exception as exc:  # the record is a help for cleanup, never a reason to stop
            print(f"warning: cannot list this relay's TC filters for {self.record.path} "
                  f"({type(exc).__name__}: {exc}); `fastrelay cleanup` will find them as "
                  "orphans", file=sys.stderr, flush=True)
            return
        for a in found:
            if not any(a.same_filter(b) for b in self.record.interfaces):
                self.record.interfaces.append(a)

    async def stop(self) -> None:
        global _current
        if _current is self.registry:
            _current = None
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        self._remove_files()

    def _remove_files(self) -> None:
        for path in (self.socket_path, self.record.path):
            assert path is not None
            with contextlib.suppress(OSError):
                path.unlink()

    def info(self) -> dict[str, Any]:
        return {"pid": self.pid, "started": self.record.started, "listen": self.listen,
                "uptime_s": round(time.monotonic() - self._started_monotonic, 3),
                "control": {"requests": self.requests, "errors": self.errors}}

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line (counted; a bad line is an error reply, never a
        crash)."""
        self.requests += 1
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error("malformed request: expected one JSON object per line")
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return self._error('malformed request: expected {"cmd": "..."}')
        cmd = request["cmd"]
        if cmd == "stats":
            try:
                stats = self.stats()
            except Exception as exc:  # the relay's bug must not take the socket down
                return self._error(f"stats failed: {type(exc).__name__}: {exc}")
            return {"ok": True, **self.info(), "stats": stats}
        if cmd == "info":
            return {"ok": True, **self.info()}
        return self._error(f"unknown command {cmd!r} (known: stats, info)")

    def _error(self, message: str) -> dict[str, Any]:
        self.errors += 1
        return {"ok": False, "error": message}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial  # a last request without its newline still counts
                    if not line.strip():
                        break
                except asyncio.LimitOverrunError:
                    self.requests += 1
                    reply = self._error(f"malformed request: longer than {MAX_REQUEST} bytes")
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
                    break
                if not line.strip():
                    continue
                reply = self.answer(line)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# --- the client ----------------------------------------------------------------------------

def query(path: Path, cmd: str = "stats", timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Send one request to a relay's control socket and return its reply object.

    FastrelayError (one line) when no relay listens there, the socket is stale (its pid is
    dead), the relay does not answer in time or refuses the command."""
    pid = int(path.stem) if path.stem.isdigit() else None
    if not path.exists():
        raise FastrelayError(f"no running fastrelay relay (no control socket {path})")
    stale = (f"relay {pid} is not running (stale control socket {path}); "
             "run 'fastrelay cleanup' as root" if pid is not None else
             f"no relay answers on {path} (stale control socket)")
    if pid is not None and not pid_alive(pid):
        raise FastrelayError(stale)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (socket.timeout, TimeoutError):
            raise FastrelayError(f"the relay on {path} did not answer within {timeout:g} s")\
                from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise FastrelayError(stale) from None
        except PermissionError:
            raise FastrelayError(f"cannot open the control socket {path}: permission denied "
                                 "(it belongs to the relay's user; rerun as that user or root)")\
                from None
        except OSError as exc:
            raise FastrelayError(f"cannot talk to the relay on {path}: "
                                 f"{exc.strerror or exc}") from None
    try:
        reply = json.loads(buf)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FastrelayError(f"the relay on {path} closed the connection without a reply"
                             if not buf else f"the relay on {path} sent a malformed reply")\
            from None
    if not isinstance(reply, dict):
        raise FastrelayError(f"the relay on {path} sent a malformed reply")
    if not reply.get("ok"):
        raise FastrelayError(f"the relay on {path} refused {cmd!r}: "
                             f"{reply.get('error', 'no reason given')}")
    return reply
