"""Compile, load and attach the fast-path programs (bpf/fastpath_ingress.c, fastpath_egress.c).

Both programs are compiled as one bcc module so they share every map. bcc rewrites map
accesses (`map.lookup(...)`) only in the main source text, not in included files, so the
loader inlines the project's own `#include "..."` headers into one text before compiling
(system headers stay includes). The tail-call stages are installed in fr_progs here.

Attaching: clsact, direct action (toolchain.md §5). Priorities on the hooks (lower runs
first): the lab's loss filter 1, the crypto shim's ingress before the fast path and its
egress after it (see the verdict contract in bpf/structs.h):
  ingress: fast path FASTPATH_INGRESS_PRIO (30)  > shim ingress (20)
  egress:  fast path FASTPATH_EGRESS_PRIO (10)   < shim egress (20)
"""

from __future__ import annotations

import ctypes
import errno
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from relay import bpfload, control
from relay.errors import FastrelayError
from relay.fastpath import layout
from relay.fastpath.layout import Capacities
from relay.fastpath.reasons import REASON_MAX, Reason
from relay.paths import BPF_DIR

SOURCES = ("fastpath_ingress.c", "fastpath_egress.c")
INGRESS_FN = "fastpath_ingress"
EGRESS_FN = "fastpath_egress"
SUB_OP_FN = "fastpath_sub_op"
STREAM_OP_FN = "fastpath_stream_op"
#: tail-call stage index -> function
STAGES = {
    layout.PROG_IN_WALK: "fastpath_ingress_walk",
    layout.PROG_IN_CLONE: "fastpath_ingress_clone",
    layout.PROG_EG_WALK: "fastpath_egress_walk",
    layout.PROG_EG_SEND: "fastpath_egress_send",
}
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
FASTPATH_INGRESS_PRIO = 30
FASTPATH_EGRESS_PRIO = 10
FILTER_HANDLE = ":1"

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def expand_includes(path: Path, seen: set[Path] | None = None) -> str:
    """The text of path with every local `#include "x.h"` inlined once (header guards
    still hold; a header included twice appears once)."""
    seen = set() if seen is None else seen
    out = []
    for line in path.read_text().splitlines():
        m = _INCLUDE.match(line)
        if m:
            inc = (path.parent / m.group(1)).resolve()
            if not inc.is_file():
                raise FastrelayError(f"{path.name} includes {m.group(1)}, which is missing")
            if inc not in seen:
                seen.add(inc)
                out.append(f"/* ---- {m.group(1)} ---- */")
                out.append(expand_includes(inc, seen))
            continue
        out.append(line)
    return "\n".join(out)


def fastpath_source(bpf_dir: Path = BPF_DIR) -> str:
    seen: set[Path] = set()
    return "\n".join(expand_includes(bpf_dir / name, seen) for name in SOURCES)


