"""Flight SQL over TLS: `cleanroom serve --tls-cert --tls-key` with a
certificate from a test CA, reached by ADBC over grpc+tls:// trusting that CA.
Clients that do not trust the CA, or that speak plain gRPC, get no answer.
Also the operator's Prometheus metrics on their own port."""

import re
import urllib.request

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pytest
import trustme

from conftest import Server, credentials

QUERY = "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1) channel, COUNT(*) AS n FROM impressions GROUP BY channel"


@pytest.fixture
def tls_server(demo, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    for extra in cert.cert_chain_pems[1:]:
        with open(tmp_path / "server.crt", "ab") as f:
            f.write(extra.bytes())
    server = Server(demo, tmp_path / "state", args=[
        "--tls-cert", str(tmp_path / "server.crt"),
        "--tls-key", str(tmp_path / "server.key"),
        "--metrics-listen", "127.0.0.1:0",
    ])
    yield server, ca.cert_pem.bytes().decode()
    server.stop()


def connect(uri, demo, party, root_certs=None):
    db_kwargs = {"username": party, "password": credentials(demo)[party]}
    if root_certs is not None:
        db_kwargs[adbc_driver_flightsql.DatabaseOptions.TLS_ROOT_CERTS.value] = root_certs
    return flightsql.connect(uri, db_kwargs=db_kwargs, autocommit=True)


def test_adbc_over_tls_with_the_test_ca(tls_server, demo):
    server, ca_pem = tls_server
    assert server.uri.startswith("grpc+tls://")
    uri = server.uri.replace("127.0.0.1", "localhost")
    with connect(uri, demo, "adnetwork", ca_pem) as conn:
        with conn.cursor() as cur:
            cur.execute(QUERY)
            table = cur.fetch_arrow_table()
    assert table.num_rows == 5 and table.column_names == ["channel", "n"]

    # A client that does not trust the CA is stopped by the handshake.
    with pytest.raises(adbc_driver_manager.Error) as err:
        with connect(uri, demo, "adnetwork") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
    assert re.search(r"certificate|x509|tls|handshake", str(err.value), re.I), str(err.value)

    # Plain gRPC to the TLS port gets nothing either.
    with pytest.raises(adbc_driver_manager.Error):
        with connect(uri.replace("grpc+tls://", "grpc://"), demo, "adnetwork") as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")


def test_metrics_count_queries_refusals_and_budget(tls_server, demo):
    server, ca_pem = tls_server
    m = re.search(r"metrics on (http://\S+/metrics)", server.banner)
    assert m, server.banner
    metrics_url = m.group(1)
    uri = server.uri.replace("127.0.0.1", "localhost")
    with connect(uri, demo, "adnetwork", ca_pem) as conn:
        with conn.cursor() as cur:
            cur.execute(QUERY)
            cur.fetch_arrow_table()
            with pytest.raises(adbc_driver_manager.Error):
                cur.execute("SELECT uid FROM impressions")
                cur.fetch_arrow_table()
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert 'cleanroom_queries_total{outcome="answered"} 1' in text, text
    assert 'cleanroom_queries_total{outcome="refused"} 1' in text, text
    assert re.search(r'cleanroom_refusals_total\{rule="[a-z_]+"\} 1', text), text
    assert 'cleanroom_budget_epsilon_spent{party="adnetwork"} 1' in text, text
    assert 'cleanroom_budget_epsilon_spent{party="advertiser"} 0' in text, text
    assert "cleanroom_executors 1" in text, text  # the in-process engine: the server itself
    assert "cleanroom_job_duration_seconds_count 1" in text, text
    # No query text, value or row count is ever in the metrics.
    assert "impressions" not in text and "SELECT" not in text
    ready = urllib.request.urlopen(metrics_url.replace("/metrics", "/readyz"), timeout=10)
    assert ready.status == 200
