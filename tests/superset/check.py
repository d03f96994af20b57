"""Superset against a running cleanroom server, through Superset's own REST
API: register the clean room as a database (the flightsql-dbapi SQLAlchemy
dialect, DP options in the connection string), run DP queries in SQL Lab
(hint comment, SET), build a chart on a dataset as the chart builder does,
and read the budget back to show what each step cost.

    python3 tests/superset/check.py --superset http://127.0.0.1:8088 \\
        --server grpc://127.0.0.1:50051 --party advertiser --password PW

Run outside CI (Superset's install takes minutes): see the README's
"Connect a BI tool". Exits non-zero when a check fails.
"""

import argparse
import json
import random
import sys
import urllib.parse

import requests


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--superset", default="http://127.0.0.1:8088")
    p.add_argument("--user", default="admin")
    p.add_argument("--superset-password", default="admin")
    p.add_argument("--server", default="grpc://127.0.0.1:50051")
    p.add_argument("--party", default="advertiser")
    p.add_argument("--password", required=True)
    p.add_argument("--truth", help="truth.json of the generated demo, to compare people per channel")
    args = p.parse_args()

    s = requests.Session()
    base = args.superset.rstrip("/")

    def call(method, path, **kw):
        r = s.request(method, base + path, timeout=120, **kw)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path}: HTTP {r.status_code}: {r.text[:2000]}")
        return r.json()

    token = call("POST", "/api/v1/security/login", json={"username": args.user, "password": args.superset_password, "provider": "db", "refresh": True})["access_token"]
    s.headers["Authorization"] = f"Bearer {token}"
    s.headers["X-CSRFToken"] = call("GET", "/api/v1/security/csrf_token/")["result"]
    s.headers["Referer"] = base

    # Fresh epsilons each run: a question already released to the party is
    # answered again for free, which a second run would otherwise measure.
    hint_epsilon, chart_epsilon = round(random.uniform(0.2, 0.3), 4), round(random.uniform(0.4, 0.6), 4)
    host_port = urllib.parse.urlparse(args.server.replace("grpc://", "http://")).netloc
    uri = (
        f"datafusion://{args.party}:{urllib.parse.quote(args.password, safe='')}@{host_port}"
        f"?insecure=true&x-cleanroom-epsilon={chart_epsilon}"
    )
    existing = call("GET", "/api/v1/database/?q=" + urllib.parse.quote(json.dumps({"filters": [{"col": "database_name", "opr": "eq", "value": "cleanroom"}]})))
    for db in existing["result"]:
        # A previous run's datasets go first (a database with datasets stays).
        datasets = call("GET", "/api/v1/dataset/?q=" + urllib.parse.quote(json.dumps({"filters": [{"col": "database", "opr": "rel_o_m", "value": db["id"]}]})))
        for ds in datasets["result"]:
            call("DELETE", f"/api/v1/dataset/{ds['id']}")
        call("DELETE", f"/api/v1/database/{db['id']}")
    db_id = call("POST", "/api/v1/database/", json={"database_name": "cleanroom", "sqlalchemy_uri": uri, "expose_in_sqllab": True})["id"]
    print(f"registered database {db_id}: {uri.replace(urllib.parse.quote(args.password, safe=''), '***')}")

    failures = []

    def check(what, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")
        if not ok:
            failures.append(what)

    def sql_lab(sql):
        r = call("POST", "/api/v1/sqllab/execute/", json={"database_id": db_id, "sql": sql, "runAsync": False, "tab": "check", "queryLimit": 1000})
        return r.get("data", []), r.get("query", {}).get("executedSql", sql)

    def spent():
        rows, _ = sql_lab("SELECT spent_epsilon FROM system.budget")
        return float(rows[0]["spent_epsilon"])

    start = spent()
    print(f"budget spent before: {start}")

    # 1. SQL Lab with a hint comment (Superset parses the SQL before it sends it).
    hinted = (
        f"SELECT /*+ DIFFERENTIAL_PRIVACY(epsilon = {hint_epsilon}, max_groups_contributed = 5, confidence_intervals = true) */ "
        "channel, COUNT(DISTINCT uid) AS users FROM impressions GROUP BY channel ORDER BY channel"
    )
    rows, executed = sql_lab(hinted)
    print(f"SQL Lab sent: {executed}")
    for r in rows:
        print(f"    {r}")
    check("SQL Lab DP query with a hint comment: five channels with intervals", len(rows) == 5 and all("users_ci_low" in r for r in rows))
    after_hint = spent()
    check(f"it cost its epsilon ({hint_epsilon}) once, with SQL Lab's own LIMIT around it", abs(after_hint - start - hint_epsilon) < 1e-9, f"spent {after_hint - start}")
    if args.truth:
        truth = {t["channel"]: t["users"] for t in json.load(open(args.truth))["queries"]["Q4_reach_frequency"]}
        inside = sum(r["users_ci_low"] <= truth[r["channel"]] <= r["users_ci_high"] for r in rows)
        check("the true people per channel lie in the announced 95 % intervals", inside >= 4, f"{inside}/5 inside")

    # 2. The same question again (SQL Lab re-runs a tab): free, same numbers.
    again, _ = sql_lab(hinted)
    check("re-running it is free and gives the same answer", again == rows and abs(spent() - after_hint) < 1e-9)

    # 3. A dataset and a chart, as the chart builder makes them: plain SQL, the
    #    connection string's epsilon, the manifest's groups per person.
    existing = call("GET", "/api/v1/dataset/?q=" + urllib.parse.quote(json.dumps({"filters": [{"col": "table_name", "opr": "eq", "value": "impressions"}]})))
    for ds in existing["result"]:
        call("DELETE", f"/api/v1/dataset/{ds['id']}")
    ds = call("POST", "/api/v1/dataset/", json={"database": db_id, "table_name": "impressions"})
    ds_id = ds["id"]
    columns = [c["column_name"] for c in call("GET", f"/api/v1/dataset/{ds_id}")["result"]["columns"]]
    check("the dataset's columns were reflected", "channel" in columns and "uid" in columns, ", ".join(columns))
    before_chart = spent()
    query_context = {
        "datasource": {"id": ds_id, "type": "table"},
        "force": False,
        "queries": [{
            "columns": ["channel"],
            "metrics": [{"expressionType": "SQL", "sqlExpression": "COUNT(DISTINCT uid)", "label": "users"}],
            "orderby": [[{"expressionType": "SQL", "sqlExpression": "COUNT(DISTINCT uid)", "label": "users"}, False]],
            "row_limit": 10000,
        }],
        "result_format": "json",
        "result_type": "full",
    }
    chart = call("POST", "/api/v1/chart/data", json=query_context)["result"][0]
    print(f"chart builder sent: {chart.get('query')}")
    for r in chart["data"]:
        print(f"    {r}")
    check("the bar chart's query answers five channels", len(chart["data"]) == 5)
    cost = spent() - before_chart
    check(f"it cost the connection's epsilon ({chart_epsilon})", abs(cost - chart_epsilon) < 1e-9, f"spent {cost}")
    if args.truth:
        total = sum(r["users"] for r in chart["data"])
        true_total = sum(truth.values())
        check("people per channel are not biased low (sum within 10 % of the truth)", abs(total - true_total) <= 0.1 * true_total, f"{total} vs {true_total}")

    # A filter on the grouped column: only that key comes back.
    query_context["queries"][0]["filters"] = [{"col": "channel", "op": "==", "val": "email"}]
    filtered = call("POST", "/api/v1/chart/data", json=query_context)["result"][0]
    check("a chart filtered to one channel answers that channel only", [r["channel"] for r in filtered["data"]] == ["email"], str(filtered["data"]))

    # A time-grain query: weeks of a day-range column are public keys.
    weeks, _ = sql_lab("SELECT DATE_TRUNC('week', ts) AS week, COUNT(*) AS impressions FROM impressions GROUP BY DATE_TRUNC('week', ts) ORDER BY week")
    check("impressions per week: every week of the campaign", len(weeks) >= 13, f"{len(weeks)} weeks, first {weeks[:1]}")

    # 4. SET in SQL Lab, then a query on the same connection.
    rows, _ = sql_lab("SET cleanroom.epsilon = 0.125")
    check("SET answers with an empty result", rows == [])

    print(f"budget spent after: {spent()}")
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all Superset checks passed")


if __name__ == "__main__":
    main()
