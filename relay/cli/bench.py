"""`fastrelay bench`: delay, CPU and fan-out of every relay path, side by side, in the lab.

For each path and subscriber count: a fresh lab, that path's relay in the relay namespace,
the subscribers, then the publisher (same workload for every path: `--layout single`,
self-verifying objects); counters over the steady part of the run; teardown. Then, with
`--rates`, the same scenario at rising rates for `--sweep-subscribers` subscribers until each
path stops sustaining the rate; then, with `--paired`, one relay serving half the subscribers
from the kernel and half from userspace at once, their delays paired object by object.
Progress goes to stderr; the tables (or `--json`: every figure,
raw counters and the machine description) to stdout; results.json, table.md, per-object delays
and PNG plots into --out.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from relay import bpfload
from relay.bench import measure, report
from relay.bench.paths import DEFAULT_PATHS, PATHS, QUICK_PATHS
from relay.bench.runner import BenchConfig, highest_sustained, measure_shim_cost, run_bench
from relay.cli.output import JsonOption, emit_json, progress, stdout
from relay.errors import ConfigError, FastrelayError

DEFAULT_SUBSCRIBERS = "1,4,16,32,64"
QUICK_SUBSCRIBERS = [1, 4]
QUICK_DURATION = 3.0
QUICK_RATE = 100.0
DEFAULT_RATE = 10.0
DEFAULT_DURATION = 6.0
DEFAULT_RATES = "100,200,400,800"
DEFAULT_SWEEP_SUBSCRIBERS = 4
DEFAULT_SWEEP_DURATION = 3.0
DEFAULT_PAIRED = "4,16"
QUICK_PAIRED = [2]
MAX_SUBSCRIBERS = 256
#: The table is wide; in a pipe or log give it this many columns rather than cut it.
TABLE_WIDTH = 230


def parse_subscribers(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--subscribers {text!r}: expected counts separated by commas, "
                          "e.g. 1,4,16") from None
    if not counts or any(not 1 <= n <= MAX_SUBSCRIBERS for n in counts):
        raise ConfigError(f"--subscribers {text!r}: each count must be 1..{MAX_SUBSCRIBERS}")
    return sorted(set(counts))


def parse_paired(text: str) -> list[int]:
    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or any(n < 2 or n % 2 or n > MAX_SUBSCRIBERS for n in counts):
        raise ConfigError(f"--paired {text!r}: expected even subscriber counts 2..{MAX_SUBSCRIBERS} "
                          "separated by commas (half on each path), or none")
    return counts


def _table(title: str, columns: tuple[str, ...], rows: list[list[str]], *,
           wrap: str | None = None, wrap_width: int | None = None) -> Any:
    """A rich table whose cells never wrap, but for the `wrap` column (folded)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, no_wrap=column != wrap,
                         overflow="fold" if column == wrap else "ellipsis",
                         min_width=wrap_width if column == wrap else None)
    for row in rows:
        table.add_row(*row)
    return table


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"--doc {path}: {exc.strerror or exc}") from None


def parse_rates(text: str) -> list[float]:
    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--rates {text!r}: expected objects/s separated by commas, "
                          "e.g. 100,200,400 (or none)") from None
    if any(r <= 0 for r in rates):
        raise ConfigError(f"--rates {text!r}: each rate must be above 0")
    return sorted(set(rates))


