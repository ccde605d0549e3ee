"""Child processes in tests: one environment for them and one way to end them."""

from __future__ import annotations

import os
import subprocess
from typing import Any


def child_env() -> dict[str, str]:
    """The test's environment for a child: plain Rust logs (so moq-rs's negotiated version can
    be read from them) and no RUST_LOG overriding the drivers' --log-level."""
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    env.pop("RUST_LOG", None)
    return env


def stop_child(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """End one child we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