class FastPath:
    """The loaded programs and their maps (one bcc module). Close it to unload."""

    def __init__(self, caps: Capacities = Capacities(), *, extra_cflags: tuple[str, ...] = ()):
        self.caps = caps
        self.Upstream = layout.upstream_struct(caps.max_subscribers_per_upstream)
        self.Record = layout.record_struct(caps.max_record_frames)
        self.bpf = bpfload.compile_source(fastpath_source(), cflags=[*caps.cflags(), *extra_cflags],
                                          what="the fast path (bpf/fastpath_*.c)")
        self.ingress = bpfload.load_sched_cls(self.bpf, INGRESS_FN)
        self.egress = bpfload.load_sched_cls(self.bpf, EGRESS_FN)
        self.stages = {idx: bpfload.load_sched_cls(self.bpf, fn) for idx, fn in STAGES.items()}
        self.sub_op_prog = bpfload.load_sched_cls(self.bpf, SUB_OP_FN)
        self.stream_op_prog = bpfload.load_sched_cls(self.bpf, STREAM_OP_FN)
        progs = self.bpf.get_table(b"fr_progs")
        for idx, fn in self.stages.items():
            progs[ctypes.c_int(idx)] = ctypes.c_int(fn.fd)
        self._ring_cb: Callable[[Any], None] | None = None
        self._attached: list[tuple[int, str, int, str | None]] = []

    # --- maps ---------------------------------------------------------------------------

    def map_fd(self, name: str) -> int:
        return self.bpf.get_table(name.encode()).map_fd

    def update(self, name: str, key: ctypes.Structure | int, value: ctypes.Structure,
               flags: int = 0) -> None:
        kb = key.to_bytes(4, "little") if isinstance(key, int) else bytes(key)
        bpfload.map_update(self.map_fd(name), kb, bytes(value), flags)

    def lookup(self, name: str, key: ctypes.Structure | int, cls: type[ctypes.Structure]):
        kb = key.to_bytes(4, "little") if isinstance(key, int) else bytes(key)
        raw = bpfload.map_lookup(self.map_fd(name), kb, ctypes.sizeof(cls))
        return None if raw is None else cls.from_buffer_copy(raw)

    def delete(self, name: str, key: ctypes.Structure) -> None:
        table = self.bpf.get_table(name.encode())
        k = table.Key.from_buffer_copy(bytes(key))
        try:
            del table[k]
        except KeyError:
            pass

    def sub_op(self, sub_idx: int, op: int, offset: int, value: int = 0, data: bytes = b"") -> int:
        """Run one struct fr_sub_op on a live subscriber (see bpf/structs.h); returns old."""
        req = layout.FrSubOp(sub_idx=sub_idx, op=op, offset=offset, len=len(data),
                             value=value & 0xFFFFFFFFFFFFFFFF)
        ctypes.memmove(req.data, data, len(data))
        frame = bytes(layout.SUB_OP_OFF) + bytes(req)
        res = bpfload.prog_test_run(self.sub_op_prog.fd, frame, out_size=len(frame))
        out = layout.FrSubOp.from_buffer_copy(res.data, layout.SUB_OP_OFF)
        if out.status != 0:
            raise FastrelayError(f"subscriber {sub_idx}: op {op} at offset {offset} refused")
        return out.old

    def sub_add(self, sub_idx: int, field: str, delta: int) -> int:
        """Atomic fetch-and-add on a u64 counter field of fr_subs[sub_idx]."""
        return self.sub_op(sub_idx, layout.SUB_OP_ADD, getattr(layout.FrSub, field).offset, delta)

    def sub_store(self, sub_idx: int, field: str, value: int) -> int:
        return self.sub_op(sub_idx, layout.SUB_OP_STORE, getattr(layout.FrSub, field).offset, value)

    def sub_write(self, sub_idx: int, field: str, data: bytes) -> None:
        """Overwrite a non-counter field (addresses, DCID, MACs, flags...) of a live subscriber."""
        self.sub_op(sub_idx, layout.SUB_OP_WRITE, getattr(layout.FrSub, field).offset, data=data)

    def stream_op(self, key: layout.FrSubStreamKey, op: int, field: str, value: int) -> int:
        """ADD or STORE one u64 field of a live fr_sub_streams entry; returns old."""
        req = layout.FrStreamOp(key=key, op=op, offset=getattr(layout.FrSubStream, field).offset,
                                value=value & 0xFFFFFFFFFFFFFFFF)
        frame = bytes(layout.SUB_OP_OFF) + bytes(req)
        # the program rewrites the frame in place: an output buffer of its size is enough
        res = bpfload.prog_test_run(self.stream_op_prog.fd, frame, out_size=len(frame))
        out = layout.FrStreamOp.from_buffer_copy(res.data, layout.SUB_OP_OFF)
        if out.status != 0:
            raise FastrelayError(f"stream {key.up_sid} of subscriber {key.sub_idx}: op refused")
        return out.old

    def keys(self, name: str) -> list[bytes]:
        """Every key of a hash map (a snapshot)."""
        return [bytes(k) for k in self.bpf.get_table(name.encode()).keys()]

    def clear(self, name: str) -> None:
        self.bpf.get_table(name.encode()).clear()

    def counters(self) -> dict[Reason, tuple[int, int]]:
        """Packets and bytes per reason, summed over CPUs (zero entries left out)."""
        fd = self.map_fd("fr_stats")
        ncpu = bpfload.possible_cpus()
        size = ctypes.sizeof(layout.FrCounter)
        out: dict[Reason, tuple[int, int]] = {}
        for reason in Reason:
            raw = bpfload.map_lookup(fd, int(reason).to_bytes(4, "little"), size * ncpu) or b""
            pk = sum(layout.FrCounter.from_buffer_copy(raw, i * size).packets for i in range(ncpu))
            by = sum(layout.FrCounter.from_buffer_copy(raw, i * size).bytes for i in range(ncpu))
            if pk or by:
                out[reason] = (pk, by)
        return out

    def reset_counters(self) -> None:
        fd = self.map_fd("fr_stats")
        zero = bytes(ctypes.sizeof(layout.FrCounter) * bpfload.possible_cpus())
        for i in range(REASON_MAX):
            bpfload.map_update(fd, i.to_bytes(4, "little"), zero)

    # --- ring buffer -----------------------------------------------------------------------

    def drain(self, timeout_ms: int = 0) -> list[Any]:
        """Records (self.Record) waiting in fr_events, oldest first."""
        got: list[Any] = []
        if self._ring_cb is None:
            def cb(_ctx: Any, data: Any, size: int) -> int:
                got_ref = self._ring_sink
                got_ref.append(self.Record.from_buffer_copy(ctypes.string_at(data, size)))
                return 0
            self._ring_cb = cb
            self.bpf[b"fr_events"].open_ring_buffer(cb)
        self._ring_sink = got
        if timeout_ms > 0:
            self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()
        return got

    # --- attach ---------------------------------------------------------------------------

    def attach(self, ifindex: int, *, netns: str | None = None, ingress: bool = True,
               egress: bool = True) -> None:
        """Attach to one interface (clsact, direct action); detach() undoes it."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute(**({"netns": netns} if netns else {})) as ipr:
            try:
                ipr.tc("add", "clsact", index=ifindex)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise FastrelayError(f"cannot add clsact on ifindex {ifindex}: "
                                         f"{exc.args[-1]}") from None
            hooks = []
            if ingress:
                hooks.append((TC_INGRESS, FASTPATH_INGRESS_PRIO, self.ingress))
            if egress:
                hooks.append((TC_EGRESS, FASTPATH_EGRESS_PRIO, self.egress))
            for parent, prio, fn in hooks:
                try:
                    ipr.tc("add-filter", "bpf", index=ifindex, handle=FILTER_HANDLE, fd=fn.fd,
                           name=fn.name.decode(), parent=parent, classid=1, direct_action=True,
                           prio=prio)
                except NetlinkError as exc:
                    raise FastrelayError(f"cannot attach {fn.name.decode()} on ifindex "
                                         f"{ifindex}: {exc.args[-1]}") from None
                self._attached.append((ifindex, parent, prio, netns))
                registry = control.current_registry()
                if registry is not None:
                    registry.register_attachment(ifindex, netns, parent, prio, FILTER_HANDLE,
                                                 fn.name.decode())

    def detach(self) -> None:
        """Remove every filter attach() added (the clsact qdisc stays: others may use it)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        while self._attached:
            ifindex, parent, prio, netns = self._attached.pop()
            try:
                with IPRoute(**({"netns": netns} if netns else {})) as ipr:
                    ipr.tc("del-filter", "bpf", index=ifindex, handle=FILTER_HANDLE,
                           parent=parent, prio=prio)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                    raise
            registry = control.current_registry()
            if registry is not None:
                registry.unregister_attachment(ifindex, netns, parent, prio, FILTER_HANDLE)

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()


@contextmanager
def loaded(caps: Capacities = Capacities()) -> Iterator[FastPath]:
    fp = FastPath(caps)
    try:
        yield fp
    finally:
        fp.close()
