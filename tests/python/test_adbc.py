"""The clean room as a Python analyst sees it, through ADBC's Flight SQL driver."""

import json
import math

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pytest

from conftest import credentials


def connect(server, demo, party, password=None):
    return flightsql.connect(
        server.uri,
        db_kwargs={
            "username": party,
            "password": password if password is not None else credentials(demo)[party],
        },
        autocommit=True,
    )


def fetch(server, demo, party, *statements):
    """Run the statements in one connection; the Arrow table of the last."""
    with connect(server, demo, party) as conn:
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
            return cur.fetch_arrow_table()


def test_wrong_password_is_refused(server, demo):
    with pytest.raises(adbc_driver_manager.Error) as err:
        with connect(server, demo, "advertiser", "wrong") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
    assert "invalid user name or password" in str(err.value)


def test_get_objects_lists_only_the_party_datasets(server, demo):
    with connect(server, demo, "adnetwork") as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    tables = sorted(
        t["table_name"]
        for catalog in objects
        for schema in catalog["catalog_db_schemas"]
        for t in schema["db_schema_tables"]
    )
    assert tables == ["budget", "conversions", "impressions", "queries"]


def test_dp_reach_per_channel_is_within_its_bound(server, demo):
    """COUNT(DISTINCT uid) per channel at epsilon = 1, max_groups_contributed = 5:
    no contribution is dropped (5 channels), noise is discrete Laplace with
    b = 5, and P(any of the 5 |noise| > b ln(5 / 1e-6)) <= 1e-6."""
    truth = json.loads((demo / "truth.json").read_text())["queries"]["Q4_reach_frequency"]
    table = fetch(
        server, demo, "advertiser",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, max_groups_contributed = 5) "
        "channel, COUNT(DISTINCT uid) AS users FROM impressions GROUP BY channel ORDER BY channel",
    )
    rows = table.to_pylist()
    assert [r["channel"] for r in rows] == [t["channel"] for t in truth]
    bound = 5 * math.log(5 / 1e-6)
    for released, exact in zip(rows, truth):
        assert abs(released["users"] - exact["users"]) <= bound, (released, exact)
    meta = table.schema.field("users").metadata
    assert float(meta[b"cleanroom.ci95.half_width"]) == pytest.approx(5 * math.log(20))
    assert table.schema.metadata[b"cleanroom.charge.epsilon"] == b"1"


def test_select_star_is_refused_with_its_rule(server, demo):
    with connect(server, demo, "advertiser") as conn:
        with conn.cursor() as cur:
            with pytest.raises(adbc_driver_manager.Error) as err:
                cur.execute("SELECT * FROM conversions")
    assert "dp_aggregate_required" in str(err.value)


def test_session_setting_applies_to_the_next_query(server, demo):
    table = fetch(
        server, demo, "advertiser",
        "SET cleanroom.epsilon = 0.25",
        "SELECT device, COUNT(*) AS n FROM impressions GROUP BY device",
    )
    assert table.num_rows == 4
    assert table.schema.metadata[b"cleanroom.charge.epsilon"] == b"0.25"


def test_confidence_interval_columns_when_asked(server, demo):
    table = fetch(
        server, demo, "adnetwork",
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, confidence_intervals = true) "
        "test_group, COUNT(DISTINCT uid) AS people FROM impressions GROUP BY test_group ORDER BY test_group",
    )
    assert table.column_names == ["test_group", "people", "people_ci_low", "people_ci_high"]
    half = float(table.schema.field("people").metadata[b"cleanroom.ci95.half_width"])
    for row in table.to_pylist():
        assert row["people_ci_low"] == pytest.approx(row["people"] - half)
        assert row["people_ci_high"] == pytest.approx(row["people"] + half)
