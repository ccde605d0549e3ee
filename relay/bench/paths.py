"""The relay paths `fastrelay bench` compares, each a small plug-in: how to tell whether it can
run here, how to start its relay in the lab's relay namespace, and what extra arguments the
publisher and subscribers need for it.

Adding a path = one more `BenchPath` in `PATHS`. The fast-path rows start the relay with
`--fastpath on --crypto none|soft`. Before any lab is brought up, a fast-path row asks the relay's
own check (`relay.fastpath.runtime.unavailable_reason`, the one `fastrelay relay --fastpath on`
refuses with) and reports "not available" with that reason (today: `soft` is not wired to the
fast path); a relay that still refuses to start in the lab gives its one-line error instead.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.errors import FastrelayError

PORT = 4443
FASTRELAY = [sys.executable, "-m", "relay"]
MOQ_RS = [sys.executable, "-m", "relay.interop.moq_rs"]
START_TIMEOUT = 90.0
"""Seconds a relay may take to say it listens: compiling the fast path with bcc takes
seconds, many more on a loaded machine."""


class PathUnavailable(FastrelayError):
    """This path cannot run here; the message is the reason shown in its rows."""


@dataclass
class RelayHandle:
    """A relay started for one scenario."""

    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    client_args: list[str]
    """Arguments every publisher and subscriber gets (TLS, crypto)."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it will not go. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def _wait_line(proc: subprocess.Popen[bytes], stdout: Path, stderr: Path, want: str,
               timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stdout.read_text(errors="replace").splitlines():
            if want in line:
                return line
        if proc.poll() is not None:
            err = stderr.read_text(errors="replace").strip().splitlines()
            last = err[-1] if err else f"exit status {proc.returncode}"
            raise PathUnavailable(f"relay did not start: {last}")
        time.sleep(0.05)
    raise PathUnavailable(f"relay did not say it was listening within {timeout:g} s")


@dataclass
class BenchPath:
    name: str
    description: str
    relay_argv: list[str]
    client_args: list[str] = field(default_factory=list)
    listening: str = "listening "
    kernel_path: bool = False
    """True when packets may leave through eBPF (eBPF run time and kernel share apply)."""

    def unavailable(self) -> str | None:
        """Why this path cannot run on this machine now, or None."""
        return None

    def argv(self, lab: Any) -> list[str]:
        """The relay's command line in this lab."""
        return self.relay_argv

    def start(self, lab: Any, logs: Path, env: dict[str, str]) -> RelayHandle:
        out, err = logs / "relay.out", logs / "relay.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = lab.popen(lab.relay, self.argv(lab), stdout=o, stderr=e, env=env)
        handle = RelayHandle(proc, out, err, ["--insecure", *self.client_args])
        try:
            _wait_line(proc, out, err, self.listening, START_TIMEOUT)
        except BaseException:
            handle.stop()
            raise
        return handle

    def stats(self, handle: RelayHandle) -> dict[str, Any] | None:
        """The relay's own counters after it stopped (fastrelay's `stats {...}` line)."""
        for line in handle.stdout.read_text(errors="replace").splitlines():
            if line.startswith("stats "):
                try:
                    return json.loads(line[6:])
                except ValueError:
                    return None
        return None

    def catchup_us_per_packet(self, stats: dict[str, Any] | None) -> float | None:
        """Userspace catch-up time per packet the kernel forwarded (records, shadow writes, state
        pushes), from the relay's `stats` line: a lifetime figure of the relay process, part of
        the relay CPU column, never to be added to it. None where no packet left through eBPF."""
        if not self.kernel_path or not stats:
            return None
        value = (stats.get("fastpath") or {}).get("catchup_us_per_forwarded_packet")
        return float(value) if isinstance(value, (int, float)) else None

    def kernel_bytes_share(self, stats: dict[str, Any] | None) -> float | None:
        """Share of the bytes to subscribers that the kernel (eBPF) sent; 0 for userspace."""
        if not self.kernel_path:
            return 0.0
        if not stats:
            return None
        share = (stats.get("fastpath") or {}).get("kernel_bytes_share")
        if isinstance(share, (int, float)):
            return float(share)
        kernel, total = stats.get("kernel_bytes"), stats.get("bytes_sent")
        if isinstance(kernel, int) and isinstance(total, int) and total:
            return kernel / total
        return None


