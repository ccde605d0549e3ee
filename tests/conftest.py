"""Shared test helpers: the CLI runner and the gate for tests that need root and BPF."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from relay.cli.main import main


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], *, exit_code: int = 0,
            stderr: str | None = None) -> CliResult:
    """Run `fastrelay ARGS` in this process; assert the exit code and a stderr regex."""
    code = main(args)
    out, err = capsys.readouterr()
    result = CliResult(code, out, err)
    assert code == exit_code, f"exit {code} != {exit_code}\nstdout:\n{out}\nstderr:\n{err}"
    if stderr is not None:
        assert re.search(stderr, err), f"stderr {err!r} does not match {stderr!r}"
    return result


def run_cli_process(args: list[str], *, env: dict[str, str] | None = None,
                    timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed console script in a child process (for tracebacks, privileges, exec)."""
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _is_root() -> bool:
    return os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _is_root():
        return
    skip = pytest.mark.skip(reason="needs root (BPF, network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
