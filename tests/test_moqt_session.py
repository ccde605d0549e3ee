"""relay.moqt.session: two sans-I/O sessions wired back to back in memory, no sockets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from aioquic.buffer import Buffer

from relay.moqt.constants import (
    MOQT_VERSION_DRAFT_14,
    FetchErrorCode,
    FilterType,
    GroupOrder,
    MessageType,
    ObjectStatus,
    PublishDoneStatusCode,
    PublishErrorCode,
    SessionErrorCode,
    SetupParameter,
    SubscribeErrorCode,
    SubscribeNamespaceErrorCode,
)
from relay.moqt.data import (
    FetchHeader,
    FetchObject,
    ObjectDatagram,
    SubgroupHeader,
    SubgroupObject,
    encode_extension_headers,
    encode_fetch_stream,
    encode_object_datagram,
    encode_subgroup_stream,
)
from relay.moqt.messages import (
    ClientSetup,
    FetchCancel,
    FetchOk,
    Location,
    MaxRequestId,
    Publish,
    PublishDone,
    PublishError,
    RequestsBlocked,
    ServerSetup,
    Subscribe,
    SubscribeError,
    SubscribeNamespace,
    SubscribeNamespaceError,
    SubscribeOk,
    SubscribeUpdate,
    TrackStatus,
    TrackStatusError,
    decode_message,
    encode_message,
)
from relay.moqt.session import (
    SKIPPED_SUBGROUP_RESET_CODE,
    ConnectionClose,
    DatagramWrite,
    FetchAnswered,
    FetchCancelled,
    FetchRequested,
    GoawayReceived,
    MoqtSession,
    NamespaceDone,
    NamespacePublished,
    ObjectChunk,
    ObjectReceived,
    PublishDoneReceived,
    PublishNamespaceAnswered,
    SessionClosed,
    SessionConfig,
    SessionReady,
    SessionState,
    StopSending,
    StreamReset,
    StreamWrite,
    SubgroupStreamClosed,
    SubgroupStreamOpened,
    SubscribeAccepted,
    SubscribeNamespaceAnswered,
    SubscribeNamespaceRequested,
    SubscribeRejected,
    SubscribeRequested,
    UnsubscribeReceived,
    split_namespace,
)

NS = (b"live", b"cam")
TRACK = b"video"


@dataclass
class Pipe:
    """Moves transmits from one session to the other, as QUIC would (in order, reliably)."""

    a: MoqtSession
    b: MoqtSession
    now: float = 0.0
    closes: list[ConnectionClose] = field(default_factory=list)
    resets: list[StreamReset] = field(default_factory=list)
    stops: list[StopSending] = field(default_factory=list)

    def pump(self) -> None:
        for _ in range(20):
            moved = self._move(self.a, self.b) + self._move(self.b, self.a)
            if not moved:
                return

    def _move(self, src: MoqtSession, dst: MoqtSession) -> int:
        transmits = src.transmits()
        for t in transmits:
            if isinstance(t, StreamWrite):
                dst.stream_data_received(t.stream_id, t.data, t.end_stream, self.now)
            elif isinstance(t, DatagramWrite):
                dst.datagram_received(t.data, self.now)
            elif isinstance(t, StreamReset):
                self.resets.append(t)
                dst.stream_reset(t.stream_id, t.error_code, self.now)
            elif isinstance(t, StopSending):
                self.stops.append(t)
            elif isinstance(t, ConnectionClose):
                self.closes.append(t)
                dst.connection_lost(t.error_code, t.reason_phrase, self.now)
        return len(transmits)


def events(session: MoqtSession) -> list[object]:
    out = []
    while (e := session.next_event()) is not None:
        out.append(e)
    return out


def of_type(evs: list[object], cls: type) -> list:
    return [e for e in evs if isinstance(e, cls)]


def pair(**server_kwargs: object) -> tuple[MoqtSession, MoqtSession, Pipe]:
    client = MoqtSession(SessionConfig(is_client=True, path="/relay", authority="h:1"))
    server = MoqtSession(SessionConfig(is_client=False, **server_kwargs))  # type: ignore[arg-type]
    pipe = Pipe(client, server)
    client.connection_made(0.0)
    pipe.pump()
    return client, server, pipe


def control_bytes(session: MoqtSession) -> list[object]:
    """Decode the control messages a session queued (without delivering them)."""
    out = []
    for t in session.transmits():
        if isinstance(t, StreamWrite) and t.stream_id == 0:
            buf = Buffer(data=t.data)
            while not buf.eof():
                out.append(decode_message(buf))
    return out


# -- setup -------------------------------------------------------------------------------------


class TestSetup:
    def test_setup_both_ready(self) -> None:
        client, server, _ = pair()
        (ready_c,) = events(client)
        (ready_s,) = events(server)
        assert isinstance(ready_c, SessionReady) and isinstance(ready_s, SessionReady)
        assert ready_c.version == ready_s.version == MOQT_VERSION_DRAFT_14
        assert (ready_s.path, ready_s.authority) == ("/relay", "h:1")
        assert client.state == server.state == SessionState.READY

    def test_version_negotiation_failed(self) -> None:
        server = MoqtSession(SessionConfig(is_client=False))
        server.stream_data_received(0, encode_message(ClientSetup((0xFF00000D,), ())), False,
                                    0.0)
        (closed,) = events(server)
        assert closed == SessionClosed(SessionErrorCode.VERSION_NEGOTIATION_FAILED,
                                       "No common MoQT version (offered 0xff00000d)", False)
        assert server.transmits()[-1] == ConnectionClose(
            SessionErrorCode.VERSION_NEGOTIATION_FAILED,
            "No common MoQT version (offered 0xff00000d)")
        assert server.stats.protocol_errors == {SessionErrorCode.VERSION_NEGOTIATION_FAILED: 1}

    def test_client_rejects_unoffered_version(self) -> None:
        client = MoqtSession(SessionConfig(is_client=True))
        client.connection_made(0.0)
        client.transmits()
        client.stream_data_received(0, encode_message(ServerSetup(0xFF00000F, ())), False, 0.0)
        (closed,) = events(client)
        assert closed.error_code == SessionErrorCode.VERSION_NEGOTIATION_FAILED

    def test_client_setup_carries_extra_parameters(self) -> None:
        token = (SetupParameter.AUTHORIZATION_TOKEN, b"\x03\x00secret")
        client = MoqtSession(SessionConfig(is_client=True, path="/r", setup_parameters=(token,)))
        client.connection_made(0.0)
        (setup,) = control_bytes(client)
        assert isinstance(setup, ClientSetup)
        assert setup.parameters[-1] == token
        assert dict(setup.parameters)[SetupParameter.PATH] == b"/r"

    def test_moq_rs_client_setup_with_unknown_params(self) -> None:
        # What moq-rs 0.5.1 sends (notes/moqt.md): unknown params must be ignored.
        setup = ClientSetup((MOQT_VERSION_DRAFT_14,), (
            (0x40B5C, 1), (0x40B5A, 1), (SetupParameter.MAX_REQUEST_ID, 2**32 - 1),
            (SetupParameter.MOQT_IMPLEMENTATION, b"moq-lite-rs"),
            (SetupParameter.PATH, b"/x"), (SetupParameter.AUTHORITY, b"127.0.0.1:14433")))
        server = MoqtSession(SessionConfig(is_client=False))
        server.stream_data_received(0, encode_message(setup), False, 0.0)
        (ready,) = events(server)
        assert isinstance(ready, SessionReady) and ready.path == "/x"
        (reply,) = control_bytes(server)
        assert reply.selected_version == MOQT_VERSION_DRAFT_14
        assert dict(reply.parameters)[SetupParameter.MAX_REQUEST_ID] > 1000

    def test_message_before_setup(self) -> None:
        server = MoqtSession(SessionConfig(is_client=False))
        server.stream_data_received(0, encode_message(MaxRequestId(10)), False, 0.0)
        (closed,) = events(server)
        assert (closed.error_code, closed.reason_phrase) == (
            SessionErrorCode.PROTOCOL_VIOLATION, "MAX_REQUEST_ID before CLIENT_SETUP")

    def test_malformed_control_message(self) -> None:
        client, server, pipe = pair()
        events(server)
        server.stream_data_received(0, b"\x3f\x00\x00", False, 0.0)  # unknown type 0x3f
        (closed,) = events(server)
        assert (closed.error_code, closed.reason_phrase) == (
            SessionErrorCode.PROTOCOL_VIOLATION, "Unknown control message type 0x3f")
        pipe.pump()
        assert events(client)[-1] == SessionClosed(SessionErrorCode.PROTOCOL_VIOLATION,
                                                   "Unknown control message type 0x3f", True)
        # A closed session ignores everything after.
        server.stream_data_received(0, b"\xff", False, 0.0)
        assert events(server) == []

    def test_control_stream_fin_and_second_bidi(self) -> None:
        _, server, _ = pair()
        events(server)
        server.stream_data_received(4, b"x", False, 0.0)
        assert events(server)[0].reason_phrase == "Unexpected bidirectional stream 4"
        _, server, _ = pair()
        events(server)
        server.stream_data_received(0, b"", True, 0.0)
        assert events(server)[0].reason_phrase == "The control stream was closed"

    def test_goaway(self) -> None:
        client, server, pipe = pair()
        events(client)
        server.goaway(b"moqt://other:443/x")
        pipe.pump()
        assert events(client) == [GoawayReceived(b"moqt://other:443/x")]
        events(server)
        client.goaway(b"moqt://nope")  # a client may not send a URI
        pipe.pump()
        assert events(server)[0].reason_phrase == "A client's GOAWAY carries a new session URI"

    def test_close_by_command(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        client.close(0, "bye")
        pipe.pump()
        assert events(client) == [SessionClosed(0, "bye", False)]
        assert events(server) == [SessionClosed(0, "bye", True)]


# -- requests ----------------------------------------------------------------------------------


def subscribed(**kw: object) -> tuple[MoqtSession, MoqtSession, Pipe, int]:
    """Server subscribes to the client's track (the relay toward a publisher); accepted."""
    client, server, pipe = pair()
    events(client), events(server)
    rid = server.subscribe(NS, TRACK, **kw)  # type: ignore[arg-type]
    pipe.pump()
    (req,) = events(client)
    assert isinstance(req, SubscribeRequested) and req.request_id == rid == 1
    client.accept_subscribe(rid, track_alias=7)
    pipe.pump()
    (ok,) = events(server)
    assert ok == SubscribeAccepted(rid, 7, ok.message)
    return client, server, pipe, rid


