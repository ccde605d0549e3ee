"""`fastrelay probe`: the offload capability probe (read-only unless --active).

The report itself is built by offload.probe; this module only chooses between tables for
people and one JSON object for scripts, and turns --require into an exit status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Iterable, Sequence

import typer
from rich.markup import escape

from offload.probe import Interface, ProbeReport, check_backend_name, require_backend, run_probe
from relay.cli.output import JsonOption, emit_json, emit_table, stdout

RequireOption = Annotated[
    str | None,
    typer.Option("--require", metavar="BACKEND",
                 help="Exit 1 with the reason unless crypto backend none|soft|nic can run here."),
]
RootOption = Annotated[
    Path,
    typer.Option("--root", help="Read procfs/sysfs/ethtool facts from a recorded tree instead "
                                "of this machine (bcc proofs are then not run)."),
]
InterfaceOption = Annotated[
    list[str] | None,
    typer.Option("--interface", "-i", metavar="IF",
                 help="Report only this interface (repeatable); the nic verdict then covers only these."),
]
ActiveOption = Annotated[
    bool,
    typer.Option("--active", help="Prove XDP modes and clsact/cls_bpf by attaching trivial "
                                  "programs to a veth pair in a scratch network namespace."),
]


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "?"}[value]


def _onoff(iface: Interface, feature: str) -> str:
    # "[fixed]" stays in the JSON; the table keeps one word per cell.
    return iface.offload_features.get(feature, "?").split()[0]


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    # Values such as "off [fixed]" would be eaten as rich markup: escape every cell.
    safe = [[None if v is None else escape(str(v)) for v in row] for row in rows]
    emit_table(columns, safe, as_json=False, title=title)


def show_report(report: ProbeReport) -> None:
    k = report.kernel
    source = f"recorded tree {report.root}" if report.recorded else "this machine"
    _table("Kernel", ("Item", "Value"), [
        ("source", source),
        ("release", k.release or "unknown"),
        ("JIT", k.jit),
        ("BTF", _yes_no(k.btf)),
        ("bpffs", ", ".join(k.bpffs) or "not mounted (mount -t bpf bpf /sys/fs/bpf)"),
        ("kernel config", k.config_source or "not found"),
        ("kallsyms", "readable" if k.kallsyms_readable else "not readable"),
    ])
    _table("BPF features: kernel support vs what bcc can use",
           ("Feature", "Kernel", "Kernel evidence", "bcc", "bcc proof"),
           [(f.label, _yes_no(f.kernel), f.kernel_evidence,
             "-" if f.bcc_detail == "kernel only" else _yes_no(f.bcc), f.bcc_detail)
            for f in report.features])
    c = report.crypto
    present = [name for name, ok in c.kfuncs.items() if ok]
    _table("Kernel crypto", ("Item", "Value"), [
        ("BPF crypto kfuncs (kernel)",
         ", ".join(present) if present else ("none" if any(v is False for v in c.kfuncs.values())
                                             else "unknown")),
        ("kfuncs usable by bcc", f"{_yes_no(c.kfuncs_usable_by_bcc)} ({c.kfuncs_bcc_detail})"),
        ("ciphers for bpf_crypto (lskcipher)", ", ".join(c.bpf_crypto_ciphers) or "none"),
        ("QUIC AEADs registered (kernel-internal)",
         ", ".join(f"{suite}: {_yes_no(ok)}" for suite, ok in c.quic_aeads.items())),
        ("algorithms in /proc/crypto", len(c.algorithms)),
    ])
    _table("Interfaces (offload features from ethtool -k; XDP modes from the driver table)",
           ("Interface", "Driver", "PCI vendor", "XDP modes", "hw-tc", "TLS tx/rx", "ESP", "NFP"),
           [(i.name, i.driver or "?", i.pci_vendor or "-",
             ",".join(i.xdp_modes_known), _onoff(i, "hw-tc-offload"),
             f"{_onoff(i, 'tls-hw-tx-offload')}/{_onoff(i, 'tls-hw-rx-offload')}",
             _onoff(i, "esp-hw-offload"), "yes" if i.is_nfp else "no")
            for i in report.interfaces])
    n = report.nfp
    if n.interfaces or n.driver_registered:
        _table("Netronome NFP", ("Item", "Value"), [
            ("nfp driver registered", _yes_no(n.driver_registered)),
            ("interfaces", ", ".join(n.interfaces) or "none"),
            ("firmware", ", ".join(sorted({i.firmware or "?" for i in report.interfaces
                                           if i.is_nfp})) or "-"),
            ("offload modes", "; ".join(n.offload_modes) or "-"),
            ("verified on hardware", "no: not verified on hardware"),
        ])
    if report.active is not None:
        a = report.active
        _table(f"Active proofs (scratch veth in netns {a.namespace}, removed)", ("Item", "Result"),
               [*((f"XDP {mode}", result) for mode, result in a.xdp.items()),
                ("clsact + cls_bpf", a.clsact_cls_bpf)])
    _table("Crypto backends", ("Backend", "Usable", "Why"), [
        (b.name, "yes" if b.usable else "no",
         "\n".join(b.reasons) if b.reasons else "proven: " + ", ".join(
             x.split(": ", 1)[1] for x in b.basis))
        for b in report.backends])


def probe(
    as_json: JsonOption = False,
    require: RequireOption = None,
    root: RootOption = Path("/"),
    active: ActiveOption = False,
    interface: InterfaceOption = None,
) -> None:
    """Report what this machine's kernel, bcc and NICs can offload, and a verdict per crypto backend."""
    if require is not None:
        check_backend_name(require)  # a typo fails before the probe spends its ~2 s
    report = run_probe(root, active=active, only_interfaces=interface or ())
    if require is not None:
        require_backend(require, report)
    if as_json:
        emit_json(report.to_dict())
    elif require is not None:
        stdout.print(f"crypto backend '{require}' can run here")
    else:
        show_report(report)