class FastPath(BenchPath):
    """`fastrelay relay --fastpath on --crypto X`: available when the relay would accept it."""

    def unavailable(self) -> str | None:
        # asked once per run: the check imports bcc (seconds)
        if not hasattr(self, "_reason"):
            self._reason = self._relay_refusal()
        return self._reason

    def _relay_refusal(self) -> str | None:
        from relay.cli import relay_cmd

        if "fastpath" not in inspect.signature(relay_cmd.relay_command).parameters:
            return "eBPF fast path not built yet (`fastrelay relay` has no --fastpath)"
        from relay.fastpath.runtime import unavailable_reason
        from relay.publisher import crypto_option

        # the relay's own checks, in its order: the --crypto backend's probe, then the fast path
        crypto = self.relay_argv[self.relay_argv.index("--crypto") + 1]
        try:
            crypto_option(crypto)
        except FastrelayError as exc:
            return f"relay refuses: {exc}"
        reason = unavailable_reason(crypto, "0.0.0.0")
        # the words `fastrelay relay --fastpath on` exits with
        return None if reason is None else f"relay refuses: --fastpath on: {reason}"


class PairedFastPath(FastPath):
    """fastpath-none with the second half of the subscribers held on the userspace path
    (`--userspace-peer`): one relay, one publisher, the same objects through both paths at the
    same moment, so their delays pair object by object."""

    @staticmethod
    def held(subscribers: list[str]) -> list[str]:
        """The subscribers served by userspace: the second half."""
        return subscribers[len(subscribers) // 2:]

    def argv(self, lab: Any) -> list[str]:
        return [*self.relay_argv, *(arg for sub in self.held(lab.subscribers)
                                    for arg in ("--userspace-peer", lab.address(sub, lab.relay)))]


class MoqRsPath(BenchPath):
    def unavailable(self) -> str | None:
        if importlib.util.find_spec("moq") is None:
            return "moq-rs is not installed (pip install 'fastrelay[test]')"
        return None


def _paths() -> dict[str, BenchPath]:
    listen = f"0.0.0.0:{PORT}"
    return {p.name: p for p in (
        BenchPath("userspace", "fastrelay relay, userspace (aioquic), --fastpath off",
                  [*FASTRELAY, "relay", "--listen", listen, "--fastpath", "off"]),
        BenchPath("userspace-none", "fastrelay relay, userspace, 1-RTT crypto none (the "
                  "baseline for fastpath-none: same wire, no eBPF)",
                  [*FASTRELAY, "relay", "--listen", listen, "--crypto", "none",
                   "--fastpath", "off"], client_args=["--crypto", "none"]),
        MoqRsPath("moq-rs", "anchor: moq-rs 0.5.1 server (Rust, quinn), same workload",
                  [*MOQ_RS, "server", "--bind", listen, "--log-level", "error"],
                  listening='"listening"'),
        FastPath("fastpath-none", "fastrelay relay, eBPF fast path, 1-RTT crypto none",
                 [*FASTRELAY, "relay", "--listen", listen, "--fastpath", "on",
                  "--crypto", "none"], client_args=["--crypto", "none"], kernel_path=True),
        FastPath("fastpath-soft", "fastrelay relay, eBPF fast path, 1-RTT crypto soft",
                 [*FASTRELAY, "relay", "--listen", listen, "--fastpath", "on",
                  "--crypto", "soft"], client_args=["--crypto", "soft"], kernel_path=True),
    )}


PATHS: dict[str, BenchPath] = _paths()
#: `--paired`: the fast path and the userspace path in one relay at once (not a row of its own).
PAIRED = PairedFastPath("paired-none", "fastrelay relay, eBPF fast path, 1-RTT crypto none, half "
                        "the subscribers held on the userspace path (--userspace-peer)",
                        PATHS["fastpath-none"].relay_argv, client_args=["--crypto", "none"],
                        kernel_path=True)
#: What `fastrelay bench` compares unless --paths says otherwise.
DEFAULT_PATHS = ["userspace", "userspace-none", "fastpath-none", "fastpath-soft", "moq-rs"]
#: `--quick`: one row per kind of relay (userspace-none is the like-for-like of fastpath-none).
QUICK_PATHS = ["userspace", "fastpath-none", "fastpath-soft", "moq-rs"]
#: The baseline ratios are taken against.
USERSPACE = "userspace"
ANCHOR = "moq-rs"
