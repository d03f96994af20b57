"""The clean room as BI tools reach it: SQLAlchemy and pandas through
flightsql-dbapi (Superset's Flight SQL dialect), the raw Flight SQL call
sequence of the Arrow JDBC driver (pyarrow.flight), and ADBC's session
options. Every check reads the budget back to prove what was charged."""

import json
import re

import adbc_driver_flightsql.dbapi as adbc
import flightsql
import flightsql.flightsql_pb2 as pb
import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import sqlalchemy as sa
from google.protobuf import any_pb2

from conftest import credentials

DP_REACH = "SELECT channel, COUNT(DISTINCT uid) AS users FROM impressions GROUP BY channel ORDER BY channel"


def host_port(server):
    m = re.match(r"grpc://([^:]+):(\d+)", server.uri)
    return m.group(1), int(m.group(2))


def engine(server, demo, party="advertiser", **headers):
    """A SQLAlchemy engine as Superset makes one from a connection string;
    extra query parameters become request headers."""
    host, port = host_port(server)
    password = credentials(demo)[party]
    query = "&".join(f"{k}={v}" for k, v in {"insecure": "true", **headers}.items())
    return sa.create_engine(f"datafusion://{party}:{password}@{host}:{port}?{query}")


def dbapi(server, demo, party="advertiser"):
    host, port = host_port(server)
    client = flightsql.FlightSQLClient(
        host=host, port=port, user=party, password=credentials(demo)[party], insecure=True
    )
    return flightsql.connect(client)


def spent(conn):
    """ε spent by the connection's party so far (a DB-API connection)."""
    cur = conn.cursor()
    cur.execute("SELECT spent_epsilon FROM system.budget")
    return cur.fetchall()[0][0]


def test_sqlalchemy_reflects_text_columns_and_runs_core_select(server, demo):
    eng = engine(server, demo, **{"x-cleanroom-epsilon": "0.5", "x-cleanroom-max-groups-contributed": "5"})
    inspector = sa.inspect(eng)
    assert "impressions" in inspector.get_table_names()
    columns = {c["name"]: c["type"] for c in inspector.get_columns("impressions")}
    assert isinstance(columns["channel"], sa.types.TEXT), columns
    impressions = sa.Table("impressions", sa.MetaData(), autoload_with=eng)
    query = (
        sa.select(impressions.c.channel, sa.func.count(sa.distinct(impressions.c.uid)).label("users"))
        .group_by(impressions.c.channel)
        .order_by(impressions.c.channel)
    )
    with eng.connect() as conn:
        rows = conn.execute(query).fetchall()
        # The connection string's options: ε = 0.5, five channels a person
        # may reach (every channel kept).
        budget = conn.execute(sa.text("SELECT spent_epsilon FROM system.budget")).fetchall()
    truth = json.loads((demo / "truth.json").read_text())["queries"]["Q4_reach_frequency"]
    assert [r.channel for r in rows] == [t["channel"] for t in truth]
    assert all(isinstance(r.channel, str) for r in rows)
    assert budget[0][0] == pytest.approx(0.5)


def test_pandas_read_sql_set_and_probes(server, demo):
    conn = dbapi(server, demo)
    with pytest.warns(UserWarning):  # pandas prefers SQLAlchemy, but takes DB-API
        frame = pd.read_sql(DP_REACH, conn)
    assert list(frame.columns) == ["channel", "users"] and len(frame) == 5
    assert spent(conn) == pytest.approx(1.0)  # the manifest's default ε
    # Wrappers a BI tool adds around an answered question — a row limit, a
    # total, a top-1 — are post-processing of the same release: free, and
    # computed from the same noisy values.
    cur = conn.cursor()
    cur.execute(f"SELECT * FROM ({DP_REACH}) AS virtual_table LIMIT 1001")
    assert [tuple(r) for r in cur.fetchall()] == list(frame.itertuples(index=False, name=None))
    cur.execute(f"SELECT SUM(users) AS total FROM ({DP_REACH}) AS virtual_table")
    assert cur.fetchall()[0][0] == frame.users.sum()
    cur.execute(f"SELECT channel FROM ({DP_REACH}) AS t ORDER BY users DESC, channel LIMIT 1")
    assert cur.fetchall()[0][0] == frame.sort_values(["users", "channel"], ascending=[False, True]).channel.iloc[0]
    assert spent(conn) == pytest.approx(1.0)
    # SET answers with an empty result, and applies to what follows.
    cur = conn.cursor()
    cur.execute("SET cleanroom.epsilon = 0.25")
    assert cur.fetchall() == []
    cur.execute("SELECT device, COUNT(*) AS n FROM impressions GROUP BY device")
    assert len(cur.fetchall()) == 4
    assert spent(conn) == pytest.approx(1.25)
    # A hint comment carries per-query options in SQL any parser accepts.
    cur.execute("SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = 0.125) */ device, COUNT(*) AS n FROM impressions GROUP BY device")
    assert len(cur.fetchall()) == 4
    assert spent(conn) == pytest.approx(1.375)
    # Column probes, on a DP query or a dataset, answer no row and cost nothing.
    for probe in [
        f"SELECT * FROM ({DP_REACH}) AS virtual_table WHERE 1 = 0",
        f"SELECT * FROM ({DP_REACH}) AS virtual_table LIMIT 0",
        "SELECT * FROM impressions LIMIT 0",
    ]:
        cur.execute(probe)
        assert cur.fetchall() == [], probe
        assert cur.description, probe
    assert spent(conn) == pytest.approx(1.375)


