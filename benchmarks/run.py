#!/usr/bin/env python3
"""AdBench benchmark runner: the DP path against plain SQL, in one run on the same files.

For each scale factor it times Q1-Q5 of benchmarks/queries.sql as plain SQL on DuckDB (the
Python package) and on in-process DataFusion (`cleanroom-bench --plain-json`), and the same
questions in DP SQL (benchmarks/dp-queries.sql) through Flight SQL (ADBC) against
`cleanroom serve` on each engine asked for (`in-process`, `ballista` embedded in the server,
or `cluster`: `cleanroom scheduler` and two `cleanroom executor` processes). It prints the median of the timed runs per
system and query, the DP path's ratio to each plain-SQL system, and the peak memory (max
RSS) of the DataFusion process and of each server (a cluster's processes summed; DuckDB runs inside this
script's process and is not measured apart); `--json FILE` writes the same figures as JSON.

A benchmark, not a test: run it on a quiet machine with release binaries
(`cargo build --release -p cleanroom -p cleanroom-bench`). Each DP run asks with a slightly
different epsilon, so no run is answered from the released-answer cache.

    python3 benchmarks/run.py --sf 0.1,1 --runs 3 --json bench.json
    python3 benchmarks/run.py --sf 1 --runs 1 --engines in-process --analysts 16
    python3 benchmarks/run.py --sf 1 --engines in-process,cluster
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("impressions", "conversions")
PARTY = "advertiser"


def named(path: Path) -> dict:
    """name -> SQL for each "-- name: <id>" section of a query file."""
    queries = {}
    for section in re.split(r"^-- name: ", path.read_text(), flags=re.M)[1:]:
        name, body = section.split("\n", 1)
        lines = [l for l in body.splitlines() if not l.lstrip().startswith("--")]
        queries[name.strip()] = "\n".join(lines).strip().rstrip(";")
    return queries


def default_bin_dir() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    release = target / "release"
    return release if (release / "cleanroom").exists() else target / "debug"


def run_child(args, **kwargs):
    """Run a process to its end; (stdout, max RSS in bytes)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **kwargs)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} exited with {proc.returncode}")
    return out, usage.ru_maxrss * 1024


