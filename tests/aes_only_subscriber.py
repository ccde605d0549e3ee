"""A fastrelay subscriber whose TLS offers AES-128-GCM only: the test peer that cannot use a
`--crypto soft` relay's ChaCha20-Poly1305 (stock aioquic crypto, nothing offloaded).

    python -m tests.aes_only_subscriber URL NAMESPACE TRACK EXPECT_OBJECTS DURATION

Prints `subscribed` on stderr once SUBSCRIBE_OK arrived, then the subscriber's JSON summary
on stdout; exit 0 only if every expected object arrived intact.
"""

from __future__ import annotations

import sys
from typing import ClassVar

from aioquic.tls import CipherSuite

from crypto_backends.base import CryptoBackend
from relay.publisher import namespace_option, run_endpoint, show_summary, tls_options
from relay.subscriber import SubscriberOptions, run_subscriber, summary_rows


class AesOnly(CryptoBackend):
    """Standard QUIC (aioquic's own AEAD) offering only TLS_AES_128_GCM_SHA256."""

    name: ClassVar[str] = "aes-only"
    offloads_1rtt: ClassVar[bool] = False
    tag_size: ClassVar[int] = 16

    @property
    def cipher_suites(self) -> tuple[CipherSuite, ...]:
        return (CipherSuite.AES_128_GCM_SHA256,)

    def check(self) -> None:
        return None


def main(argv: list[str]) -> int:
    url, namespace, track, expect, duration = argv
    opts = SubscriberOptions(url=url, namespace=namespace_option(namespace), track=track.encode(),
                             tls=tls_options(True, None, None), expect_objects=int(expect),
                             duration=float(duration), crypto=AesOnly())
    summary = run_endpoint(run_subscriber(
        opts, on_subscribed=lambda: print("subscribed", file=sys.stderr, flush=True)))
    show_summary(summary_rows(summary), summary, True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