def parse_paths(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown or not names:
        raise ConfigError(f"--paths: unknown path '{unknown[0] if unknown else text}' "
                          f"(paths: {', '.join(PATHS)})")
    return list(dict.fromkeys(names))


def bench_command(
    subscribers: Annotated[str | None, typer.Option(
        "--subscribers", metavar="N,N,...",
        help=f"Subscriber counts to run [default: {DEFAULT_SUBSCRIBERS}; --quick: 1,4].")] = None,
    object_size: Annotated[int, typer.Option("--object-size", min=64, metavar="B",
                                             help="Payload bytes per object.")] = 1000,
    rate: Annotated[float | None, typer.Option(
        "--rate", min=1, metavar="R",
        help="Objects per second the publisher sends [default: 10 (64 subscribers at 10/s "
             "about fill 2 vCPUs); --quick: 100].")] = None,
    duration: Annotated[float | None, typer.Option(
        "--duration", min=1, metavar="S",
        help=f"Seconds of publishing per scenario [default: {DEFAULT_DURATION:g}; --quick: "
             f"{QUICK_DURATION:g}].")] = None,
    paths: Annotated[str | None, typer.Option(
        "--paths", metavar="P,P,...",
        help=f"Paths to compare, of: {', '.join(PATHS)} [default: {','.join(DEFAULT_PATHS)}; "
             f"--quick: {','.join(QUICK_PATHS)}].")] = None,
    rates: Annotated[str | None, typer.Option(
        "--rates", metavar="R,R,...",
        help=f"Rate sweep: objects/s to try in turn for each path at --sweep-subscribers, "
             f"stopping a path at the first rate with a lost object or a growing delay; none: "
             f"no sweep [default: {DEFAULT_RATES}; --quick: none].")] = None,
    sweep_subscribers: Annotated[int, typer.Option(
        "--sweep-subscribers", min=1, max=MAX_SUBSCRIBERS, metavar="N",
        help="Subscribers during the rate sweep.")] = DEFAULT_SWEEP_SUBSCRIBERS,
    sweep_duration: Annotated[float, typer.Option(
        "--sweep-duration", min=1, metavar="S",
        help="Seconds of publishing per rate of the sweep.")] = DEFAULT_SWEEP_DURATION,
    paired: Annotated[str | None, typer.Option(
        "--paired", metavar="N,N,...",
        help=f"Paired scenario: one relay with the fast path serving half of N subscribers "
             f"from the kernel and holding the other half in userspace, the same objects to "
             f"both at once, delays compared object by object; none: skip it [default: "
             f"{DEFAULT_PAIRED}; --quick: {','.join(map(str, QUICK_PAIRED))}].")] = None,
    group_length: Annotated[int, typer.Option("--group-length", min=1,
                                              help="Objects per group.")] = 30,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Smoke run: 1 and 4 subscribers, 3 s at 100 objects/s each, no rate "
                        "sweep (about a minute).")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="DIR", help="Where results go [default: bench-results/<timestamp>/].")]
    = None,
    doc_file: Annotated[Path | None, typer.Option(
        "--doc", metavar="FILE.md",
        help="Also write this run (tables, notes, plot links) into the generated block of a "
             "Markdown file, e.g. BENCHMARKS.md.")] = None,
    shim_cost: Annotated[bool, typer.Option(
        "--shim-cost/--no-shim-cost",
        help="Also time the soft crypto shim per packet (BPF_PROG_TEST_RUN, no lab, a few "
             "seconds; with --quick too).")] = True,
    as_json: JsonOption = False,
) -> None:
    """Measure every relay path side by side: delay, CPU per delivered packet, fan-out."""
    counts = parse_subscribers(subscribers) if subscribers is not None else \
        (QUICK_SUBSCRIBERS if quick else parse_subscribers(DEFAULT_SUBSCRIBERS))
    names = parse_paths(paths) if paths is not None else \
        list(QUICK_PATHS if quick else DEFAULT_PATHS)
    sweep = parse_rates(rates) if rates is not None else ([] if quick else
                                                          parse_rates(DEFAULT_RATES))
    paired_counts = parse_paired(paired) if paired is not None else \
        (QUICK_PAIRED if quick else parse_paired(DEFAULT_PAIRED))
    started = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    if out is None:
        out = Path("bench-results") / started.strftime("%Y%m%dT%H%M%SZ")
    if rate is None:
        rate = QUICK_RATE if quick else DEFAULT_RATE
    cfg = BenchConfig(subscribers=counts, paths=names, object_size=object_size, rate=rate,
                      duration=duration if duration is not None else
                      (QUICK_DURATION if quick else DEFAULT_DURATION),
                      group_length=group_length, out=out,
                      start_delay=1.0, background_s=0.5 if quick else 1.0, rates=sweep,
                      sweep_subscribers=sweep_subscribers, sweep_duration=sweep_duration,
                      paired=paired_counts)
    if doc_file is not None and report.DOC_START not in _read(doc_file):
        raise ConfigError(f"--doc {doc_file}: no line '{report.DOC_START}' to replace")
    if any(PATHS[n].unavailable() is None for n in names) or paired_counts:
        bpfload.require_root("fastrelay bench")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: {exc.strerror or exc}") from None
    machine = measure.machine_description()
    progress(f"bench: {len(names)} path(s) × subscribers {','.join(map(str, counts))}, "
             f"{cfg.objects} objects of {object_size} B at {rate:g}/s each"
             + (f"; rate sweep {','.join(f'{r:g}' for r in sweep)} objects/s at "
                f"{sweep_subscribers} subscriber(s)" if sweep else "")
             + (f"; paired {','.join(map(str, paired_counts))}" if paired_counts else "")
             + f"; results in {out}")
    runs, sweep_runs, paired_runs = run_bench(cfg, progress)
    shim = measure_shim_cost(progress) if shim_cost else None
    capacity = highest_sustained(cfg, sweep_runs)
    files = {"json": "results.json", "table": "table.md"}
    files.update(report.write_plots(runs, out))
    if sweep:
        files.update(report.write_sweep_plot(cfg, sweep_runs, capacity, out))
    files.update(report.write_paired_plot(paired_runs, out))
    for r in [*runs, *sweep_runs, *paired_runs]:
        if r.raw.get("delays_file"):
            files[f"delays {r.raw['delays_file'][7:-4]}"] = r.raw["delays_file"]
    finished = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    command = "fastrelay bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"]
                                              else sys.argv[1:])
    doc = report.document(cfg, runs, machine=machine, command=command,
                          started=started.isoformat(), finished=finished.isoformat(), files=files,
                          sweep=sweep_runs, capacity=capacity, paired=paired_runs,
                          shim=shim)
    doc["loadavg_at_end"] = measure.machine_description()["loadavg_at_start"]
    report.write_json(doc, out / "results.json")
    if doc_file is not None:
        plots = os.path.relpath(out.resolve(), doc_file.resolve().parent)
        report.update_document(doc_file, report.markdown_block(doc, runs, capacity, plots,
                                                               paired_runs))
        progress(f"wrote the run into {doc_file}")
    table_md = report.markdown_table(runs) + "\n"
    if sweep:
        table_md += "\n" + report.markdown_sweep_table(capacity) + "\n"
    if report.ebpf_programs_table(runs):
        table_md += "\neBPF programs:\n\n" + report.ebpf_programs_table(runs) + "\n"
    if paired_runs:
        table_md += "\n" + report.markdown_paired_table(paired_runs) + "\n"
    if shim is not None:
        table_md += "\nSoft crypto shim per packet:\n\n" + report.markdown_shim_table(shim) + "\n"
    (out / "table.md").write_text(table_md)
    if as_json:
        emit_json(doc)
    else:
        from rich.console import Console

        wide = Console(highlight=False, soft_wrap=False,
                       width=None if sys.stdout.isatty() else TABLE_WIDTH)
        wide.print(_table(f"fastrelay bench — {machine['cpu_model']}, {machine['cores']} cores, "
                          f"kernel {machine['kernel']}", report.COLUMNS, report.table_rows(runs),
                          wrap="Note", wrap_width=24))
        if sweep:
            wide.print(_table(f"highest sustainable rate, {sweep_subscribers} subscriber(s), "
                              f"{sweep_duration:g} s per rate", report.SWEEP_COLUMNS,
                              report.sweep_rows(capacity), wrap="Stopped by"))
        if paired_runs:
            wide.print(_table("the same objects through both paths of one relay at once",
                              report.PAIRED_COLUMNS, report.paired_rows(paired_runs),
                              wrap="Note"))
        if shim is not None and shim["available"]:
            wide.print(_table("soft crypto shim, cost per packet (BPF_PROG_TEST_RUN, "
                              f"{shim['costs'][0]['runs']} single runs)", report.SHIM_COLUMNS,
                              report.shim_rows(shim)))
            if report.shim_primitives_line(shim):
                stdout.print(report.shim_primitives_line(shim))
        elif shim is not None:
            stdout.print(f"soft crypto shim per packet: not measured: {shim['reason']}")
        for note in report.notes(cfg):
            stdout.print(f"- {note}")
        stdout.print(f"results: {out}/results.json, plots: {out}/*.png")
    # a sweep step that fails only ends that path's sweep
    failed = [r for r in [*runs, *paired_runs] if r.error]
    if failed:
        first = failed[0]
        raise FastrelayError(f"{len(failed)} scenario(s) failed, first {first.path} with "
                             f"{first.subscribers} subscribers: {first.error}; results in {out}")
