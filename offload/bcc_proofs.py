"""What bcc can really use of this kernel, proven by compiling and loading bpf/probe_features.c.

The kernel exporting a helper says nothing about bcc 0.26 being able to call it (bpf_loop
is the example: the kernel has it, bcc leaves the callback address 0). So the bcc column
of the report comes only from real attempts: each feature is one function, loaded on its
own, and a refusal is recorded as one line taken from the compiler's or verifier's output.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from relay import bpfload
from relay.errors import FastrelayError

SOURCE = "probe_features.c"

#: Compile units: the default one, and one per feature whose presence may break a unit.
UNITS: dict[str, tuple[str, ...]] = {
    "default": (),
    "bpf_loop": ("-DPROBE_BPF_LOOP",),
    "kfunc": ("-DPROBE_KFUNC",),
}


@dataclass(frozen=True)
class ProofSpec:
    feature: str
    unit: str
    function: str
    what: str  # for the report: what loading this function proves


PROOF_SPECS: tuple[ProofSpec, ...] = (
    ProofSpec("sched_cls", "default", "probe_sched_cls", "bcc compiles and loads a TC program"),
    ProofSpec("clone_redirect", "default", "probe_clone_redirect", "bpf_clone_redirect in TC"),
    ProofSpec("ringbuf", "default", "probe_ringbuf", "BPF_RINGBUF_OUTPUT + ringbuf_output"),
    ProofSpec("atomics", "default", "probe_atomics",
              "__sync_fetch_and_add with its result used (test-run: 0 then 1)"),
    ProofSpec("spin_lock", "default", "probe_spin_lock", "bpf_spin_lock in a map value"),
    ProofSpec("bounded_loops", "default", "probe_bounded_loop",
              "a loop with a real back-edge passes the verifier"),
    ProofSpec("percpu_array", "default", "probe_percpu_array", "BPF_PERCPU_ARRAY lookup/write"),
    ProofSpec("bpf_loop", "bpf_loop", "probe_bpf_loop", "bpf_loop() with a callback"),
    ProofSpec("kfunc_call", "kfunc", "probe_kfunc_call",
              "calling a kfunc (what the BPF crypto API needs)"),
)

XDP_PROBE_FUNCTION = "probe_xdp_pass"
#: A minimal Ethernet frame for BPF_PROG_TEST_RUN (TC test runs need at least ETH_HLEN).
_TEST_FRAME = bytes(64)


@dataclass(frozen=True)
class Proof:
    """ok None: not probed (recorded tree, not root); detail says why or what failed."""

    ok: bool | None
    detail: str


@dataclass
class BccProofs:
    proofs: dict[str, Proof]
    #: The compiled default unit, kept for --active (XDP program) while the probe runs.
    default_module: Any | None


def not_probed(reason: str) -> dict[str, Proof]:
    return {spec.feature: Proof(None, f"not probed: {reason}") for spec in PROOF_SPECS}


@contextmanager
def _captured_fd2() -> Iterator[Callable[[], str]]:
    """Collect what libbcc, clang and the verifier print on fd 2 (they bypass sys.stderr).

    The probe turns that output into one-line reasons instead of spilling verifier logs.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)

        def read() -> str:
            tmp.seek(0)
            return tmp.read().decode("utf-8", "replace")

        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compile_error_line(log: str) -> str | None:
    """'/virtual/main.c:42:2: error: cannot call non-static helper function' -> the message."""
    for line in log.splitlines():
        m = re.search(r"\berror: (.*)", line)
        if m:
            return m.group(1).strip()
    return None


def verifier_reason(log: str) -> str | None:
    """The verifier's complaint: the last line that is not an instruction dump or statistics."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if (not line or line.startswith(("processed ", "verification time", "stack depth",
                                         "bpf: Failed", ";", "libbpf:"))
                or re.match(r"^\d+: ", line)):
            continue
        return line
    return None


def has_back_edge(bytecode: bytes) -> bool:
    """True when a jump goes backwards: the loop survived compilation (was not unrolled)."""
    for i in range(0, len(bytecode) - 7, 8):
        opcode = bytecode[i]
        cls, op = opcode & 0x07, opcode & 0xF0
        # BPF_JMP (5) / BPF_JMP32 (6), excluding BPF_CALL (0x80) and BPF_EXIT (0x90)
        if cls in (5, 6) and op not in (0x80, 0x90):
            if struct.unpack_from("<h", bytecode, i + 2)[0] < 0:
                return True
    return False


def _errno_text(exc: Exception) -> str:
    # bcc: "Failed to load BPF program b'probe_bpf_loop': Permission denied"
    return str(exc).rsplit(": ", 1)[-1]


def _check_function(spec: ProofSpec, module: Any) -> Proof:
    # bcc 0.26 wants bytes for function names (str works but warns on every call)
    fn = bpfload.load_sched_cls(module, spec.function)
    if spec.feature == "atomics":
        runs = [bpfload.prog_test_run(fn.fd, _TEST_FRAME).retval for _ in range(2)]
        if runs != [0, 1]:
            return Proof(False, f"loads, but fetch-and-add returned {runs} instead of [0, 1]")
        return Proof(True, "loads; test-run returned 0 then 1")
    if spec.feature == "bounded_loops" and not has_back_edge(module.dump_func(spec.function.encode())):
        return Proof(None, "loads, but clang unrolled the loop: no back-edge was verified")
    if spec.feature == "bounded_loops":
        return Proof(True, "loads; the bytecode keeps its back-edge")
    return Proof(True, "loads")


def _prove_unit(unit: str, specs: list[ProofSpec]) -> tuple[dict[str, Proof], Any | None]:
    proofs: dict[str, Proof] = {}
    with _captured_fd2() as log:
        try:
            module = bpfload.compile_program(SOURCE, cflags=UNITS[unit])
        except FastrelayError as exc:
            reason = compile_error_line(log()) or str(exc)
            return {s.feature: Proof(False, f"bcc cannot compile it: {reason}") for s in specs}, None
    for spec in specs:
        with _captured_fd2() as log:
            try:
                proofs[spec.feature] = _check_function(spec, module)
            except (FastrelayError, OSError) as exc:
                cause = verifier_reason(log()) or str(exc)
                errno_text = _errno_text(exc)
                suffix = f" ({errno_text})" if errno_text and errno_text not in cause else ""
                proofs[spec.feature] = Proof(False, f"kernel refused the load: {cause}{suffix}")
    return proofs, module


def run_bcc_proofs() -> BccProofs:
    """Compile each unit once, load every function separately; never raises for a refusal."""
    try:
        bpfload.import_bcc()
    except FastrelayError as exc:
        return BccProofs(not_probed(str(exc)), None)
    proofs: dict[str, Proof] = {}
    default_module = None
    for unit in UNITS:
        specs = [s for s in PROOF_SPECS if s.unit == unit]
        unit_proofs, module = _prove_unit(unit, specs)
        proofs.update(unit_proofs)
        if unit == "default":
            default_module = module
        elif module is not None:
            module.cleanup()  # a proof, once made, needs nothing loaded
    return BccProofs(proofs, default_module)
