"""Datasets on S3: a real S3-compatible server (moto's, on loopback) holds a
dataset's files; queries read them and uploads commit new data versions
there, all or nothing."""

import hashlib
import json
import socket
import textwrap

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from conftest import Server, credentials

BUCKET = "cleanroom-test"
COUNT = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_contributions_per_group = 1) COUNT(*) AS n FROM conversions"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_collaboration(demo, tmp_path):
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for f in sorted((demo / "data" / "conversions").glob("*.parquet")):
        client.upload_file(str(f), BUCKET, f"clean/conversions/{f.name}")
    text = (demo / "manifest.toml").read_text() \
        .replace('location = "data/conversions/"', f'location = "s3://{BUCKET}/clean/conversions/"') \
        .replace('location = "data/', f'location = "{demo}/data/')
    text += textwrap.dedent(f"""
        [s3]
        endpoint = "{endpoint}"
        region = "us-east-1"
        allow_http = true
        access_key_id = "testing"
        secret_access_key = "testing"
        """)
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(text)
    server = Server(demo, tmp_path / "state", manifest)
    yield server, client
    server.stop()
    moto.stop()


def run(server, demo, party, sql):
    with flightsql.connect(server.uri, db_kwargs={"username": party, "password": credentials(demo)[party]}, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetch_arrow_table()


def ingest(server, demo, party, data, mode="append"):
    with flightsql.connect(server.uri, db_kwargs={"username": party, "password": credentials(demo)[party]}, autocommit=True) as conn:
        with conn.cursor() as cur:
            return cur.adbc_ingest("conversions", data, mode=mode)


def keys(client, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def noisy(table):
    return table.column("n")[0].as_py(), float(table.schema.field("n").metadata[b"cleanroom.ci95.half_width"])


def test_a_dataset_on_s3_is_queried_and_takes_uploads_as_versions(s3_collaboration, demo):
    server, client = s3_collaboration
    # One row per person counts (max_contributions_per_group = 1): the truth is the number of people.
    rows = len(set(pq.read_table(demo / "data" / "conversions", columns=["uid"]).column("uid").to_pylist()))
    n, half = noisy(run(server, demo, "advertiser", COUNT))
    assert abs(n - rows) <= 2 * half, f"{n} vs {rows}"

    # New conversions of new people: the demo's first 3000, re-keyed.
    new = pq.read_table(demo / "data" / "conversions").slice(0, 3000)
    uids = pa.array([hashlib.sha256(f"s3-{i}".encode()).hexdigest() for i in range(3000)])
    new = new.set_column(new.schema.get_field_index("uid"), "uid", uids)
    assert ingest(server, demo, "advertiser", new) == 3000
    assert keys(client, "clean/conversions/_versions/") == ["clean/conversions/_versions/00000000000000000001.json"]
    version = json.loads(client.get_object(Bucket=BUCKET, Key="clean/conversions/_versions/00000000000000000001.json")["Body"].read())
    assert version["rows_added"] == 3000 and version["mode"] == "append"
    n2, half2 = noisy(run(server, demo, "advertiser", COUNT))
    assert abs(n2 - rows - 3000) <= 2 * half2, f"{n2} vs {rows + 3000}"

    # A refused upload leaves nothing on S3 and the version as it was.
    before = keys(client, "clean/conversions/")
    with pytest.raises(adbc_driver_manager.Error) as err:
        ingest(server, demo, "advertiser", new.drop_columns(["revenue"]))
    assert "missing [revenue]" in str(err.value)
    assert keys(client, "clean/conversions/") == before
    print(f"s3: {rows} rows -> noisy {n}; after appending 3000: noisy {n2}")
