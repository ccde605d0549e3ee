"""`soft`: QUIC header protection and AEAD in a kernel-side eBPF shim below the fast path.

The shim does ChaCha20-Poly1305 in plain eBPF (bcc cannot call the kernel's crypto
kfuncs), so this backend negotiates TLS_CHACHA20_POLY1305_SHA256 with every peer.
"""

from __future__ import annotations

from typing import ClassVar

from aioquic.tls import CipherSuite

from crypto_backends.base import AEAD_TAG_SIZE, CryptoBackend
from relay.errors import MissingCapabilityError


class SoftBackend(CryptoBackend):
    name: ClassVar[str] = "soft"
    offloads_1rtt: ClassVar[bool] = True
    tag_size: ClassVar[int] = AEAD_TAG_SIZE

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        return (CipherSuite.CHACHA20_POLY1305_SHA256,)

    def check(self) -> None:
        super().check()
        raise MissingCapabilityError(
            "crypto backend 'soft' cannot run yet: its kernel shim (bpf/ ChaCha20-Poly1305 "
            "header protection and AEAD) is not part of this build; use --crypto=none or no --crypto")
