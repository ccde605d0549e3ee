"""`fastrelay relay`: run the userspace MoQ relay (MoQT draft-14, raw QUIC, ALPN `moq-00`).

stdout: `fingerprint sha256:<hex>` (the certificate's SHA-256, for clients' --fingerprint),
then `listening <host>:<port>` once serving, then `fastpath on: <interfaces>` or
`fastpath off: <why>`; on exit one `stats {...}` JSON line.
Runs until SIGINT/SIGTERM (exit 0) or --duration.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from crypto_backends.soft import SoftBackend
from relay.control import ControlServer
from relay.core.access import AccessConfig
from relay.core.cache import CacheConfig
from relay.core.relay import RelayConfig
from relay.errors import ConfigError, FastrelayError, MissingCapabilityError
from relay.fastpath.layout import Capacities
from relay.fastpath.runtime import (
    FastPathMode,
    FastPathRuntime,
    canonical_address,
    unavailable_reason,
)
from relay.moqt.quic import (
    TlsOptions,
    certificate_fingerprint,
    generate_certificate,
    parse_url,
)
from relay.publisher import crypto_option
from relay.server import RelayServer


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT (e.g. 127.0.0.1:4443 or "
                          "[::1]:4443)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def _say(line: str) -> None:
    print(line, flush=True)


async def _serve(server: RelayServer, host: str, port: int, cert: Path, key: Path,
                 duration: float | None, fastpath_line: str = "") -> None:
    loop = asyncio.get_running_loop()
    try:
        bound_host, bound_port = await server.start(host, port, cert, key)
    except OSError as exc:
        why = "address already in use" if exc.errno == errno.EADDRINUSE else \
            (exc.strerror or str(exc))
        raise FastrelayError(f"cannot listen on {host}:{port}: {why}") from None
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if server.fastpath is not None:
        server.fastpath.port = bound_port
    ctl = ControlServer(server.stats, listen=f"{shown}:{bound_port}")
    _say(f"listening {shown}:{bound_port}")
    if fastpath_line:
        _say(fastpath_line)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await ctl.start()
        await asyncio.wait_for(stop.wait(), duration)
    except asyncio.TimeoutError:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await ctl.stop()
        await server.stop()


def relay_command(
    listen: Annotated[str, typer.Option("--listen", metavar="HOST:PORT",
                                        help="UDP address to serve MoQ on (port 0: any).")],
    cert: Annotated[Path | None, typer.Option("--cert", help="TLS certificate (PEM).")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="TLS private key (PEM).")] = None,
    upstream: Annotated[str | None, typer.Option(
        "--upstream", metavar="URL",
        help="moqt://host:port/path of a relay to subscribe to for tracks published "
             "nowhere here.")] = None,
    upstream_fingerprint: Annotated[str | None, typer.Option(
        "--upstream-fingerprint", metavar="SHA256",
        help="Pin the upstream relay's certificate (SHA-256 hex).")] = None,
    upstream_insecure: Annotated[bool, typer.Option(
        "--upstream-insecure", help="Do not verify the upstream's certificate (tests only).")]
    = False,
    cache_groups: Annotated[int, typer.Option("--cache-groups", min=1,
                                              help="Groups cached per track.")] = 8,
    cache_bytes: Annotated[int, typer.Option("--cache-bytes", min=1,
                                             help="Bytes cached per track.")] = 16 << 20,
    access: Annotated[Path | None, typer.Option(
        "--access", metavar="FILE.toml", help="Tokens and namespace allow-lists.")] = None,
    queue_budget: Annotated[int, typer.Option(
        "--queue-budget", metavar="BYTES", min=0,
        help="Per subscriber: unsent bytes that count as full load for the skip policy "
             "(lower-priority subgroups are skipped above 110 %); 0 = never skip.")] = 0,
    crypto: Annotated[str | None, typer.Option(
        "--crypto", metavar="BACKEND",
        help="1-RTT protection for every connection: none (encryption negotiated off with "
             "disable_1rtt_encryption; peers must agree), soft (kernel shim), nic (NIC). "
             "Default: standard QUIC.")] = None,
    crypto_interface: Annotated[list[str] | None, typer.Option(
        "--crypto-interface", metavar="IFNAME",
        help="With --crypto soft: attach the shim to this interface (repeatable). Default: "
             "every up non-loopback interface of the relay's network namespace.")] = None,
    fastpath: Annotated[FastPathMode, typer.Option(
        "--fastpath", case_sensitive=False,
        help="Forward publishers' packets to subscribers from the kernel (eBPF on TC): auto "
             "uses it where this machine and --crypto allow and says so at start; on "
             "refuses to start without it.")] = FastPathMode.AUTO,
    capacity: Annotated[list[str] | None, typer.Option(
        "--fastpath-capacity", metavar="NAME=N",
        help="Size of a fast-path map or limit (repeatable), e.g. max_subscribers_per_upstream"
             "=128 (the fan-out per publisher connection; beyond it subscribers are served by "
             "userspace, counted), max_subscribers, max_subscriber_streams, ringbuf_pages. A "
             "full map punts to userspace and is counted.")] = None,
    interface: Annotated[list[str] | None, typer.Option(
        "--interface", metavar="IFNAME",
        help="Attach the fast path to this interface (repeatable). Default: every up "
             "non-loopback interface of the relay's network namespace.")] = None,
    userspace_peer: Annotated[list[str] | None, typer.Option(
        "--userspace-peer", metavar="ADDRESS",
        help="Serve subscribers connecting from this IP address on the userspace path even "
             "with the fast path on (repeatable): the same objects then reach some "
             "subscribers through the kernel and others through userspace at once, for "
             "paired measurements.")] = None,
    duration: Annotated[float | None, typer.Option(
        "--duration", min=0.0, metavar="S", help="Stop after S seconds.")] = None,
    key_update_every: Annotated[float | None, typer.Option(
        "--key-update-every", min=0.1, metavar="S",
        help="With --fastpath and --crypto soft: start a 1-RTT key update on every offloaded "
             "connection every S seconds (each once the peer acknowledged a packet of the "
             "current phase).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log to stderr.")] = False,
) -> None:
    """Run the MoQ relay (userspace path) until SIGINT/SIGTERM or --duration."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # An unusable backend stops the command with the probe's reason before anything is set up.
    backend = crypto_option(crypto)
    if crypto_interface:
        if not isinstance(backend, SoftBackend):
            raise ConfigError("--crypto-interface goes with --crypto soft")
        backend.interfaces = list(crypto_interface)
    host, port = parse_listen(listen)
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together")
    upstream_tls = TlsOptions()
    if upstream is not None:
        try:
            parse_url(upstream)
        except ValueError as exc:
            raise ConfigError(f"--upstream: {exc}") from None
        if upstream_insecure and upstream_fingerprint:
            raise ConfigError("--upstream-insecure cannot be combined with "
                              "--upstream-fingerprint")
        upstream_tls = TlsOptions(insecure=upstream_insecure, fingerprint=upstream_fingerprint)
    try:
        cache = CacheConfig(max_groups=cache_groups, max_bytes=cache_bytes)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    access_config = AccessConfig.open()
    if access is not None:
        try:
            access_config = AccessConfig.from_toml(access.read_text())
        except OSError as exc:
            raise ConfigError(f"--access {access}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--access {access}: {exc}") from None
    config = RelayConfig(cache=cache, access=access_config, upstream_relay=upstream is not None)
    if (interface or capacity or userspace_peer) and fastpath == FastPathMode.OFF:
        raise ConfigError("--interface, --fastpath-capacity and --userspace-peer go with "
                          "--fastpath on or auto")
    userspace_peers: set[str] = set()
    for address in userspace_peer or []:
        try:
            userspace_peers.add(str(ipaddress.ip_address(address)))
        except ValueError:
            raise ConfigError(f"--userspace-peer {address}: not an IP address") from None
    try:
        caps = Capacities.parse(capacity or [])
    except ValueError as exc:
        raise ConfigError(f"--fastpath-capacity {exc}") from None
    if key_update_every is not None and (crypto != "soft" or fastpath == FastPathMode.OFF):
        raise ConfigError("--key-update-every goes with --crypto soft and --fastpath on or auto")
    fastpath_reason = None if fastpath == FastPathMode.OFF else unavailable_reason(crypto, host)
    if fastpath == FastPathMode.ON and fastpath_reason is not None:
        raise MissingCapabilityError(f"--fastpath on: {fastpath_reason}")
    with tempfile.TemporaryDirectory(prefix="fastrelay-cert-") as tmp:
        if cert is None or key is None:
            cert_pem, key_pem, fingerprint = generate_certificate(
                ["localhost", host if host not in ("0.0.0.0", "::") else "127.0.0.1"])
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(cert_pem)
            key.write_bytes(key_pem)
        else:
            for path, what in ((cert, "--cert"), (key, "--key")):
                if not path.is_file():
                    raise ConfigError(f"{what} {path}: no such file")
            try:
                fingerprint = certificate_fingerprint(cert.read_bytes())
            except ValueError as exc:
                raise ConfigError(f"--cert {cert}: not a PEM certificate ({exc})") from None
        _say(f"fingerprint sha256:{fingerprint}")
        runtime: FastPathRuntime | None = None
        if fastpath == FastPathMode.OFF:
            fastpath_line = "fastpath off: --fastpath off"
        elif fastpath_reason is not None:
            fastpath_line = f"fastpath off: {fastpath_reason}"
        else:
            runtime = FastPathRuntime.open(port=port, interface_names=interface, caps=caps)
            runtime.userspace_peers = frozenset(canonical_address(a) for a in userspace_peers)
            runtime.use_crypto(backend)
            runtime.key_update_every = key_update_every
            fastpath_line = "fastpath on: " + ", ".join(name for _, name in runtime.interfaces)
        server = RelayServer(config, upstream_url=upstream, upstream_tls=upstream_tls,
                             queue_budget=queue_budget, crypto=backend, fastpath=runtime)
        try:
            asyncio.run(_serve(server, host, port, cert, key, duration, fastpath_line))
            _say("stats " + json.dumps(server.stats(), sort_keys=True))
        except ValueError as exc:  # e.g. a key that does not match the certificate
            raise ConfigError(f"cannot use --cert/--key: {exc}") from None
        finally:
            if runtime is not None:
                runtime.close()
