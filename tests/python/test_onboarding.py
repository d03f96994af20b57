"""Bringing data into the clean room as a data owner does: raw e-mails in a CSV
on its own machine -> `cleanroom prepare` -> ADBC bulk ingest -> a DP match-rate
query against the other party's data. Bad uploads are refused or rolled back,
and the previous data version keeps answering."""

import hashlib
import hmac
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import Server, cleanroom_binary, credentials

MATCH_RATE = """
WITH seen AS (
  SELECT uid, 1 AS customer, 0 AS exposed FROM crm
  UNION ALL
  SELECT uid, 0 AS customer, 1 AS exposed FROM impressions
),
people AS (SELECT uid, MAX(customer) AS customer, MAX(exposed) AS exposed FROM seen GROUP BY uid)
SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1)
  SUM(customer) AS customers, SUM(customer * exposed) AS matched
FROM people
"""


@pytest.fixture
def collaboration(demo, tmp_path):
    """The demo collaboration plus an empty `crm` dataset owned by the advertiser."""
    text = (demo / "manifest.toml").read_text().replace('location = "data/', f'location = "{demo}/data/')
    text += textwrap.dedent(f"""
        [[datasets]]
        name = "crm"
        owner = "advertiser"
        location = "{tmp_path}/crm/"
        format = "parquet"
        privacy_unit = "uid"
        readers = ["advertiser", "adnetwork"]

        [datasets.columns]
        uid = {{ role = "join_key" }}
        segment = {{ role = "dimension", domain = ["gold", "silver"] }}
        """)
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(text)
    server = Server(demo, tmp_path / "state", manifest)
    yield server, tmp_path
    server.stop()


def connect(server, demo, party):
    return flightsql.connect(server.uri, db_kwargs={"username": party, "password": credentials(demo)[party]}, autocommit=True)


def write_crm_csv(path, people):
    """E-mails as a CRM exports them: mixed case, stray spaces, some broken, some twice."""
    lines = ["email,segment"]
    for n in range(people):
        lines.append(f"  Person{n}@Example.COM ,{'gold' if n % 3 == 0 else 'silver'}")
    for n in range(1000):
        lines.append(f"stranger{n}@example.org,silver")
    for n in range(20):
        lines.append(f"not-an-email-{n},gold")
    for n in range(50):
        lines.append(f"person{n}@example.com,gold")
    path.write_text("\n".join(lines) + "\n")


def prepare(demo, csv, out):
    done = subprocess.run(
        [str(cleanroom_binary()), "prepare", "--in", str(csv), "--id-column", "email", "--kind", "email",
         "--key-file", str(demo / "collaboration.key"), "--out", str(out), "--json"],
        capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def ingest(server, demo, party, table, data, mode="append"):
    with connect(server, demo, party) as conn:
        with conn.cursor() as cur:
            return cur.adbc_ingest(table, data, mode=mode)


def run(server, demo, party, sql):
    with connect(server, demo, party) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()


def impression_uids(demo):
    return set(pq.read_table(demo / "data" / "impressions", columns=["uid"]).column("uid").to_pylist())


def test_prepared_emails_match_the_ad_networks_audience_within_the_interval(collaboration, demo):
    server, tmp = collaboration
    csv = tmp / "crm.csv"
    write_crm_csv(csv, 2000)
    report = prepare(demo, csv, tmp / "prepared")
    assert report["rows_read"] == 2000 + 1000 + 20 + 50
    assert report["invalid"] == 20 and report["rows_written"] == 3050
    assert report["duplicates"] == 50
    table = pq.read_table(report["output"])
    assert table.column_names == ["uid", "segment"], "the raw e-mail column is gone"
    assert all(len(u) == 64 for u in table.column("uid").to_pylist())
    # The party's own check: the same HMAC the demo parties used.
    key = (demo / "collaboration.key").read_bytes().strip()
    assert table.column("uid")[0].as_py() == hmac.new(key, b"person0@example.com", hashlib.sha256).hexdigest()

    assert ingest(server, demo, "advertiser", "crm", table) == 3050
    customers = set(table.column("uid").to_pylist())
    matched = len(customers & impression_uids(demo))
    assert 0 < matched < len(customers)

    answer = run(server, demo, "advertiser", MATCH_RATE)
    for column, truth in (("customers", len(customers)), ("matched", matched)):
        value = answer.column(column)[0].as_py()
        half = float(answer.schema.field(column).metadata[b"cleanroom.ci95.half_width"])
        # 2 x the 95 % half-width: fails by chance about once in 10^4 runs.
        assert abs(value - truth) <= 2 * half, f"{column}: {value} vs {truth} (95 % half-width {half})"
    print(f"prepare: {report['rows_read']} rows in {report['seconds']:.3f} s; match: {matched} true, "
          f"{answer.column('matched')[0].as_py()} noisy")


def test_bad_uploads_are_refused_or_rolled_back_and_the_previous_version_answers(collaboration, demo):
    server, tmp = collaboration
    csv = tmp / "crm.csv"
    write_crm_csv(csv, 500)
    table = pq.read_table(prepare(demo, csv, tmp / "prepared")["output"])
    ingest(server, demo, "advertiser", "crm", table)
    before = run(server, demo, "advertiser", MATCH_RATE)
    charges = run(server, demo, "advertiser", "SELECT receipt_id FROM system.queries").column(0).to_pylist()

    def refused(party, data, *needles):
        with pytest.raises(adbc_driver_manager.Error) as err:
            ingest(server, demo, party, "crm", data)
        for needle in needles:
            assert needle in str(err.value), str(err.value)

    refused("advertiser", table.append_column("tier", pa.array(["a"] * len(table))), "unknown [tier]")
    refused("adnetwork", table, "only its owner, `advertiser`, may")
    raw = pa.table({"uid": [f"person{n}@example.com" for n in range(10)], "segment": ["gold"] * 10})
    refused("advertiser", raw, "is not the collaboration's hashed identifier")

    # A connection cut mid-upload: a client process killed while it sends.
    big = pa.concat_tables([table] * 400)
    pq.write_table(big, tmp / "big.parquet")
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import adbc_driver_flightsql.dbapi as flightsql, pyarrow.parquet as pq
        big = pq.read_table({str(tmp / 'big.parquet')!r})
        conn = flightsql.connect({server.uri!r}, db_kwargs={{"username": "advertiser", "password": {credentials(demo)['advertiser']!r}}}, autocommit=True)
        cur = conn.cursor()
        print("sending", flush=True)
        cur.adbc_ingest("crm", big.to_batches(max_chunksize=1000), mode="append")
        print("done", flush=True)
        """)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "sending"
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()

    # Still the same data version: the same question gets the very same answer, free.
    assert sorted(p.name for p in (tmp / "crm" / "_versions").iterdir()) == ["00000000000000000001.json"]
    version = json.loads((tmp / "crm" / "_versions" / "00000000000000000001.json").read_text())
    committed = {f["path"] for f in version["files"]}

    def stray():
        root = tmp / "crm"
        return {str(p.relative_to(root)) for p in (root / "_uploads").rglob("*") if p.is_file()} - committed

    deadline = time.time() + 20
    while (stray() or "upload not committed" not in server.log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    assert "upload not committed" in server.log.read_text(), "the server saw the upload cut mid-stream"
    assert not stray(), "the cut upload's files are deleted"
    after = run(server, demo, "advertiser", MATCH_RATE)
    assert after.equals(before)
    assert run(server, demo, "advertiser", "SELECT receipt_id FROM system.queries").column(0).to_pylist() == charges, \
        "answered from the released answers of the same version, at no new charge"
