"""ctypes mirrors of bpf/structs.h (and the constants of bpf/consts.h Python needs).

Natural alignment and explicit padding on both sides, so these are the C layouts;
tests/kernel/test_fastpath_layout.py compiles a sizeof/offsetof probe of the header with
bcc and compares every field. Change both together.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# --- consts.h -------------------------------------------------------------------------

QUIC_MAX_CID_LEN = 20


@dataclass(frozen=True)
class Capacities:
    """The overridable sizes of bpf/consts.h; the loader passes each as -D<NAME>=<value>."""

    max_subscribers_per_upstream: int = 64
    max_connections: int = 4096
    max_upstreams: int = 256
    max_subscribers: int = 1024
    max_host_cids: int = 16384
    max_tracks: int = 4096
    max_upstream_streams: int = 65536
    max_subscriber_streams: int = 262144
    ringbuf_pages: int = 256
    ring_wakeup_every: int = 64
    max_frames: int = 24
    max_ack_ranges: int = 16
    max_record_frames: int = 4

    @classmethod
    def parse(cls, settings: list[str]) -> Capacities:
        """`NAME=VALUE` overrides (e.g. `max_subscribers_per_upstream=128`); ValueError with
        the valid names for anything else."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, int] = {}
        for item in settings:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of {', '.join(names)}")
            if not text.strip().isdigit() or int(text) < 1:
                raise ValueError(f"{item!r}: the value must be a positive integer")
            values[name] = int(text)
        if values.get("ringbuf_pages", 1) & (values.get("ringbuf_pages", 1) - 1):
            raise ValueError("ringbuf_pages must be a power of two")
        return cls(**values)

    def cflags(self) -> list[str]:
        return [f"-D{name.upper()}={value}" for name, value in self.__dict__.items()]


# tail-call stages (FR_PROG_*)
PROG_IN_WALK, PROG_IN_CLONE, PROG_EG_WALK, PROG_EG_SEND = 0, 1, 2, 3

# --- the verdict contract (structs.h) ----------------------------------------------------

MARK_MAGIC_MASK = 0xFF000000
MARK_MAGIC = 0xFA000000
MARK_CLONE = 0x00800000
MARK_SUB_MASK = 0x0000FFFF
CB_VERDICT, CB_CONN, CB_LAYOUT, CB_PN_LO, CB_PN_HI = 0, 1, 2, 3, 4
CB_MAGIC_MASK = 0xFFFF0000
CB_MAGIC = 0xFA570000
CB_VERIFIED, CB_PROTECT, CB_CLONE, CB_HAVE_PN = 0x1, 0x2, 0x4, 0x8


def clone_mark(sub_idx: int) -> int:
    """The skb mark the ingress program gives a clone for subscriber sub_idx."""
    return MARK_MAGIC | MARK_CLONE | (sub_idx & MARK_SUB_MASK)


ROLE_NONE, ROLE_UPSTREAM, ROLE_SUBSCRIBER = 0, 1, 2
PROT_CLEAR, PROT_OFFLOAD_KEYS, PROT_OFFLOAD_NOKEYS, PROT_USERSPACE = 0, 1, 2, 3
SUB_ACTIVE = 0x1
PN_NONE = 0xFFFFFFFFFFFFFFFF
TRACK_FORWARD = 0x1
UPS_FORWARD = 0x1
SS_SKIPPED = 0x1
REC_SENT_CLONE, REC_SENT_USER, REC_PUNT_CLONE, REC_PUNT_USER = 1, 2, 3, 4
NO_SUB_SID = 0xFFFFFFFFFFFFFFFF
FA_FORWARDED, FA_PADDED_RETX, FA_PADDED_SKIP, FA_PUNTED = 1, 2, 3, 4
SCRATCH_INGRESS, SCRATCH_EGRESS = 0, 1


class _S(ctypes.Structure):
    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            if name.startswith("_"):
                continue
            v = getattr(self, name)
            if isinstance(v, ctypes.Array):
                v = bytes(v).hex() if v._type_ is u8 else list(v)
            parts.append(f"{name}={v}")
        return f"{type(self).__name__}({', '.join(parts)})"