def peak_rss(pid: int) -> int:
    """A running process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# Analyst parties the benchmark manifest adds beside the generated two (each logs in with the
# advertiser's demo password and reads both datasets), so concurrent analysts come from four.
EXTRA_PARTIES = ("agency", "publisher")

# Options for the in-process server (--memory-limit, --query-slots), from the command line.
SERVE_ARGS = []


def generate(bin_dir: Path, sf: float, data: Path) -> None:
    if not (data / "manifest.toml").exists():
        print(f"generating AdBench SF {sf} in {data}", file=sys.stderr)
        subprocess.run([str(bin_dir / "cleanroom"), "generate", "--sf", str(sf), "--seed", "42", "--quiet", "--out", str(data)], check=True)
    # The DP path pays epsilon per run: a manifest copy beside the generated one (so relative
    # locations resolve) with budgets that cannot run out, and two more analyst parties.
    text = re.sub(r"^(\s*)epsilon_budget\s*=.*$", r"\1epsilon_budget = 1000000000.0", (data / "manifest.toml").read_text(), flags=re.M)
    advertiser = re.search(r'\[\[parties\]\]\nname = "advertiser"\n.*?(?=\n\n)', text, flags=re.S).group(0)
    extra = "".join("\n\n" + advertiser.replace('name = "advertiser"', f'name = "{p}"') for p in EXTRA_PARTIES)
    text = text.replace(advertiser, advertiser + extra, 1)
    readers = ", ".join(f'"{p}"' for p in ("advertiser", "adnetwork") + EXTRA_PARTIES)
    text = re.sub(r"^readers = \[.*\]$", f"readers = [{readers}]", text, flags=re.M)
    (data / "bench-manifest.toml").write_text(text)


def password(data: Path, party: str) -> str:
    party = "advertiser" if party in EXTRA_PARTIES else party
    text = (data / "credentials.toml").read_text()
    section = text.split(f"[parties.{party}]", 1)[1]
    return re.search(r'password\s*=\s*"([^"]+)"', section).group(1)


def time_duckdb(data: Path, queries: dict, runs: int) -> dict:
    import duckdb

    con = duckdb.connect()
    for table in TABLES:
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{data}/data/{table}/**/*.parquet')")
    times = {name: [] for name in queries}
    for run in range(runs + 1):
        for name, sql in queries.items():
            start = time.perf_counter()
            relation = con.sql(sql)
            (relation.to_arrow_table if hasattr(relation, "to_arrow_table") else relation.arrow)()
            if run > 0:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def time_datafusion(bin_dir: Path, sf: float, data_dir: Path, runs: int):
    out, rss = run_child([str(bin_dir / "cleanroom-bench"), "--plain-json", "--sf", str(sf), "--data-dir", str(data_dir), "--runs", str(runs)])
    times = {}
    for line in out.splitlines():
        row = json.loads(line)
        times[row["query"]] = row["ms"]
    return times, rss


def free_port_pair() -> int:
    """A loopback port P with P + 1 also free (an executor's shuffle service takes both)."""
    import socket

    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port


# The multi-process cluster engine: executor processes beside `cleanroom scheduler`, and the
# task slots of each (2 x 1 on a 2-core machine: one task per core).
CLUSTER_EXECUTORS = 2
CLUSTER_SLOTS = 1


class Server:
    """The clean room on the benchmark manifest, for the length of a `with` block: `cleanroom
    serve --engine in-process|ballista`, or for the engine `cluster` a multi-process cluster on
    this machine (`cleanroom scheduler` and CLUSTER_EXECUTORS `cleanroom executor` processes)."""

    def __init__(self, bin_dir: Path, data: Path, engine: str):
        self.state = tempfile.mkdtemp(prefix="cleanroom-bench-")
        self.log = open(Path(self.state) / "serve.log", "w")
        self.engine = engine
        self.bin_dir = bin_dir
        self.executors = []
        state_dir = str(Path(self.state) / "state")
        manifest = str(data / "bench-manifest.toml")
        if engine == "cluster":
            slots = CLUSTER_EXECUTORS * CLUSTER_SLOTS
            command = ["scheduler", "--manifest", manifest, "--listen", "127.0.0.1:0", "--internal-bind", f"127.0.0.1:{free_port_pair()}",
                       "--partitions", str(slots), "--state-dir", state_dir]
        else:
            extra = SERVE_ARGS if engine == "in-process" else []
            command = ["serve", "--manifest", manifest, "--listen", "127.0.0.1:0", "--engine", engine, "--state-dir", state_dir, *extra]
        self.process = subprocess.Popen([str(bin_dir / "cleanroom"), *command], stdout=subprocess.PIPE, stderr=self.log, text=True)

    def __enter__(self):
        self.uri = None
        for line in self.process.stdout:
            found = re.search(r"(grpc://\S+)", line)
            if found:
                self.uri = found.group(1)
                joins = re.search(r"executors join (\S+?)[,)]", line)
                break
        if self.uri is None:
            self.__exit__()
            raise RuntimeError(f"cleanroom with engine {self.engine} did not start: see {self.log.name}")
        if self.engine == "cluster":
            for i in range(CLUSTER_EXECUTORS):
                work = Path(self.state) / f"executor-{i}"
                work.mkdir()
                self.executors.append(subprocess.Popen(
                    [str(self.bin_dir / "cleanroom"), "executor", "--scheduler", joins.group(1), "--port", str(free_port_pair()),
                     "--slots", str(CLUSTER_SLOTS), "--work-dir", str(work), "--heartbeat-interval", "5"],
                    stdout=subprocess.DEVNULL, stderr=self.log))
        return self

    def __exit__(self, *_):
        for process in [*self.executors, self.process]:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        self.log.close()

    def peak_rss(self) -> int:
        """Peak RSS of the server, or the sum over the cluster's processes."""
        return sum(peak_rss(p.pid) for p in [self.process, *self.executors])

    def connect(self, data: Path, party: str):
        import adbc_driver_flightsql.dbapi as flight_sql

        return flight_sql.connect(self.uri, db_kwargs={"username": party, "password": password(data, party)})


def with_epsilon(sql: str, epsilon: float) -> str:
    """The DP query asked with this epsilon (a different epsilon is a different question,
    never answered from the released-answer cache)."""
    return sql.replace("OPTIONS (epsilon = 1", f"OPTIONS (epsilon = {epsilon:.6f}", 1)


def time_dp(bin_dir: Path, data: Path, engine: str, queries: dict, runs: int):
    with Server(bin_dir, data, engine) as server:
        conn = server.connect(data, PARTY)
        times = {name: [] for name in queries}
        with conn.cursor() as cur:
            for run in range(runs + 1):
                for name, sql in queries.items():
                    asked = with_epsilon(sql, 1 + (run + 1) * 1e-6)
                    start = time.perf_counter()
                    cur.execute(asked)
                    cur.fetch_arrow_table()
                    if run > 0:
                        times[name].append((time.perf_counter() - start) * 1e3)
        conn.close()
        return times, server.peak_rss()


def analysts(bin_dir: Path, data: Path, engine: str, queries: dict, count: int) -> dict:
    """`count` analysts of four parties at once, each asking every query once (with its own
    epsilon): wall time, latency percentiles, errors, and whether each party's spent budget is
    exactly the sum of what its analysts asked."""
    from concurrent.futures import ThreadPoolExecutor

    parties = ["advertiser", "adnetwork", *EXTRA_PARTIES]
    with Server(bin_dir, data, engine) as server:
        def analyst(i: int):
            party = parties[i % len(parties)]
            asked, latencies, errors = 0.0, [], []
            conn = server.connect(data, party)
            with conn.cursor() as cur:
                for q, (name, sql) in enumerate(queries.items()):
                    epsilon = 1 + (1000 + i * len(queries) + q) * 1e-6
                    start = time.perf_counter()
                    try:
                        cur.execute(with_epsilon(sql, epsilon))
                        cur.fetch_arrow_table()
                        asked += float(f"{epsilon:.6f}")
                        latencies.append((time.perf_counter() - start) * 1e3)
                    except Exception as e:  # noqa: BLE001 (counted and reported)
                        errors.append(f"{party} {name}: {e}")
            conn.close()
            return party, asked, latencies, errors

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=count) as pool:
            done = list(pool.map(analyst, range(count)))
        total = time.perf_counter() - start
        latencies = sorted(l for _, _, ls, _ in done for l in ls)
        errors = [e for _, _, _, es in done for e in es]
        expected = {}
        for party, asked, _, _ in done:
            expected[party] = expected.get(party, 0.0) + asked
        exact = True
        for party, want in expected.items():
            conn = server.connect(data, party)
            with conn.cursor() as cur:
                cur.execute("SELECT spent_epsilon FROM system.budget")
                spent = cur.fetch_arrow_table().column(0)[0].as_py()
            conn.close()
            exact &= abs(spent - want) <= 1e-9 * max(1.0, want)
        pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")
        return {"analysts": count, "parties": len(parties), "queries": len(latencies) + len(errors), "errors": errors,
                "total_s": total, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "budgets_exact": exact,
                "peak_rss_bytes": server.peak_rss()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sf", default="0.1,1", help="scale factors, comma-separated (default 0.1,1)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per query after one warm-up (default 3)")
    parser.add_argument("--engines", default="in-process,ballista", help="engines of the DP path: in-process, ballista (embedded in the server), cluster (scheduler and executor processes) (default in-process,ballista)")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-data"), help="where generated data is kept between runs")
    parser.add_argument("--bin-dir", type=Path, default=None, help="where cleanroom and cleanroom-bench are (default: the release build, else debug)")
    parser.add_argument("--analysts", type=int, default=0, help="then this many concurrent analysts (of four parties) each ask every DP query once, on the first engine")
    parser.add_argument("--memory-limit", default=None, help="the in-process server's --memory-limit (e.g. 6GiB)")
    parser.add_argument("--query-slots", type=int, default=None, help="the in-process server's --query-slots")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.memory_limit:
        SERVE_ARGS.extend(["--memory-limit", args.memory_limit])
    if args.query_slots:
        SERVE_ARGS.extend(["--query-slots", str(args.query_slots)])
    bin_dir = args.bin_dir or default_bin_dir()
    plain = named(ROOT / "benchmarks" / "queries.sql")
    dp = named(ROOT / "benchmarks" / "dp-queries.sql")
    assert plain.keys() == dp.keys(), "queries.sql and dp-queries.sql name the same queries"
    engines = [e for e in args.engines.split(",") if e]
    results = []
    for sf in [float(s) for s in args.sf.split(",")]:
        data = args.data_dir / f"sf-{sf:g}"
        generate(bin_dir, sf, data)
        systems = {}
        systems["duckdb"] = (time_duckdb(data, plain, args.runs), None)
        systems["datafusion"] = time_datafusion(bin_dir, sf, args.data_dir, args.runs)
        for engine in engines:
            systems[f"dp-{engine}"] = time_dp(bin_dir, data, engine, dp, args.runs)
        for name in plain:
            row = {"sf": sf, "query": name}
            for system, (times, _) in systems.items():
                row[f"{system}_ms"] = statistics.median(times[name])
            for engine in engines:
                for base in ("duckdb", "datafusion"):
                    row[f"dp-{engine}_vs_{base}"] = row[f"dp-{engine}_ms"] / row[f"{base}_ms"]
            results.append(row)
        memory = {system: rss for system, (_, rss) in systems.items() if rss is not None}
        results.append({"sf": sf, "peak_rss_bytes": memory})
        if args.analysts and engines:
            results.append({"sf": sf, "engine": engines[0], "concurrent": analysts(bin_dir, data, engines[0], dp, args.analysts)})

    columns = ["duckdb", "datafusion"] + [f"dp-{e}" for e in engines]
    ratios = [f"dp-{e}_vs_{b}" for e in engines for b in ("duckdb", "datafusion")]
    print(f"{'sf':>6} {'query':<20} " + " ".join(f"{c + ' ms':>16}" for c in columns) + " " + " ".join(f"{r:>26}" for r in ratios))
    for row in results:
        if "query" in row:
            print(f"{row['sf']:>6} {row['query']:<20} " + " ".join(f"{row[c + '_ms']:>16.1f}" for c in columns) + " " + " ".join(f"{row[r]:>26.2f}" for r in ratios))
        elif "concurrent" in row:
            c = row["concurrent"]
            print(f"{row['sf']:>6} {c['analysts']} analysts of {c['parties']} parties on {row['engine']}: {c['queries']} queries in {c['total_s']:.1f} s, "
                  f"p50 {c['p50_ms']:.0f} ms, p95 {c['p95_ms']:.0f} ms, {len(c['errors'])} errors, budgets exact: {c['budgets_exact']}, "
                  f"peak RSS {c['peak_rss_bytes'] / 2**20:.0f} MiB")
            for e in c["errors"][:5]:
                print(f"       {e}")
        else:
            print(f"{row['sf']:>6} peak RSS: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in row["peak_rss_bytes"].items()))
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "engines": engines, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