class Auth:
    """A pyarrow Flight client authenticated as the Arrow JDBC driver is:
    Basic credentials in the handshake, the Bearer token after."""

    def __init__(self, server, demo, party="advertiser"):
        self.client = flight.FlightClient(server.uri)
        token = self.client.authenticate_basic_token(party, credentials(demo)[party])
        self.options = flight.FlightCallOptions(headers=[token])

    def info(self, message):
        any_ = any_pb2.Any()
        any_.Pack(message)
        return self.client.get_flight_info(flight.FlightDescriptor.for_command(any_.SerializeToString()), self.options)

    def fetch(self, info):
        return pa.concat_tables(
            [self.client.do_get(e.ticket, self.options).read_all() for e in info.endpoints]
        ) if info.endpoints else None

    def action(self, kind, message=None):
        body = b""
        if message is not None:
            any_ = any_pb2.Any()
            any_.Pack(message)
            body = any_.SerializeToString()
        return list(self.client.do_action(flight.Action(kind, body), self.options))


def varint(n):
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def cancel_request(info):
    """Flight's CancelFlightInfoRequest {info = 1} (pyarrow has no class for it)."""
    body = info.serialize()
    return b"\x0a" + varint(len(body)) + body


# CancelFlightInfoResult {status = 1: CANCEL_STATUS_CANCELLED (1)}.
CANCELLED = b"\x08\x01"