class FrConfig(_S):
    _fields_ = [("host_cid_len", u32), ("flags", u32)]


class FrCidKey(_S):
    _fields_ = [("len", u8), ("cid", u8 * QUIC_MAX_CID_LEN), ("_pad", u8 * 3)]


class FrAddrKey(_S):
    _fields_ = [("addr", u8 * 16), ("port", u16), ("family", u8), ("_pad", u8)]


class FrConn(_S):
    _fields_ = [("role", u8), ("protection", u8), ("tag_len", u8), ("key_phase", u8),
                ("role_idx", u32), ("flags", u32), ("peer_cid_len", u8), ("_pad", u8 * 3)]


def upstream_struct(max_subscribers_per_upstream: int) -> type[ctypes.Structure]:
    """struct fr_upstream for a given MAX_SUBSCRIBERS_PER_UPSTREAM."""
    return type(f"FrUpstream{max_subscribers_per_upstream}", (_S,), {
        "_fields_": [("n_subs", u32), ("_pad", u32),
                     ("subs", u32 * max_subscribers_per_upstream)]})


FrUpstream = upstream_struct(Capacities().max_subscribers_per_upstream)


class FrSub(_S):
    _fields_ = [
        ("next_pn", u64), ("largest_acked", u64), ("next_uni_index", u64),
        ("max_streams_uni", u64), ("max_data", u64), ("data_used", u64),
        ("initial_max_stream_data", u64), ("cwnd", u64), ("bytes_in_flight", u64),
        ("conn_idx", u32), ("ifindex", u32), ("flags", u32), ("max_udp_payload", u32),
        ("family", u8), ("dcid_len", u8), ("priority_threshold", u8), ("_pad0", u8),
        ("dcid", u8 * QUIC_MAX_CID_LEN), ("src_mac", u8 * 6), ("dst_mac", u8 * 6),
        ("src_addr", u8 * 16), ("dst_addr", u8 * 16), ("src_port", u16), ("dst_port", u16),
        ("_pad1", u32),
    ]


SUB_OP_OFF = 14
SUB_OP_ADD, SUB_OP_STORE, SUB_OP_WRITE = 1, 2, 3
SUB_COUNTERS_END = 72


class FrSubOp(_S):
    _fields_ = [("sub_idx", u32), ("op", u8), ("len", u8), ("offset", u16), ("value", u64),
                ("old", u64), ("status", ctypes.c_int32), ("_pad", u32), ("data", u8 * 64)]


class FrTrackKey(_S):
    _fields_ = [("up_idx", u32), ("_pad", u32), ("alias", u64)]


class FrTrack(_S):
    _fields_ = [("flags", u32), ("_pad", u32)]


class FrSubTrackKey(_S):
    _fields_ = [("sub_idx", u32), ("up_idx", u32), ("alias", u64)]


class FrSubTrack(_S):
    _fields_ = [("sub_alias", u64), ("flags", u32), ("_pad", u32), ("start_group", u64)]


class FrUpStreamKey(_S):
    _fields_ = [("up_idx", u32), ("_pad", u32), ("sid", u64)]


class FrUpStream(_S):
    _fields_ = [("alias", u64), ("flags", u32), ("priority", u8), ("_pad", u8 * 3),
                ("group", u64)]


class FrSubStreamKey(_S):
    _fields_ = [("sub_idx", u32), ("up_idx", u32), ("up_sid", u64)]


class FrSubStream(_S):
    _fields_ = [("sub_sid", u64), ("next_offset", u64), ("max_stream_data", u64),
                ("flags", u32), ("_pad", u32)]


class FrStreamOp(_S):
    _fields_ = [("key", FrSubStreamKey), ("op", u8), ("_pad0", u8), ("offset", u16), ("_pad1", u32),
                ("value", u64), ("old", u64), ("status", ctypes.c_int32), ("_pad2", u32)]


class FrCounter(_S):
    _fields_ = [("packets", u64), ("bytes", u64)]


class FrFrameRec(_S):
    _fields_ = [("sub_sid", u64), ("up_sid", u64), ("offset", u64), ("length", u32),
                ("type", u8), ("action", u8), ("fin", u8), ("_pad", u8)]


