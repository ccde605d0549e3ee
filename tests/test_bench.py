"""`fastrelay bench`: the smoke run in the lab (root) and the pieces that need no lab.

No speed assertions anywhere: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from relay.bench import measure, report, runner
from relay.bench.paths import FASTRELAY, PATHS, QUICK_PATHS, FastPath
from relay.bench.runner import (
    BenchConfig,
    Run,
    _window,
    bench_topology,
    delay_figures,
    delay_trend,
    highest_sustained,
    paired_figures,
    percentile,
    read_object_delays,
    sustained,
)
from tests.conftest import run_cli, run_cli_process

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("delay_distribution.png", "cpu_vs_subscribers.png", "delay_vs_subscribers.png")


@pytest.mark.root
def test_bench_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # --quick as a user runs it, at one subscriber count (the suite's longest test: each
    # scenario is a fresh lab; 4 subscribers add time, not coverage)
    proc = run_cli_process(["bench", "--quick", "--subscribers", "1", "--out", str(out), "--json"],
                           timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert json.loads((out / "results.json").read_text())["runs"] == doc["runs"]
    assert (out / "table.md").read_text().startswith("| Path")
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    for key in ("cpu_model", "cores", "kernel", "memory_gib"):
        assert doc["machine"][key], key
    assert "[1/" in proc.stderr  # the progress display
    runs = doc["runs"]
    assert {(r["path"], r["subscribers"]) for r in runs} == \
        {(p, 1) for p in QUICK_PATHS}
    assert doc["sweep"] == [] and doc["parameters"]["rates"] == []  # --quick does not sweep
    assert any(r["available"] for r in runs)
    for r in runs:
        where = f"{r['path']} x {r['subscribers']}"
        if not r["available"]:
            assert r["reason"], where
            assert not r["figures"], where
            continue
        assert r["error"] is None, where
        f = r["figures"]
        assert f["objects_delivered"] > 0, where
        assert f["delay"]["count"] == f["objects_delivered"], where
        for key in ("p50_us", "p99_us", "max_us"):
            assert f["delay"][key] > 0, where
        assert f["delay"]["p50_us"] <= f["delay"]["p99_us"] <= f["delay"]["max_us"], where
        for key in ("delivered_packets", "machine_cpu_us_per_packet", "relay_cpu_us_per_packet",
                    "packets_per_s_per_relay_core", "lab_processes_cpu_us_per_packet"):
            assert f[key] and f[key] > 0, (where, key)
        assert isinstance(f["machine_limited"], bool)
        assert f["kernel_bytes_share"] is not None, where
        assert isinstance(f["delay_trend"]["growing"], bool), where
        if PATHS[r["path"]].kernel_path:
            # the fast-path columns: present and numeric (eBPF window, the relay's own stats)
            assert isinstance(f["ebpf"]["us_per_packet"], (int, float)), where
            assert f["ebpf"]["run_cnt"] > 0, where
            # per program, by name: the soft row has the shim's hooks beside the fast path's
            programs = f["ebpf"]["per_program"]
            assert sum(p["run_cnt"] for p in programs.values()) == f["ebpf"]["run_cnt"], where
            shim = {"shim_ingress", "shim_egress"} & programs.keys()
            assert shim == ({"shim_ingress", "shim_egress"} if r["path"] == "fastpath-soft"
                            else set()), (where, sorted(programs))
            assert isinstance(f["catchup_us_per_forwarded_packet"], (int, float)), where
            assert 0 < f["kernel_bytes_share"] <= 1, where
        else:
            assert f["ebpf"] is None and f["catchup_us_per_forwarded_packet"] is None, where
            assert f["kernel_bytes_share"] == 0.0, where
        assert (out / r["raw"]["delays_file"]).is_file()
    shim = doc["shim_cost"]  # the soft shim's cost section (root: loadable here)
    assert shim["available"], shim["reason"]
    assert {(c["size"], c["direction"]) for c in shim["costs"]} == \
        {(n, d) for n in measure.SHIM_SIZES for d in ("seal", "open")}
    assert all(0 < c["min_ns"] <= c["median_ns"] for c in shim["costs"])
    assert "| QUIC packet bytes |" in (out / "table.md").read_text()
    userspace = [r for r in runs if r["path"] == "userspace" and r["available"]]
    for r in userspace:
        assert r["figures"]["ratios"]["vs_userspace"]["p50_us"] == 1.0
    # the paired scenario: one relay, one subscriber on each path, the same objects
    [paired] = doc["paired"]
    assert paired["subscribers"] == 2 and doc["parameters"]["paired_subscribers"] == [2]
    if paired["available"]:
        assert paired["error"] is None, paired["error"]
        p = paired["figures"]["paired"]
        assert (p["kernel_subscribers"], p["userspace_subscribers"]) == (1, 1)
        # the relay's own word: one subscriber handed to the kernel, one kept in userspace
        assert (p["relay_offloaded_subscribers"], p["relay_held_subscribers"]) == (1, 1)
        assert p["objects_paired"] == paired["figures"]["objects_expected"] // 2
        assert p["kernel"]["count"] == p["userspace"]["count"] == p["objects_paired"]
        d = p["difference_us"]
        assert d["p10"] <= d["p50"] <= d["p90"]
        assert 0 <= p["kernel_earlier_share"] <= 1
        assert (out / "paired_delay.png").read_bytes()[:8] == PNG_MAGIC
    else:
        assert paired["reason"] == PATHS["fastpath-none"].unavailable()


# -- no lab needed ------------------------------------------------------------------------------


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["bench", "--rates", "100,x"], capsys, exit_code=1,
            stderr=r"^error: --rates '100,x': expected objects/s")
    run_cli(["bench", "--rates", "-5"], capsys, exit_code=1,
            stderr=r"^error: --rates '-5': each rate must be above 0\n$")
    run_cli(["bench", "--paths", "userspace,nope"], capsys, exit_code=1,
            stderr=r"^error: --paths: unknown path 'nope' \(paths: userspace, userspace-none, "
                   r"moq-rs")
    run_cli(["bench", "--subscribers", "1,x"], capsys, exit_code=1,
            stderr=r"^error: --subscribers '1,x': expected counts")
    run_cli(["bench", "--subscribers", "0"], capsys, exit_code=1,
            stderr=r"^error: --subscribers '0': each count must be 1\.\.256\n$")
    run_cli(["bench", "--paired", "4,3"], capsys, exit_code=1,
            stderr=r"^error: --paired '4,3': expected even subscriber counts 2\.\.256 ")


def test_unavailable_paths_need_no_lab(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # every path can run on the CI machine: make one unavailable the way a machine without
    # moq-rs would
    name = "moq-rs"
    monkeypatch.setattr(PATHS[name], "unavailable", lambda: "moq-rs is not installed (test)")
    result = run_cli(["bench", "--paths", name, "--subscribers", "1", "--paired", "none",
                      "--no-shim-cost", "--out", str(tmp_path), "--json"], capsys)
    doc = json.loads(result.stdout)
    assert [(r["path"], r["available"]) for r in doc["runs"]] == [(name, False)]
    assert doc["runs"][0]["reason"] == "moq-rs is not installed (test)"
    assert doc["paths"][name]["reason"] == "moq-rs is not installed (test)"
    for plot in PLOTS:
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC
    again = report.load_runs(tmp_path)
    assert [(r.path, r.reason) for r in again] == [(name, "moq-rs is not installed (test)")]


def test_objects_are_whole_groups() -> None:
    assert BenchConfig(subscribers=[1], paths=["userspace"], rate=100, duration=10,
                       group_length=30).objects == 1020
    assert BenchConfig(subscribers=[1], paths=["userspace"], rate=10, duration=3,
                       group_length=30).objects == 30


def test_percentiles_are_over_raw_values() -> None:
    values = sorted([5, 1, 4, 2, 3] * 20 + [1000])
    assert percentile(values, 50) == 3
    assert percentile(values, 100) == 1000
    d = delay_figures([1000, 2000, 3000, 1_000_000])
    assert d is not None and d["count"] == 4 and d["p50_us"] == 2.0 and d["max_us"] == 1000.0
    assert delay_figures([]) is None


def _sample(t: float, tx: int) -> measure.Sample:
    return measure.Sample(t=t, machine=measure.CpuTimes(busy=int(t * 100), total=int(t * 200),
                                                         steal=0),
                          relay_ticks=int(t * 10), tx_packets=tx, tx_bytes=tx * 1000,
                          rx_packets=0)


def test_window_covers_the_middle_of_the_delivered_packets() -> None:
    samples = [_sample(i * 0.1, tx) for i, tx in enumerate([0, 0, 0, 10, 30, 50, 70, 90, 100,
                                                            100])]
    assert _window(samples, 0) == (3, 7)
    assert _window([_sample(0, 5), _sample(1, 5)], 0) is None


def test_topology_has_the_subscribers_and_no_gso_towards_them() -> None:
    topo = bench_topology(3)
    assert [h.name for h in topo.subscribers] == ["sub1", "sub2", "sub3"]
    for sub in topo.subscribers:
        assert not topo.link("relay", sub.name).end("relay").gso


def test_machine_readers_on_this_process() -> None:
    cpu = measure.machine_cpu()
    assert 0 < cpu.busy <= cpu.total
    assert measure.process_cpu_ticks(os.getpid()) is not None
    assert "lo" in measure.interface_counters(os.getpid())
    assert measure.process_cpu_ticks(2**22 + 1) is None
    assert measure.bpf_prog_stats(os.getpid()) == {}
    machine = measure.machine_description()
    assert machine["cores"] and machine["kernel"]


def test_table_marks_unavailable_and_measured_rows() -> None:
    measured = Run("userspace", 4, True, figures={
        "delay": {"p50_us": 2000.0, "p99_us": 5000.0, "max_us": 9000.0},
        "objects_delivered": 400, "objects_expected": 400, "objects_lost": 0,
        "machine_cpu_us_per_packet": 4000.0, "machine_busy_share": 0.95,
        "background_busy_share": 0.1, "machine_non_lab_share": 0.2, "lab_processes_cpu_us_per_packet": 2000.0,
        "relay_cpu_us_per_packet": 700.0, "ebpf": None, "packets_per_s_per_relay_core": 1429,
        "catchup_us_per_forwarded_packet": None,
        "kernel_bytes_share": 0.0, "machine_limited": True})
    missing = Run("fastpath-none", 4, False, reason="eBPF fast path not built yet")
    fast = Run("fastpath-none", 1, True, figures={
        **measured.figures, "ebpf": {"us_per_packet": 1.25}, "kernel_bytes_share": 0.97,
        "catchup_us_per_forwarded_packet": 42.5, "machine_limited": False})
    rows = report.table_rows([measured, missing])
    column = {c.replace("\n", " "): i for i, c in enumerate(report.COLUMNS)}
    fast_row = report.table_rows([fast])[0]
    assert fast_row[column["eBPF µs/pkt"]] == "1.2"
    assert fast_row[column["Catch-up µs/fwd pkt"]] == "42.5"
    assert fast_row[column["Kernel bytes"]] == "97%"
    assert rows[0][column["Catch-up µs/fwd pkt"]] == "n/a"
    assert rows[0][:4] == ["userspace", "4", "400/400", "2,000/5,000/9,000"]
    assert "n/a" in rows[0] and "machine" in rows[0]
    assert rows[1][-1] == "not available: eBPF fast path not built yet"
    assert report.markdown_table([measured, missing]).count("\n") == 3
    cfg = BenchConfig(subscribers=[4], paths=["userspace", "fastpath-none"])
    doc = report.document(cfg, [measured, missing], machine={}, command="x", started="s",
                          finished="f", files={})
    assert doc["paths"]["userspace"]["available"] is True
    assert doc["runs"][1]["reason"] == "eBPF fast path not built yet"


def test_ebpf_programs_table_keeps_each_hook_apart() -> None:
    def run(path: str, per: dict[str, dict[str, float]]) -> Run:
        return Run(path, 4, True, figures={"ebpf": {"per_program": per}})

    none = run("fastpath-none", {"fr_egress": {"ns_per_run": 900.0, "runs_per_packet": 1.0}})
    soft = run("fastpath-soft", {"fr_egress": {"ns_per_run": 950.0, "runs_per_packet": 1.0},
                                 "shim_egress": {"ns_per_run": 7600.0, "runs_per_packet": 1.0}})
    lines = report.ebpf_programs_table([none, soft, Run("userspace", 4, True)]).splitlines()
    assert lines[0] == "| Path | Subs | fr_egress ns/run (runs/pkt) | shim_egress ns/run (runs/pkt) |"
    assert lines[2:] == ["| fastpath-none | 4 | 900 (1.0) | – |",
                         "| fastpath-soft | 4 | 950 (1.0) | 7,600 (1.0) |"]
    assert report.ebpf_programs_table([Run("userspace", 4, True)]) == ""


@pytest.mark.root
def test_bpf_prog_stats_finds_a_program_this_process_holds() -> None:
    from relay import bpfload

    bcc = bpfload.import_bcc()
    bpf = bcc.BPF(text=b"int bench_probe(struct __sk_buff *skb) { return 0; }")
    was = measure.bpf_stats_enabled()
    try:
        fn = bpf.load_func(b"bench_probe", bcc.BPF.SCHED_CLS)
        measure.set_bpf_stats(True)
        before = measure.bpf_prog_stats(os.getpid())
        assert any(isinstance(k, int) and len(v) == 2 for k, v in before.items()), before
        for _ in range(5):
            bpfload.prog_test_run(fn.fd, bytes(64))
        after = measure.bpf_prog_stats(os.getpid())
        # by the name it was loaded under, over the window: the 5 runs, 10 "packets"
        mine = measure.per_program(before, after, packets=10)["bench_probe"]
        assert mine["run_cnt"] == 5 and mine["runs_per_packet"] == 0.5, mine
        assert mine["ns_per_run"] is not None and mine["ns_per_run"] > 0, mine
    finally:
        measure.set_bpf_stats(bool(was))
        bpf.cleanup()


# -- the rate sweep -------------------------------------------------------------------------------


def test_delay_trend_flags_a_growing_queue_not_jitter() -> None:
    ms = 1_000_000
    flat = [[2 * ms, 3 * ms, 2 * ms] * 10, [1 * ms] * 30]
    assert delay_trend(flat)["growing"] is False  # type: ignore[index]
    growing = [[2 * (i + 1) * ms for i in range(30)]]  # 2 .. 60 ms: p99 of the thirds 20 / 60
    trend = delay_trend(growing)
    assert trend == {"first_third_p99_us": 20_000.0, "last_third_p99_us": 60_000.0,
                     "growing": True}
    assert delay_trend([[5 * ms] * 10 + [18 * ms] * 20])["growing"] is False  # type: ignore[index]
    jitter = [[100_000, 100_000, 400_000] * 10]  # sub-ms: 4x but under the 20 ms floor
    assert delay_trend([[100_000] * 10 + [400_000] * 20])["growing"] is False  # type: ignore[index]
    assert delay_trend(jitter)["growing"] is False  # type: ignore[index]
    bound = [[int(runner.DELAY_BOUND_US * 1000) + ms] * 30]  # flat but above the bound
    assert delay_trend(bound)["growing"] is True  # type: ignore[index]
    assert delay_trend([[ms], []]) is None


def _run(rate: float, *, lost: int = 0, growing: bool = False, sent: float | None = None,
         path: str = "userspace") -> Run:
    return Run(path, 4, True, rate=rate, figures={
        "objects_expected": 400, "objects_delivered": 400 - lost, "objects_lost": lost,
        "publisher_rate": rate if sent is None else sent, "delivered_pps": rate * 4,
        "delay": {"p50_us": 1000.0, "p99_us": 2000.0, "max_us": 3000.0},
        "delay_trend": {"first_third_p99_us": 1000.0, "last_third_p99_us": 9000.0,
                        "growing": growing},
        "machine_busy_share": 0.5, "machine_limited": False})


def test_sustained_names_what_stopped_the_path() -> None:
    assert sustained(_run(100)) == (True, None)
    assert sustained(_run(100, lost=3)) == (False, "3 objects lost or not delivered in time")
    assert sustained(_run(100, growing=True)) == \
        (False, "growing delay: p99 1.0 ms in the first third, 9.0 ms in the last")
    ok, why = sustained(_run(800, sent=500))
    assert not ok and why is not None and why.startswith("publisher sent only 500/s")
    assert sustained(Run("fastpath-soft", 4, False, reason="x")) == (False, "not available: x")
    assert sustained(Run("userspace", 4, True, error="boom")) == (False, "failed: boom")


def test_sweep_stops_a_path_at_its_first_failing_rate(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"userspace": 200.0, "moq-rs": 10_000.0}
    ran: list[tuple[str, float]] = []

    def fake_run(self: object, path: runner.BenchPath, n: int, cfg: BenchConfig,
                 tag: str = "") -> Run:
        ran.append((path.name, cfg.rate))
        assert n == 4 and cfg.duration == 3.0
        return _run(cfg.rate, lost=int(cfg.rate > limits[path.name]), path=path.name)

    monkeypatch.setattr(runner._Plan, "run", fake_run)
    monkeypatch.setattr(PATHS["moq-rs"], "unavailable", lambda: None)
    cfg = BenchConfig(subscribers=[], paths=["userspace", "moq-rs"], rates=[100, 200, 400, 800],
                      sweep_subscribers=4, sweep_duration=3.0, out=tmp_path)
    runs, sweep, paired = runner.run_bench(cfg, lambda m: None)
    assert runs == [] and paired == []
    assert ran == [("userspace", 100), ("userspace", 200), ("userspace", 400),
                   ("moq-rs", 100), ("moq-rs", 200), ("moq-rs", 400), ("moq-rs", 800)]
    capacity = highest_sustained(cfg, sweep)
    assert [(c["path"], c["highest_sustained_rate"], c["stopped_at_rate"]) for c in capacity] == \
        [("userspace", 200, 400), ("moq-rs", 800, None)]
    assert capacity[0]["stop_reason"] == "1 objects lost or not delivered in time"
    assert capacity[0]["delivered_pps"] == 800
    rows = report.sweep_rows(capacity)
    assert rows[0][:4] == ["userspace", "4", "100,200,400", "200"]
    assert rows[1][-1] == "sustained every rate swept (the limit is higher)"
    assert report.markdown_sweep_table(capacity).count("\n") == 3
    files = report.write_sweep_plot(cfg, sweep, capacity, tmp_path)
    assert (tmp_path / files["rate_sweep"]).read_bytes()[:8] == PNG_MAGIC


def test_a_fast_path_row_gives_the_relays_own_refusal() -> None:
    # asked before any lab is up, in the relay's own words: here the --crypto backend's probe
    nic = FastPath("fastpath-nic", "test", [*FASTRELAY, "relay", "--listen", "0.0.0.0:4443",
                                            "--fastpath", "on", "--crypto", "nic"],
                   kernel_path=True)
    reason = nic.unavailable()
    assert reason is not None and "\n" not in reason
    assert reason.startswith("relay refuses: crypto backend 'nic' cannot run here: "), reason


def test_paired_figures_compare_the_same_objects() -> None:
    ms = 1_000_000
    # two kernel-path and one userspace-path subscriber; object (0, 2) missed by one of them
    kernel = [{(0, 0): 1 * ms, (0, 1): 2 * ms, (0, 2): 3 * ms},
              {(0, 0): 3 * ms, (0, 1): 4 * ms}]
    userspace = [{(0, 0): 4 * ms, (0, 1): 1 * ms, (0, 2): 9 * ms}]
    p = paired_figures(kernel, userspace)
    assert p is not None and p["objects_paired"] == 2
    # per object: median of the kernel half minus the userspace one: (0,0) 2-4, (0,1) 3-1
    assert p["difference_us"] == {"p10": -2000.0, "p50": -2000.0, "p90": 2000.0, "mean": 0.0}
    assert p["kernel_earlier_share"] == 0.5
    assert p["kernel"]["count"] == 4 and p["userspace"]["count"] == 2
    assert paired_figures(kernel, []) is None
    assert paired_figures([{(0, 0): 1}], [{(1, 0): 1}]) is None


def test_object_delays_file_is_group_object_delay() -> None:
    assert read_object_delays("3 0 1500\n3 1 1700\n\n") == {(3, 0): 1500, (3, 1): 1700}


# -- the soft crypto shim's cost section -------------------------------------------------------


@pytest.mark.root
def test_shim_cost_times_every_size_both_ways() -> None:
    costs = measure.shim_cost(sizes=(64, 1400), runs=5)  # raises unless every packet was protected
    assert [(c.size, c.direction, c.runs) for c in costs] == \
        [(64, "seal", 5), (64, "open", 5), (1400, "seal", 5), (1400, "open", 5)]
    assert all(0 < c.min_ns <= c.median_ns for c in costs)


def test_shim_cost_section_says_why_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.errors import MissingCapabilityError

    def refuse() -> list[measure.ShimCost]:
        raise MissingCapabilityError("the soft crypto shim needs root (CAP_BPF, CAP_NET_ADMIN)")

    monkeypatch.setattr(measure, "shim_cost", refuse)
    said: list[str] = []
    section = runner.measure_shim_cost(said.append)
    assert section["available"] is False and section["costs"] == []
    assert section["reason"] == "the soft crypto shim needs root (CAP_BPF, CAP_NET_ADMIN)"
    assert said and said[0].startswith("shim cost: ")
    assert report.shim_rows(section) == []
    assert report.markdown_shim_table(section) == \
        "Soft crypto shim per packet: not measured: " + section["reason"]


def test_shim_cost_table_rows() -> None:
    section = {"available": True, "reason": None, "costs": [
        {"size": 1200, "direction": "seal", "min_ns": 4210, "median_ns": 4980, "runs": 9},
        {"size": 64, "direction": "open", "min_ns": 905, "median_ns": 1010, "runs": 9},
        {"size": 64, "direction": "seal", "min_ns": 870, "median_ns": 990, "runs": 9},
    ]}
    # Without the primitives (an older results.json) the crypto column says "–".
    assert report.shim_rows(section) == [["64", "0.87/0.99", "0.91/1.01", "–"],
                                         ["1200", "4.21/4.98", "–", "–"]]
    table = report.markdown_shim_table(section).splitlines()
    assert table[0] == "| QUIC packet bytes | Seal (egress) µs min/median | " \
                       "Open (ingress) µs min/median | of which ChaCha20 + Poly1305 µs (blocks) |"
    assert table[2:] == ["| 64 | 0.87/0.99 | 0.91/1.01 | – |", "| 1200 | 4.21/4.98 | – | – |"]


@pytest.mark.root
def test_crypto_primitives_cost_per_block() -> None:
    prim = measure.crypto_primitives(runs=20)
    # A 64-byte ChaCha20 block is 20 rounds of 16 words; a 16-byte Poly1305 block is one
    # multiplication mod 2^130-5: the slopes must come out in that order and positive.
    assert prim.chacha20_block_ns > prim.poly1305_block_ns > 0
    assert 0.3 < prim.clock_ghz < 10


def test_shim_blocks_counts_keystream_and_mac_blocks() -> None:
    # 1200 bytes: 11-byte header (1 + 8-byte DCID + 2-byte PN), 1173 ciphertext, 16 tag.
    # ChaCha20: 19 payload blocks + the Poly1305 key block + the header-protection block;
    # Poly1305: 1 AAD block + 74 ciphertext blocks + the lengths block.
    assert measure.shim_blocks(1200) == (21, 76)
    assert measure.shim_blocks(64) == (3, 1 + 3 + 1)


def test_shim_rows_split_out_the_crypto_primitives() -> None:
    section = {"available": True, "method": "m",
               "costs": [{"size": 1200, "direction": d, "min_ns": 6000, "median_ns": 6500,
                          "runs": 3} for d in ("seal", "open")],
               "primitives": {"chacha20_block_ns": 100.0, "poly1305_block_ns": 10.0,
                              "clock_ghz": 3.0, "runs": 3},
               "blocks": {"1200": {"chacha20": 21, "poly1305": 76}}}  # as read back from JSON
    assert report.shim_rows(section) == [["1200", "6.00/6.50", "6.00/6.50", "2.86 (21 + 76)"]]
    line = report.shim_primitives_line(section)
    assert "ChaCha20 100 ns per 64 bytes (300 cycles at 3.00 GHz)" in line
    assert "Poly1305 10.0 ns per 16 bytes (30 cycles)" in line
    assert "| 1200 | 6.00/6.50 | 6.00/6.50 | 2.86 (21 + 76) |" in report.markdown_shim_table(section)
