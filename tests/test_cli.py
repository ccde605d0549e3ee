"""The CLI's contract: help and version, exit codes, one-line errors, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay import __version__
from relay.cli import main as cli_main
from relay.errors import FastrelayError
from tests.conftest import run_cli

NOBODY = 65534


def as_nobody(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `fastrelay ARGS` as an unprivileged user, to see what a non-root user sees."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "LANG": "C.UTF-8"}
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            sys.executable, "-m", "relay", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd="/tmp")


def _listed_commands(help_text: str) -> dict[str, str]:
    """The `Commands:` section of a plain (pipe) help text: name -> first words of its help."""
    section = help_text.split("\nCommands:\n", 1)[1]
    rows = (line.split(None, 1) for line in section.splitlines() if line.startswith("  "))
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


def test_help_lists_every_command_with_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    listed = _listed_commands(run_cli(["--help"], capsys).stdout)
    assert set(listed) == {"probe", "demo", "publish", "subscribe", "relay", "stats", "cleanup",
                           "bench", "lab"}
    lab = _listed_commands(run_cli(["lab", "--help"], capsys).stdout)
    assert set(lab) == {"up", "down", "status", "exec"}
    for name, text in [*listed.items(), *lab.items()]:
        assert len(text) > 10, f"{name} has no help text"
    # every command that shows a table offers --json (relay, lab down and lab exec show none)
    tables = {"probe", "demo", "publish", "subscribe", "stats", "cleanup", "bench", "lab up",
              "lab status"}
    for argv in [[name] for name in listed if name != "lab"] + [["lab", name] for name in lab]:
        out = run_cli([*argv, "--help"], capsys).stdout
        assert out.startswith(f"Usage: fastrelay {' '.join(argv)} "), argv
        assert ("--json" in out) == (" ".join(argv) in tables), argv


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--version"], capsys).stdout.strip() == f"fastrelay {__version__}"


def test_no_arguments_shows_help_and_usage_exit(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli([], capsys, exit_code=2)
    assert "Usage: fastrelay" in result.stdout + result.stderr


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["no-such-command"], capsys, exit_code=2, stderr=r"No such command 'no-such-command'")


def test_fastrelay_error_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_probe() -> None:
        raise FastrelayError("interface 'nope0' does not exist; list them with `ip link`")

    monkeypatch.setattr(cli_main, "app", _app_with("probe", failing_probe))
    result = run_cli(["probe"], capsys, exit_code=1)
    assert result.stderr == "error: interface 'nope0' does not exist; list them with `ip link`\n"


def test_unexpected_exception_is_one_line_unless_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def buggy_probe() -> None:
        raise KeyError("boom")

    monkeypatch.setattr(cli_main, "app", _app_with("probe", buggy_probe))
    result = run_cli(["probe"], capsys, exit_code=1)
    assert result.stderr.count("\n") == 1
    assert "internal error (KeyError" in result.stderr and "--debug" in result.stderr
    with pytest.raises(KeyError):
        cli_main.main(["--debug", "probe"])


def _app_with(name: str, function):  # type: ignore[no-untyped-def]
    import typer

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(cli_main.root)
    app.command(name)(function)
    return app


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "fastrelay"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"fastrelay {__version__}"


@pytest.mark.root
def test_unprivileged_lab_up_is_one_line() -> None:
    result = as_nobody(["lab", "up"])
    assert result.returncode == 1, result
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "root" in result.stderr
    assert "Traceback" not in result.stderr


SETUP = Path(__file__).resolve().parent.parent / "hw" / "setup.sh"


@pytest.mark.root
def test_setup_refuses_a_non_root_user_in_one_line() -> None:
    result = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             "bash", str(SETUP), "--quiet"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "setup: error: must run as root (eBPF, namespaces and apt need it); " \
                            "rerun with sudo\n"


@pytest.mark.root
def test_setup_again_on_a_set_up_machine_changes_nothing() -> None:
    result = subprocess.run(["bash", str(SETUP), "--quiet"], capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.root
def test_setup_on_a_kernel_without_the_bpf_syscall_is_one_line(tmp_path: Path) -> None:
    """A kernel built without CONFIG_BPF_SYSCALL has no /proc/sys/kernel/unprivileged_bpf_disabled:
    shown to setup by an empty directory mounted over /proc/sys/kernel in a private mount
    namespace (the rest of the machine keeps its /proc)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    script = (f"mount --make-rprivate / && mount --bind {empty} /proc/sys/kernel && "
              f"exec bash {SETUP} --quiet")
    result = subprocess.run(["unshare", "--mount", "bash", "-c", script], capture_output=True,
                            text=True, timeout=300)
    assert (result.returncode, result.stdout) == (1, ""), result
    assert result.stderr == ("setup: error: kernel has no BPF syscall (CONFIG_BPF_SYSCALL off); "
                             "fastrelay cannot run here\n")


README = SETUP.parent.parent / "README.md"


def _commands(text: str) -> list[str]:
    """Shell lines of a script or code block, without comments, `set` and `cd`."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("set ", "cd "))]


def test_readme_opens_with_two_commands_and_ci_runs_only_the_test_one() -> None:
    readme = README.read_text()
    first_block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    demo_command, test_command = _commands(first_block)
    assert (demo_command, test_command) == ("make demo", "make test")
    assert _commands((SETUP.parent.parent / ".ci" / "run").read_text()) == [test_command]
    # both do their own set-up first: make's dry run shows setup before the work
    for target, work in (("demo", "fastrelay demo"), ("test", "-m pytest")):
        dry = subprocess.run(["make", "-n", "-C", str(SETUP.parent.parent), target],
                             capture_output=True, text=True, timeout=60)
        steps = [line for line in dry.stdout.splitlines() if not line.startswith("make")]
        assert dry.returncode == 0 and len(steps) == 2, dry
        assert steps[0] == "./hw/setup.sh --quiet" and work in steps[1], steps


@pytest.mark.parametrize(("argv", "expected"), [
    (["--crypto=none", "--listen", "h:1"], ["relay", "--crypto=none", "--listen", "h:1"]),
    (["--crypto", "soft"], ["relay", "--crypto", "soft"]),
    (["--debug", "--crypto", "nic"], ["--debug", "relay", "--crypto", "nic"]),
    (["relay", "--crypto", "none"], ["relay", "--crypto", "none"]),
    (["probe", "--require", "none"], ["probe", "--require", "none"]),
    ([], []),
])
def test_crypto_shorthand_starts_the_relay(argv: list[str], expected: list[str]) -> None:
    assert cli_main.relay_shorthand(argv) == expected
