"""The benchmark runner works end to end (a smoke run at SF 0.01, not a timing)."""

import json
import os
import subprocess
import sys

from conftest import ROOT, cleanroom_binary


def test_the_benchmark_runner_times_every_query_on_every_system(tmp_path):
    bin_dir = cleanroom_binary().parent
    if not (bin_dir / "cleanroom-bench").exists():
        subprocess.run(["cargo", "build", "-q", "-p", "cleanroom-bench"], cwd=ROOT, check=True)
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--sf", "0.01", "--runs", "1",
         "--data-dir", str(tmp_path / "data"), "--bin-dir", str(bin_dir), "--json", str(out), "--analysts", "4"],
        check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    figures = json.loads(out.read_text())
    rows = [r for r in figures["results"] if "query" in r]
    assert [r["query"] for r in rows] == ["Q1_match_rate", "Q2_affiliate_ltv", "Q3_incrementality", "Q4_reach_frequency", "Q5_last_touch"]
    for row in rows:
        for system in ("duckdb", "datafusion", "dp-in-process", "dp-ballista"):
            assert row[f"{system}_ms"] > 0, row
        assert row["dp-in-process_vs_duckdb"] == row["dp-in-process_ms"] / row["duckdb_ms"]
    memory = [r for r in figures["results"] if "peak_rss_bytes" in r][0]["peak_rss_bytes"]
    assert set(memory) == {"datafusion", "dp-in-process", "dp-ballista"} and all(v > 0 for v in memory.values()), memory
    # Four analysts of four parties at once: every query answered, each party charged exactly
    # what its analysts asked for.
    concurrent = [r for r in figures["results"] if "concurrent" in r][0]["concurrent"]
    assert concurrent["errors"] == [] and concurrent["queries"] == 4 * 5, concurrent
    assert concurrent["budgets_exact"] and concurrent["p95_ms"] >= concurrent["p50_ms"] > 0, concurrent
