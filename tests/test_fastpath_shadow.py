"""ShadowStreams: upstream bytes and kernel stream ids meet in either order, each byte once."""

from __future__ import annotations

import pytest

from relay.fastpath.shadow import ShadowStreams, ShadowWrite
from relay.moqt.data import SubgroupHeader, encode_subgroup_header

KEY = (1, 2)  # publisher session 1, upstream stream 2


def test_record_after_data_writes_everything_so_far() -> None:
    s = ShadowStreams()
    assert s.data(KEY, b"head", False, 0.0) == []
    assert s.data(KEY, b"-obj", False, 0.0) == []
    assert s.kernel_stream(7, KEY, 3, 0.0) == [ShadowWrite(7, 3, 0, b"head-obj", False)]
    assert s.data(KEY, b"!", True, 1.0) == [ShadowWrite(7, 3, 8, b"!", True)]
    assert s.bytes_written == 9


def test_record_before_data_then_idempotent() -> None:
    s = ShadowStreams()
    assert s.kernel_stream(7, KEY, 3, 0.0) == []
    assert s.kernel_stream(8, KEY, 11, 0.0) == []
    writes = s.data(KEY, b"abc", True, 0.0)
    assert writes == [ShadowWrite(7, 3, 0, b"abc", True), ShadowWrite(8, 11, 0, b"abc", True)]
    assert s.kernel_stream(7, KEY, 3, 0.0) == []  # nothing twice, FIN once
    assert s.owner_stream(7, KEY) == 3 and s.owner_stream(9, KEY) is None
    assert s.upstream_of(8, 11) == KEY and s.upstream_of(8, 3) is None


def test_two_stream_ids_for_one_copy_is_an_error() -> None:
    s = ShadowStreams()
    s.kernel_stream(7, KEY, 3, 0.0)
    with pytest.raises(ValueError):
        s.kernel_stream(7, KEY, 7, 0.0)


def test_expire_after_linger_and_forget() -> None:
    s = ShadowStreams()
    s.kernel_stream(7, KEY, 3, 0.0)
    s.data(KEY, b"x", True, 10.0)
    s.data((1, 6), b"y", False, 10.0)
    assert s.expire(10.5, 1.0) == []
    assert s.expire(11.0, 1.0) == [(KEY, [7])]
    assert len(s) == 1
    s.forget_publisher(1, 20.0)
    assert s.expire(21.0, 1.0) == [((1, 6), [])]
    s.kernel_stream(7, (1, 10), 15, 0.0)
    assert s.forget_session(7) == [(1, 10)]
    assert s.owner_stream(7, (1, 10)) is None


def test_the_subscribers_alias_is_written_into_its_copy() -> None:
    """The kernel rewrote alias 5 to 9 in the subscriber's copy: so does the shadow."""
    header = encode_subgroup_header(SubgroupHeader.new(5, 0, 128, 0))
    s = ShadowStreams(alias_of=lambda session, publisher, alias: {7: 9}.get(session, alias))
    s.kernel_stream(7, KEY, 3, 0.0)
    s.kernel_stream(8, KEY, 11, 0.0)
    assert s.data(KEY, header[:1], False, 0.0) == []  # header cut: wait for its alias
    writes = s.data(KEY, header[1:] + b"obj", False, 0.0)
    mine = encode_subgroup_header(SubgroupHeader.new(9, 0, 128, 0))
    assert writes == [ShadowWrite(7, 3, 0, mine + b"obj", False),
                      ShadowWrite(8, 11, 0, header + b"obj", False)]
    assert s.data(KEY, b"more", True, 0.0)[0] == ShadowWrite(7, 3, len(mine) + 3, b"more", True)