def test_jdbc_call_sequence(server, demo):
    c = Auth(server, demo)
    # DatabaseMetaData: every SqlInfo id JDBC reads has a value.
    info = c.fetch(c.info(pb.CommandGetSqlInfo()))
    values = {row["info_name"]: row["value"] for row in info.to_pylist()}
    jdbc_ids = [0, 1, 2, 3, 4, 8, 500, 501, 502, 503, 504, 505, 506, 507, 508, 509, 510, 511, 512, 513, 514, 515,
                516, 517, 518, 519, 520, 521, 522, 523, 524, 525, 526, 527, 528, 529, 530, 531, 532, 533, 534, 535,
                536, 537, 538, 539, 540] + list(range(541, 577))
    missing = [i for i in jdbc_ids if i not in values]
    assert not missing, missing
    assert "DIFFERENTIAL_PRIVACY" in values[508]
    assert {"ABS", "ROUND"} <= set(values[509]) and "LOWER" in values[510] and "DATE_TRUNC" in values[512]
    # Tables with their columns' Flight SQL metadata, text as plain utf8.
    tables = c.fetch(c.info(pb.CommandGetTables(include_schema=True))).to_pylist()
    impressions = next(t for t in tables if t["table_name"] == "impressions")
    schema = pa.ipc.read_schema(pa.py_buffer(impressions["table_schema"]))
    channel = schema.field("channel")
    assert channel.type == pa.utf8()
    assert channel.metadata[b"ARROW:FLIGHT:SQL:TYPE_NAME"] == b"VARCHAR"
    assert channel.metadata[b"ARROW:FLIGHT:SQL:TABLE_NAME"] == b"impressions"
    # Key calls answer with no rows.
    ref = dict(table="impressions")
    for command in [pb.CommandGetPrimaryKeys(**ref), pb.CommandGetExportedKeys(**ref), pb.CommandGetImportedKeys(**ref),
                    pb.CommandGetCrossReference(pk_table="impressions", fk_table="conversions")]:
        assert c.fetch(c.info(command)).num_rows == 0, command
    # Actions: no transactions or CancelQuery are advertised.
    actions = {a.type for a in c.client.list_actions(c.options)}
    assert {"CreatePreparedStatement", "ClosePreparedStatement", "CancelFlightInfo", "SetSessionOptions", "CloseSession"} <= actions
    assert not actions & {"BeginTransaction", "EndTransaction", "BeginSavepoint", "CancelQuery"}
    # PreparedStatement: prepare → GetFlightInfo → DoGet → close.
    [result] = c.action("CreatePreparedStatement", pb.ActionCreatePreparedStatementRequest(query=DP_REACH))
    any_ = any_pb2.Any()
    any_.ParseFromString(result.body.to_pybytes())
    prepared = pb.ActionCreatePreparedStatementResult()
    any_.Unpack(prepared)
    announced = pa.ipc.read_schema(pa.py_buffer(prepared.dataset_schema))
    assert announced.field("channel").type == pa.utf8()
    # GetSchema plans without charging.
    descriptor = any_pb2.Any()
    descriptor.Pack(pb.CommandPreparedStatementQuery(prepared_statement_handle=prepared.prepared_statement_handle))
    schema = c.client.get_schema(flight.FlightDescriptor.for_command(descriptor.SerializeToString()), c.options).schema
    assert schema.names == ["channel", "users"]
    table = c.fetch(c.info(pb.CommandPreparedStatementQuery(prepared_statement_handle=prepared.prepared_statement_handle)))
    assert table.num_rows == 5 and table.schema.field("channel").type == pa.utf8()
    c.action("ClosePreparedStatement", pb.ActionClosePreparedStatementRequest(prepared_statement_handle=prepared.prepared_statement_handle))
    # A statement planned but cancelled before its fetch is never charged.
    planned = c.info(pb.CommandStatementQuery(query=DP_REACH))
    [cancel] = list(c.client.do_action(flight.Action("CancelFlightInfo", cancel_request(planned)), c.options))
    assert cancel.body.to_pybytes() == CANCELLED
    with pytest.raises(KeyError, match="no such statement"):
        c.fetch(planned)
    budget = c.fetch(c.info(pb.CommandStatementQuery(query="SELECT spent_epsilon FROM system.budget")))
    assert budget.column(0)[0].as_py() == pytest.approx(1.0)


def adbc_connect(server, demo, party, **options):
    return adbc.connect(
        server.uri,
        db_kwargs={"username": party, "password": credentials(demo)[party], **options},
        autocommit=True,
    )


def charge_of(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetch_arrow_table().schema.metadata[b"cleanroom.charge.epsilon"]


BY_DEVICE = "SELECT device, COUNT(*) AS n FROM impressions GROUP BY device"


def test_adbc_session_options(server, demo):
    with adbc_connect(server, demo, "adnetwork") as conn:
        conn.adbc_connection.set_options(**{"adbc.flight.sql.session.option.epsilon": "0.25"})
        options = json.loads(conn.adbc_connection.get_option("adbc.flight.sql.session.options"))
        assert options == {"epsilon": 0.25}
        assert charge_of(conn, BY_DEVICE) == b"0.25"
        with pytest.raises(Exception) as err:
            conn.adbc_connection.set_options(**{"adbc.flight.sql.session.option.epsilonn": "1"})
        assert "epsilonn" in str(err.value)


def test_adbc_connection_headers_fix_the_options(server, demo):
    header = "adbc.flight.sql.rpc.call_header.x-cleanroom-epsilon"
    with adbc_connect(server, demo, "advertiser", **{header: "0.125"}) as conn:
        assert charge_of(conn, BY_DEVICE) == b"0.125"
        # A session setting overrides the connection's.
        with conn.cursor() as cur:
            cur.execute("SET cleanroom.epsilon = 0.5")
        assert charge_of(conn, BY_DEVICE) == b"0.5"
    # A bad header is a clear refusal, not a silent default.
    with adbc_connect(server, demo, "advertiser", **{header: "lots"}) as bad:
        with pytest.raises(Exception) as err:
            charge_of(bad, BY_DEVICE)
        assert "epsilon" in str(err.value) and "not a number" in str(err.value)
