"""`none`: 1-RTT encryption negotiated off, as in the original research prototype.

Both endpoints send the `disable_1rtt_encryption` transport parameter
(draft-banks-quic-disable-encryption); only then are 1-RTT packets sent with neither
header nor payload protection and without a tag. The handshake stays encrypted.
"""

from __future__ import annotations

from typing import ClassVar

from aioquic.tls import CipherSuite

from crypto_backends.base import CryptoBackend

#: draft-banks-quic-disable-encryption §3: a zero-length transport parameter.
DISABLE_1RTT_ENCRYPTION = 0xBAAD


class NoneBackend(CryptoBackend):
    name: ClassVar[str] = "none"
    offloads_1rtt: ClassVar[bool] = False
    tag_size: ClassVar[int] = 0

    def check(self) -> None:
        """Always usable: null 1-RTT needs nothing from the kernel. (The probe's `none`
        verdict is about the fast path with this backend; the relay checks that itself.)"""

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        # Only the handshake is protected; any TLS 1.3 suite will do.
        return (CipherSuite.AES_128_GCM_SHA256, CipherSuite.CHACHA20_POLY1305_SHA256,
                CipherSuite.AES_256_GCM_SHA384)