class TestRequests:
    def test_request_id_parity(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        assert client.publish_namespace(NS) == 0
        assert client.subscribe(NS, TRACK) == 2
        assert server.subscribe(NS, TRACK) == 1

    def test_publish_namespace_ok_and_done(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        rid = client.publish_namespace(NS)
        pipe.pump()
        (pub,) = events(server)
        assert pub == NamespacePublished(rid, NS, ())
        server.accept_publish_namespace(rid)
        pipe.pump()
        assert events(client) == [PublishNamespaceAnswered(rid, None)]
        client.publish_namespace_done(NS)
        pipe.pump()
        assert events(server) == [NamespaceDone(NS)]

    def test_publish_namespace_error(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        rid = client.publish_namespace(NS)
        pipe.pump()
        events(server)
        server.reject_publish_namespace(rid, 4, "uninterested")
        pipe.pump()
        assert events(client) == [PublishNamespaceAnswered(rid, 4, "uninterested")]

    def test_subscribe_error(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        rid = client.subscribe(NS, TRACK, filter_type=FilterType.NEXT_GROUP_START)
        pipe.pump()
        (req,) = events(server)
        assert req.message.filter_type == FilterType.NEXT_GROUP_START
        server.reject_subscribe(rid, SubscribeErrorCode.TRACK_DOES_NOT_EXIST, "no track")
        pipe.pump()
        assert events(client) == [SubscribeRejected(rid, 4, "no track")]

    def test_unsubscribe_resets_open_streams(self) -> None:
        client, server, pipe, rid = subscribed()
        sender = client.open_subgroup(rid, 0, 0, 0)
        pipe.pump()
        server.unsubscribe(rid)
        pipe.pump()
        assert events(client) == [UnsubscribeReceived(rid)]
        assert sender.closed and pipe.resets == [StreamReset(sender.stream_id, 1)]
        assert sender.write(0, b"late") is False

    def test_publish_done_counts_streams(self) -> None:
        client, server, pipe, rid = subscribed()
        for g in range(3):
            s = client.open_subgroup(rid, g, 0, 0)
            s.write(0, b"x", end_stream=True)
        client.publish_done(rid, PublishDoneStatusCode.TRACK_ENDED, "end")
        pipe.pump()
        done = of_type(events(server), PublishDoneReceived)
        assert done == [PublishDoneReceived(rid, 2, 3, "end")]

    def test_subscribe_namespace_empty_prefix_answered_not_closed(self) -> None:
        # moq-rs sends SUBSCRIBE_NAMESPACE with an empty prefix on every session.
        client, server, pipe = pair()
        events(client), events(server)
        client.stream_data_received(0, encode_message(SubscribeNamespace(1, ())), False, 0.0)
        (req,) = events(client)
        assert req == SubscribeNamespaceRequested(1, (), ())
        client.reject_subscribe_namespace(1, SubscribeNamespaceErrorCode.NAMESPACE_PREFIX_UNKNOWN)
        assert control_bytes(client) == [SubscribeNamespaceError(1, 4, "")]
        assert client.state == SessionState.READY
        server._next_request_id = 3  # the ID injected above was the server's first
        rid = server.subscribe_namespace((b"live",))
        pipe.pump()
        (req,) = events(client)
        client.accept_subscribe_namespace(rid)
        pipe.pump()
        assert events(server) == [SubscribeNamespaceAnswered(rid, None)]

    def test_joining_fetch_after_subscribe_is_answered(self) -> None:
        # moq-rs follows its SUBSCRIBE with a joining FETCH: answer it, never close.
        client, server, pipe, rid = subscribed()
        fid = server.fetch(joining_request_id=rid, joining_start=0)
        pipe.pump()
        (req,) = events(client)
        assert isinstance(req, FetchRequested) and req.message.joining.joining_request_id == rid
        client.reject_fetch(fid, FetchErrorCode.NOT_SUPPORTED, "no cache")
        pipe.pump()
        assert events(server) == [FetchAnswered(fid, FetchErrorCode.NOT_SUPPORTED, "no cache")]
        assert client.state == server.state == SessionState.READY

    def test_fetch_ok_and_fetch_stream(self) -> None:
        client, server, pipe, rid = subscribed()
        fid = server.fetch(joining_request_id=rid, joining_start=1)
        pipe.pump()
        events(client)
        objects = encode_fetch_stream(FetchHeader(fid), [FetchObject(0, 0, 0, 5, b"cached")])
        header_length = len(encode_fetch_stream(FetchHeader(fid), []))
        stream_id = client.accept_fetch(FetchOk(fid, GroupOrder.ASCENDING, False, Location(0, 1)),
                                        objects[header_length:])
        assert stream_id is not None
        pipe.pump()
        evs = events(server)
        assert of_type(evs, FetchAnswered)[0].error_code is None
        (obj,) = of_type(evs, ObjectReceived)
        assert (obj.request_id, obj.track_alias, obj.payload) == (fid, None, b"cached")
        assert of_type(evs, SubgroupStreamClosed)[0].header == FetchHeader(fid)

    def test_send_messages_built_by_the_relay_core(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        rid = server.subscribe(NS, TRACK)
        pipe.pump()
        events(client)
        client.send(SubscribeOk(rid, 11, 0, GroupOrder.ASCENDING))
        client.send(PublishDone(rid, PublishDoneStatusCode.TRACK_ENDED, 4, "done"))
        pipe.pump()
        evs = events(server)
        assert of_type(evs, SubscribeAccepted)[0].track_alias == 11
        assert of_type(evs, PublishDoneReceived) == [PublishDoneReceived(rid, 2, 4, "done")]
        with pytest.raises(KeyError, match="No pending SUBSCRIBE with request ID 99"):
            client.send(SubscribeError(99, 0, "x"))
        with pytest.raises(ValueError, match="Use the Subscribe command"):
            client.send(Subscribe(0, NS, TRACK, 0, GroupOrder.ASCENDING, True,
                                  FilterType.LARGEST_OBJECT))

    def test_forward_raw_stream_with_reserved_id(self) -> None:
        client, server, pipe, rid = subscribed()
        upstream = encode_subgroup_stream(SubgroupHeader.new(7, 3, 0, extensions=True),
                                          [SubgroupObject(0, b"a", TS_EXT),
                                           SubgroupObject(1, b"b")])
        header = SubgroupHeader.new(7, 3, 64, extensions=True)
        sender = client.open_subgroup(rid, 0, 0, 0, header=header, stream_id=2 + 4 * 5)
        assert sender.stream_id == 22 and client.stream_priorities[22] == (128, 64)
        sender.write_raw(upstream[len(encode_subgroup_stream(header, [])):], end_stream=True)
        pipe.pump()
        objs = of_type(events(server), ObjectReceived)
        assert [(o.stream_id, o.payload, o.header.extensions) for o in objs] == [
            (22, b"a", TS_EXT), (22, b"b", b"")]

    def test_publish_and_track_status_not_supported(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        server.stream_data_received(0, encode_message(Publish(
            0, NS, TRACK, 3, GroupOrder.ASCENDING, None, True)), False, 0.0)
        server.stream_data_received(0, encode_message(TrackStatus(
            2, NS, TRACK, 0, GroupOrder.ASCENDING, True, FilterType.LARGEST_OBJECT)), False, 0.0)
        replies = control_bytes(server)
        assert replies == [
            PublishError(0, PublishErrorCode.NOT_SUPPORTED,
                         "PUBLISH is not supported; use PUBLISH_NAMESPACE"),
            TrackStatusError(2, SubscribeErrorCode.NOT_SUPPORTED, "TRACK_STATUS is not supported"),
        ]
        assert server.state == SessionState.READY

    def test_requests_without_credit_tolerated(self) -> None:
        server = MoqtSession(SessionConfig(is_client=False, request_credit=4))
        server.stream_data_received(0, encode_message(ClientSetup((MOQT_VERSION_DRAFT_14,))),
                                    False, 0.0)
        for rid in (0, 2, 10):  # 10 overtakes the credit granted so far (4, then 6)
            server.stream_data_received(0, encode_message(SubscribeNamespace(rid, ())), False,
                                        0.0)
        assert server.state == SessionState.READY
        assert server.stats.requests_without_credit >= 1
        # ... and credit is topped up with MAX_REQUEST_ID as it is used.
        assert any(isinstance(m, MaxRequestId) for m in control_bytes(server))

    def test_requests_without_credit_enforced(self) -> None:
        server = MoqtSession(SessionConfig(is_client=False, request_credit=2,
                                           enforce_request_credit=True))
        server.stream_data_received(0, encode_message(ClientSetup((MOQT_VERSION_DRAFT_14,))),
                                    False, 0.0)
        server.stream_data_received(0, encode_message(SubscribeNamespace(2, ())), False, 0.0)
        closed = of_type(events(server), SessionClosed)[0]
        assert (closed.error_code, closed.reason_phrase) == (
            SessionErrorCode.TOO_MANY_REQUESTS, "Request ID 2 exceeds the maximum 1")

    def test_our_requests_wait_for_credit(self) -> None:
        client = MoqtSession(SessionConfig(is_client=True))
        client.connection_made(0.0)
        client.transmits()
        client.stream_data_received(0, encode_message(ServerSetup(MOQT_VERSION_DRAFT_14, ())),
                                    False, 0.0)
        client.subscribe(NS, TRACK)
        assert control_bytes(client) == [RequestsBlocked(0)]
        client.stream_data_received(0, encode_message(MaxRequestId(10)), False, 0.0)
        (sub,) = control_bytes(client)
        assert isinstance(sub, Subscribe) and sub.request_id == 0

    def test_request_id_rules(self) -> None:
        def server_after(*rids: int) -> MoqtSession:
            server = MoqtSession(SessionConfig(is_client=False))
            server.stream_data_received(
                0, encode_message(ClientSetup((MOQT_VERSION_DRAFT_14,))), False, 0.0)
            for rid in rids:
                server.stream_data_received(0, encode_message(SubscribeNamespace(rid, ())),
                                            False, 0.0)
            return server

        wrong_parity = of_type(events(server_after(1)), SessionClosed)[0]
        assert (wrong_parity.error_code, wrong_parity.reason_phrase) == (
            SessionErrorCode.INVALID_REQUEST_ID, "Request ID 1 has the wrong parity")
        reused = of_type(events(server_after(0, 0)), SessionClosed)[0]
        assert reused.reason_phrase == "Request ID 0 was already used"
        # Overtaken IDs (moq-rs allocates them on concurrent tasks) are fine, once each.
        server = server_after(4, 0, 2)
        assert server.state == SessionState.READY
        assert of_type(events(server_after(4, 2, 2)), SessionClosed)

    def test_requests_blocked_is_answered_with_credit(self) -> None:
        server = MoqtSession(SessionConfig(is_client=False, request_credit=4))
        server.stream_data_received(0, encode_message(ClientSetup((MOQT_VERSION_DRAFT_14,))),
                                    False, 0.0)
        (setup,) = control_bytes(server)
        granted = dict(setup.parameters)[SetupParameter.MAX_REQUEST_ID]
        server.stream_data_received(0, encode_message(RequestsBlocked(granted)), False, 0.0)
        (more,) = control_bytes(server)
        assert isinstance(more, MaxRequestId) and more.request_id > granted
        assert server.state == SessionState.READY

    def test_fetch_cancel_reaches_the_fetch_owner(self) -> None:
        client, server, pipe, rid = subscribed()
        fid = server.fetch(joining_request_id=rid, joining_start=0)
        pipe.pump()
        assert [type(e) for e in events(client)] == [FetchRequested]
        server.fetch_cancel(fid)
        pipe.pump()
        assert events(client) == [FetchCancelled(fid)]
        client.stream_data_received(0, encode_message(FetchCancel(fid)), False, 0.0)  # again
        assert events(client) == []  # a repeated or late cancel is not an error
        assert client.state == server.state == SessionState.READY

    def test_subscribe_update_is_tolerated_without_an_answer(self) -> None:
        # Draft-14 section 9.10: SUBSCRIBE_UPDATE has no response; we keep the subscription.
        client, server, pipe, rid = subscribed()
        server.send(SubscribeUpdate(3, rid, Location(5, 0), 0, 1, True))
        pipe.pump()
        assert events(client) == [] and control_bytes(client) == []
        assert client.state == server.state == SessionState.READY
        assert client.publication_alias(rid) == 7

    def test_response_to_unknown_request(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        client.stream_data_received(0, encode_message(SubscribeOk(1, 1, 0, GroupOrder.ASCENDING)),
                                    False, 0.0)
        closed = of_type(events(client), SessionClosed)[0]
        assert closed.reason_phrase == \
            "SUBSCRIBE_OK for request ID 1, which is not a pending SUBSCRIBE"

    def test_duplicate_track_alias(self) -> None:
        client, server, pipe, rid = subscribed()
        rid2 = server.subscribe(NS, b"audio")
        pipe.pump()
        events(client)
        server.stream_data_received(0, encode_message(
            SubscribeOk(rid2, 7, 0, GroupOrder.ASCENDING)), False, 0.0)
        closed = of_type(events(server), SessionClosed)[0]
        assert closed.error_code == SessionErrorCode.DUPLICATE_TRACK_ALIAS
        with pytest.raises(ValueError, match="Track alias 7 is already in use"):
            client.accept_subscribe(rid2, 7)


# -- data --------------------------------------------------------------------------------------

TS_EXT = encode_extension_headers(((0x10, 1234),))


class TestData:
    def test_subgroup_objects_verbatim_extensions(self) -> None:
        client, server, pipe, rid = subscribed()
        s0 = client.open_subgroup(rid, 5, 0, 0)
        s1 = client.open_subgroup(rid, 5, 1, 128, end_of_group=True)
        s0.write(0, b"key", extensions=TS_EXT, end_stream=True)
        s1.write(1, b"p1", extensions=TS_EXT)
        s1.write(2, b"p2")
        s1.finish()
        assert client.stream_priorities[s0.stream_id] == (128, 0)
        assert client.stream_priorities[s1.stream_id] == (128, 128)
        pipe.pump()
        evs = events(server)
        objs = of_type(evs, ObjectReceived)
        assert [(o.header.group_id, o.header.subgroup_id, o.header.object_id, o.payload)
                for o in objs] == [(5, 0, 0, b"key"), (5, 1, 1, b"p1"), (5, 1, 2, b"p2")]
        assert objs[0].header.extensions == TS_EXT and objs[2].header.extensions == b""
        assert all(o.track_alias == 7 and o.request_id == rid for o in objs)
        opened = of_type(evs, SubgroupStreamOpened)
        assert [o.header.publisher_priority for o in opened] == [0, 128]
        closed = of_type(evs, SubgroupStreamClosed)
        assert [c.reset_code for c in closed] == [None, None]

    def test_stream_priorities_from_subscriber_then_publisher_priority(self) -> None:
        """Each subgroup stream is keyed (subscriber priority of its SUBSCRIBE, publisher
        priority of its header), lower first: the QUIC connection sends in that order
        (test_priority_hook_serves_high_priority_first)."""
        client, server, pipe = pair()
        events(client), events(server)
        low = server.subscribe(NS, b"background", subscriber_priority=200)
        high = server.subscribe(NS, b"urgent", subscriber_priority=3)
        pipe.pump()
        for req in of_type(events(client), SubscribeRequested):
            client.accept_subscribe(req.request_id, track_alias=req.request_id)
        streams = {
            "low/key": client.open_subgroup(low, 0, 0, 0),
            "low/delta": client.open_subgroup(low, 0, 1, 128),
            "high/delta": client.open_subgroup(high, 0, 1, 128),
            "high/key": client.open_subgroup(high, 0, 0, 0),
        }
        keys = {name: client.stream_priorities[s.stream_id] for name, s in streams.items()}
        assert keys == {"low/key": (200, 0), "low/delta": (200, 128),
                        "high/delta": (3, 128), "high/key": (3, 0)}
        assert sorted(keys, key=keys.__getitem__) == [
            "high/key", "high/delta", "low/key", "low/delta"]

    def test_chunks_mode(self) -> None:
        client = MoqtSession(SessionConfig(is_client=True))
        server = MoqtSession(SessionConfig(is_client=False, deliver_chunks=True))
        pipe = Pipe(client, server)
        client.connection_made(0.0)
        pipe.pump()
        events(client), events(server)
        rid = server.subscribe(NS, TRACK)
        pipe.pump()
        client.accept_subscribe(rid, 1)
        pipe.pump()
        events(server)
        data = encode_subgroup_stream(SubgroupHeader.new(1, 0, 0, extensions=True),
                                      [SubgroupObject(0, b"abcdef", TS_EXT)])
        for i in range(len(data)):
            server.stream_data_received(2, data[i:i + 1], i == len(data) - 1, 0.0)
        chunks = of_type(events(server), ObjectChunk)
        assert b"".join(c.data for c in chunks) == b"abcdef"
        assert chunks[0].start and chunks[-1].end and chunks[0].header.extensions == TS_EXT

    def test_skipped_subgroup_reset(self) -> None:
        client, server, pipe, rid = subscribed()
        s1 = client.open_subgroup(rid, 0, 1, 128)
        s1.write(1, b"a")
        s1.skip()
        pipe.pump()
        assert pipe.resets == [StreamReset(s1.stream_id, SKIPPED_SUBGROUP_RESET_CODE, True)]
        (closed,) = of_type(events(server), SubgroupStreamClosed)
        assert closed.reset_code == SKIPPED_SUBGROUP_RESET_CODE == 2
        assert closed.header.subgroup_id == 1

    def test_data_before_subscribe_ok_is_held_then_delivered(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        rid = server.subscribe(NS, TRACK)
        pipe.pump()
        # moq-rs sends data right after SUBSCRIBE: it overtakes the SUBSCRIBE_OK.
        stream = encode_subgroup_stream(SubgroupHeader.new(9, 0, 0),
                                        [SubgroupObject(0, b"early")])
        server.stream_data_received(2, stream, True, 0.1)
        server.datagram_received(encode_object_datagram(ObjectDatagram.new(9, 1, 0, 0, b"dg")),
                                 0.1)
        assert events(server) == []
        assert server.get_timer() == pytest.approx(1.1)
        server.stream_data_received(0, encode_message(
            SubscribeOk(rid, 9, 0, GroupOrder.ASCENDING)), False, 0.2)
        evs = events(server)
        assert [type(e).__name__ for e in evs] == [
            "SubscribeAccepted", "SubgroupStreamOpened", "ObjectReceived",
            "SubgroupStreamClosed", "ObjectReceived"]
        assert [o.payload for o in of_type(evs, ObjectReceived)] == [b"early", b"dg"]
        assert server.get_timer() is None

    def test_reset_before_subscribe_ok_is_held(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        rid = server.subscribe(NS, TRACK)
        pipe.pump()
        header = SubgroupHeader.new(9, 0, 1)
        server.stream_data_received(2, encode_subgroup_stream(header, []), False, 0.1)
        server.stream_reset(2, SKIPPED_SUBGROUP_RESET_CODE, 0.1)
        server.stream_data_received(0, encode_message(
            SubscribeOk(rid, 9, 0, GroupOrder.ASCENDING)), False, 0.2)
        (closed,) = of_type(events(server), SubgroupStreamClosed)
        assert (closed.header, closed.reset_code) == (header, SKIPPED_SUBGROUP_RESET_CODE)

    def test_held_data_expires(self) -> None:
        client, server, pipe = pair()
        events(client), events(server)
        header = SubgroupHeader.new(42, 0, 0)
        server.stream_data_received(2, encode_subgroup_stream(header, [SubgroupObject(0, b"x")]),
                                    False, 5.0)
        server.handle_timer(5.5)
        assert server.stats.unknown_alias_drops == 0
        server.handle_timer(6.0)
        assert server.stats.unknown_alias_drops == 1
        assert server.transmits() == [StopSending(2, 1)]
        assert server.get_timer() is None

    def test_held_data_bounded(self) -> None:
        client = MoqtSession(SessionConfig(is_client=True))
        server = MoqtSession(SessionConfig(is_client=False, max_unknown_alias_bytes=100))
        pipe = Pipe(client, server)
        client.connection_made(0.0)
        pipe.pump()
        header = SubgroupHeader.new(42, 0, 0)
        server.stream_data_received(2, encode_subgroup_stream(
            header, [SubgroupObject(0, b"x" * 200)]), False, 0.0)
        assert server.stats.unknown_alias_drops == 1

    def test_datagram_status_and_extensions(self) -> None:
        client, server, pipe, rid = subscribed()
        client.send_datagram(rid, 3, 4, 10, b"pay", extensions=TS_EXT)
        pipe.pump()
        (obj,) = of_type(events(server), ObjectReceived)
        assert (obj.stream_id, obj.header.group_id, obj.header.object_id, obj.payload,
                obj.header.extensions) == (None, 3, 4, b"pay", TS_EXT)

    def test_forward_datagram_changes_only_the_alias(self) -> None:
        client, server, pipe, rid = subscribed()  # the publication's alias is 7
        upstream = ObjectDatagram(0x21, 99, 3, 4, 10, TS_EXT, status=ObjectStatus.END_OF_GROUP)
        data = client.forward_datagram(rid, upstream)
        assert data == encode_object_datagram(dataclasses.replace(upstream, track_alias=7))
        pipe.pump()
        (obj,) = of_type(events(server), ObjectReceived)
        assert (obj.track_alias, obj.datagram) == (7, dataclasses.replace(upstream,
                                                                          track_alias=7))
        with pytest.raises(KeyError):
            client.forward_datagram(rid + 2, upstream)

    def test_malformed_data_stream_closes(self) -> None:
        client, server, pipe, rid = subscribed()
        server.stream_data_received(2, b"\x07", False, 0.0)  # unknown stream type
        closed = of_type(events(server), SessionClosed)[0]
        assert (closed.error_code, closed.reason_phrase) == (
            SessionErrorCode.PROTOCOL_VIOLATION, "Unknown data stream type 0x7")

    def test_stream_ends_mid_object(self) -> None:
        client, server, pipe, rid = subscribed()
        data = encode_subgroup_stream(SubgroupHeader.new(7, 0, 0), [SubgroupObject(0, b"abc")])
        server.stream_data_received(2, data[:-1], True, 0.0)
        closed = of_type(events(server), SessionClosed)[0]
        assert closed.reason_phrase == "Data stream ended in the middle of an object"
        assert server.stats.protocol_errors == {SessionErrorCode.PROTOCOL_VIOLATION: 1}

    def test_malformed_datagram_closes(self) -> None:
        client, server, pipe, rid = subscribed()
        server.datagram_received(b"\x01\x07\x00\x00\x05\x00", 0.0)  # extensions length 0
        closed = of_type(events(server), SessionClosed)[0]
        assert closed.reason_phrase == \
            "Object datagram has Extensions Present with Extension Headers Length 0"

    def test_end_of_track_status_object(self) -> None:
        client, server, pipe, rid = subscribed()
        s = client.open_subgroup(rid, 9, 0, 0, end_of_group=True)
        s.write(0, status=ObjectStatus.END_OF_TRACK, end_stream=True)
        pipe.pump()
        (obj,) = of_type(events(server), ObjectReceived)
        assert (obj.header.status, obj.payload) == (ObjectStatus.END_OF_TRACK, b"")


def test_split_namespace() -> None:
    assert split_namespace("live/cam") == NS
    assert split_namespace("/a/") == (b"a",)
    with pytest.raises(ValueError):
        split_namespace("/")


def test_message_types_all_handled() -> None:
    # Every message a peer may send has a handler; the rest are responses we never solicit.
    unsolicited = {MessageType.PUBLISH_OK, MessageType.PUBLISH_ERROR,
                   MessageType.TRACK_STATUS_OK, MessageType.TRACK_STATUS_ERROR}
    assert set(MessageType) - set(MoqtSession._handlers) == unsolicited