def record_struct(max_record_frames: int) -> type[ctypes.Structure]:
    """struct fr_record for a given MAX_RECORD_FRAMES."""
    return type(f"FrRecord{max_record_frames}", (_S,), {"_fields_": [
        ("kind", u8), ("reason", u8), ("n_frames", u8), ("pn_len", u8),
        ("sub_idx", u32), ("conn_idx", u32), ("up_idx", u32),
        ("wire_pn", u64), ("ts_ns", u64), ("size", u32), ("built_pn", u32),
        ("frames", FrFrameRec * max_record_frames)]})


FrRecord = record_struct(Capacities().max_record_frames)


GROW_EDIT_MAX = 32
GROW_MAX_HEAD = 512
GROW_MAX_TAIL = 2048
CFG_RESIZE_AT_TAIL = 0x1                # fr_config.flags


class FrGrowEdit(_S):
    _fields_ = [("start", u32), ("old_len", u8), ("new_len", u8), ("_pad", u8 * 2),
                ("bytes", u8 * GROW_EDIT_MAX)]


def scratch_struct(record: type[ctypes.Structure]) -> type[ctypes.Structure]:
    """struct fr_scratch around a struct fr_record of record_struct(MAX_RECORD_FRAMES)."""
    max_record_frames = dict(record._fields_)["frames"]._length_
    return type(f"FrScratch_{record.__name__}", (_S,), {"_fields_": [
        ("off", u32), ("end", u32), ("forwarded", u32), ("steps", u32), ("up_idx", u32),
        ("conn_idx", u32), ("sub_idx", u32), ("bytes", u32), ("pn_off", u32),
        ("csum_off", u32), ("new_bytes", u64), ("n_frames", u32), ("n_sent", u32),
        ("punt", u32), ("ring_count", u32), ("rec", record),
        ("cid_len", u32), ("n_grow", u32), ("grow", FrGrowEdit * (max_record_frames + 1)),
        ("head", u8 * (2 * GROW_MAX_HEAD)), ("sid_delta", ctypes.c_int32),
        ("resize_phase", u32), ("resize_delta", ctypes.c_int32), ("resize_pn_len", u32)]})


FrScratch = scratch_struct(FrRecord)

#: C struct name -> mirror, for the layout check.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "fr_config": FrConfig, "fr_cid_key": FrCidKey, "fr_addr_key": FrAddrKey,
    "fr_conn": FrConn, "fr_upstream": FrUpstream, "fr_sub": FrSub, "fr_sub_op": FrSubOp,
    "fr_track_key": FrTrackKey, "fr_track": FrTrack, "fr_sub_track_key": FrSubTrackKey,
    "fr_sub_track": FrSubTrack, "fr_up_stream_key": FrUpStreamKey, "fr_up_stream": FrUpStream,
    "fr_sub_stream_key": FrSubStreamKey, "fr_sub_stream": FrSubStream,
    "fr_stream_op": FrStreamOp, "fr_counter": FrCounter, "fr_frame_rec": FrFrameRec, "fr_record": FrRecord,
    "fr_grow_edit": FrGrowEdit, "fr_scratch": FrScratch,
}


def cid_key(cid: bytes) -> FrCidKey:
    if len(cid) > QUIC_MAX_CID_LEN:
        raise ValueError(f"a connection id has at most {QUIC_MAX_CID_LEN} bytes, not {len(cid)}")
    k = FrCidKey(len=len(cid))
    ctypes.memmove(k.cid, cid, len(cid))
    return k


def addr_key(addr: bytes, port: int) -> FrAddrKey:
    """Key of fr_peers: addr packed (4 or 16 bytes), port in host order."""
    if len(addr) not in (4, 16):
        raise ValueError("an address is 4 (IPv4) or 16 (IPv6) bytes")
    k = FrAddrKey(port=int.from_bytes(port.to_bytes(2, "big"), "little"),
                  family=4 if len(addr) == 4 else 6)
    ctypes.memmove(k.addr, addr, len(addr))
    return k
