"""`nic`: 1-RTT protection done by the NIC, keys pushed through its driver.

No mainline driver offloads QUIC packet protection; the probe names what is missing and
this backend refuses to start wherever the probe does.
"""

from __future__ import annotations

from typing import ClassVar

from aioquic.tls import CipherSuite

from crypto_backends.base import AEAD_TAG_SIZE, CryptoBackend


class NicBackend(CryptoBackend):
    name: ClassVar[str] = "nic"
    offloads_1rtt: ClassVar[bool] = True
    tag_size: ClassVar[int] = AEAD_TAG_SIZE

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        # AES-128-GCM is the suite every TLS 1.3 stack must offer (RFC 8446 §9.1).
        return (CipherSuite.AES_128_GCM_SHA256,)
