"""`FastrelayQuicConnection`: aioquic's QuicConnection with a crypto backend plugged into 1-RTT.

Without a backend it is stock aioquic: standard QUIC. With `none` it offers
`disable_1rtt_encryption` and insists the peer does too; with an offloading backend its
1-RTT packets take the plaintext layout and its keys go to the backend.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionError
from aioquic.quic.packet import QuicErrorCode, QuicFrameType

from crypto_backends.base import CryptoBackend
from crypto_backends.none import DISABLE_1RTT_ENCRYPTION
from relay.quic.crypto import OneRttCryptoPair, OneRttMode

_connection_numbers = itertools.count(1)


def encode_transport_parameter(param_id: int, value: bytes = b"") -> bytes:
    """One transport parameter, RFC 9000 §18: id (varint), length (varint), value."""
    buf = Buffer(capacity=16 + len(value))
    buf.push_uint_var(param_id)
    buf.push_uint_var(len(value))
    buf.push_bytes(value)
    return buf.data


def has_transport_parameter(data: bytes, param_id: int) -> bool:
    """Whether encoded transport parameters contain `param_id` (malformed input: False)."""
    buf = Buffer(data=data)
    try:
        while not buf.eof():
            current = buf.pull_uint_var()
            buf.pull_bytes(buf.pull_uint_var())
            if current == param_id:
                return True
    except BufferReadError:
        return False
    return False


class PeerRefusedNullCrypto(QuicConnectionError):
    """--crypto=none demands disable_1rtt_encryption and the peer did not send it."""


class FastrelayQuicConnection(QuicConnection):
    def __init__(self, *, configuration: QuicConfiguration,
                 crypto_backend: CryptoBackend | None = None, **kwargs: Any) -> None:
        self.crypto_backend = crypto_backend
        #: The number backends and the kernel maps know this connection by.
        self.connection_number = next(_connection_numbers)
        if crypto_backend is not None:
            # As TLS server this order decides; as client it is all we offer.
            configuration = dataclasses.replace(
                configuration, cipher_suites=list(crypto_backend.cipher_suites))
        super().__init__(configuration=configuration, **kwargs)

    @property
    def one_rtt_mode(self) -> OneRttMode:
        pair = self._cryptos.get(tls.Epoch.ONE_RTT) if hasattr(self, "_cryptos") else None
        return pair.mode if isinstance(pair, OneRttCryptoPair) else OneRttMode.STANDARD

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if self.crypto_backend is None:
            return
        # No 1-RTT key exists yet and nothing else holds the stock pair: swap it, keeping
        # its qlog callbacks.
        stock = self._cryptos[tls.Epoch.ONE_RTT]
        self._cryptos[tls.Epoch.ONE_RTT] = OneRttCryptoPair(
            backend=self.crypto_backend,
            connection=self.connection_number,
            recv_setup_cb=stock.recv._setup_cb,
            recv_teardown_cb=stock.recv._teardown_cb,
            send_setup_cb=stock.send._setup_cb,
            send_teardown_cb=stock.send._teardown_cb,
        )

    def _wants_null_crypto(self) -> bool:
        return self.crypto_backend is not None and self.crypto_backend.name == "none"

    def _serialize_transport_parameters(self) -> bytes:
        data = super()._serialize_transport_parameters()
        if self._wants_null_crypto():
            data += encode_transport_parameter(DISABLE_1RTT_ENCRYPTION)
        return data

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)
        if not self._wants_null_crypto() or from_session_ticket:
            return
        if not has_transport_parameter(data, DISABLE_1RTT_ENCRYPTION):
            raise PeerRefusedNullCrypto(
                error_code=QuicErrorCode.TRANSPORT_PARAMETER_ERROR,
                frame_type=QuicFrameType.CRYPTO,
                reason_phrase="--crypto=none requires the peer to send disable_1rtt_encryption "
                              "(0xBAAD, draft-banks-quic-disable-encryption); it did not",
            )
        pair = self._cryptos[tls.Epoch.ONE_RTT]
        assert isinstance(pair, OneRttCryptoPair)
        pair.enable_null()
