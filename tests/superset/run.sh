#!/usr/bin/env bash
# Apache Superset 6.1 against a running cleanroom server: install Superset in
# a virtualenv, start it, and run check.py (SQL Lab, a chart, SET, budgets).
# Outside CI: the install downloads several hundred MB.
#
#   tests/superset/run.sh grpc://127.0.0.1:50051 advertiser PASSWORD [demo/truth.json]
set -euo pipefail
server=${1:?usage: run.sh SERVER PARTY PASSWORD [TRUTH]} party=${2:?party} password=${3:?password} truth=${4:-}
here="$(cd "$(dirname "$0")" && pwd)"
home="${SUPERSET_CHECK_HOME:-$HOME/.cache/cleanroom/superset}"
mkdir -p "$home"
if [ ! -x "$home/venv/bin/superset" ]; then
  python3 -m venv "$home/venv"
  # Superset's wheel leaves out some of what it imports (cachetools, rich)
  # and breaks with flask-caching 2.5 (ignore_delete_many_errors).
  "$home/venv/bin/pip" install -q "apache-superset==6.1.0" flightsql-dbapi cachetools rich "flask-caching==2.3.0" requests
fi
cat > "$home/superset_config.py" <<CONFIG
SECRET_KEY = "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
SQLALCHEMY_DATABASE_URI = "sqlite:///$home/superset.db"
WTF_CSRF_ENABLED = False
CONFIG
export SUPERSET_CONFIG_PATH="$home/superset_config.py" SUPERSET_HOME="$home" FLASK_APP=superset
"$home/venv/bin/superset" db upgrade >"$home/init.log" 2>&1
"$home/venv/bin/superset" fab create-admin --username admin --firstname Clean --lastname Room \
  --email admin@example.com --password admin >>"$home/init.log" 2>&1 || true
"$home/venv/bin/superset" init >>"$home/init.log" 2>&1
"$home/venv/bin/superset" run -h 127.0.0.1 -p 8088 --with-threads >"$home/superset.log" 2>&1 &
superset_pid=$!
trap 'kill $superset_pid 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf http://127.0.0.1:8088/health >/dev/null && break; sleep 1; done
"$home/venv/bin/python" "$here/check.py" --superset http://127.0.0.1:8088 --server "$server" \
  --party "$party" --password "$password" ${truth:+--truth "$truth"}
