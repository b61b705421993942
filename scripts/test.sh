#!/usr/bin/env bash
# The one test command: installs what is missing, builds, starts two shared PostgreSQL clusters
# (source and target) for the end-to-end tests, runs every test with nextest, stops the clusters.
# Extra arguments go to `cargo nextest run` (e.g. a test filter).
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN="${SCHEMASHIFT_PG_BIN:-/usr/lib/postgresql/15/bin}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- tools -------------------------------------------------------------------------------
if [ ! -x "$PG_BIN/postgres" ]; then
  echo "test.sh: installing postgresql" >&2
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y postgresql postgresql-contrib
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "test.sh: installing cargo-nextest" >&2
  cargo install cargo-nextest --locked
fi

# --- tansu broker (Kafka change log) ------------------------------------------------------
# The Kafka tests start their own tansu brokers (each test pauses or loses its own); this
# only makes sure the binary is there. About 11 minutes to build once.
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "test.sh: installing tansu (Kafka-protocol broker for the tests; builds once)" >&2
  cargo install tansu --locked --features dynostore
fi

cargo build --workspace --all-targets

# --- shared test clusters -----------------------------------------------------------------
# Same settings as schemashift_common::cluster::Cluster.
CLUSTER_DIRS=()

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cleanup() {
  local dir
  for dir in "${CLUSTER_DIRS[@]}"; do
    if [ -f "$dir/data/postmaster.pid" ]; then
      (cd "$dir" && as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1) || true
    fi
    rm -rf "$dir"
  done
}
trap cleanup EXIT

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_cluster NAME: sets STARTED_BASE to the cluster's base DSN (no database). Runs in this
# shell (not a command substitution) so CLUSTER_DIRS reaches the cleanup trap.
start_cluster() {
  local name="$1" dir port attempt
  dir="$(mktemp -d "${TMPDIR:-/tmp}/schemashift-test-$name.XXXXXX")"
  CLUSTER_DIRS+=("$dir")
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$dir"; fi
  # The postgres user may not be able to read the caller's working directory.
  cd "$dir"
  if ! as_pg "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --locale=C.UTF-8 \
      --no-sync >"$dir/initdb.log" 2>&1; then
    rm -rf "$dir/data"
    as_pg "$PG_BIN/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-locale \
      --no-sync >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  fi
  cat >>"$dir/data/postgresql.conf" <<EOF

# added by scripts/test.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = 'logical'
max_replication_slots = 64
max_wal_senders = 16
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = '256MB'
max_wal_size = '4GB'
include = 'schemashift_port.conf'
EOF
  # The tests' role by password (postgres_fdw needs one for a non-superuser), the fixture's
  # superuser by trust: the same lines as tests/src/lib.rs TEST_HBA.
  cat >"$dir/data/pg_hba.conf" <<EOF
local all all trust
host all schemashift_test 127.0.0.1/32 md5
host replication schemashift_test 127.0.0.1/32 md5
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
EOF
  for attempt in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 20000))
    if port_in_use "$port"; then continue; fi
    echo "port = $port" >"$dir/data/schemashift_port.conf"
    if as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 120 start >/dev/null; then
      cd - >/dev/null
      STARTED_BASE="postgres://postgres@127.0.0.1:$port"
      return 0
    fi
    echo "test.sh: $name cluster did not start on port $port (attempt $attempt)" >&2
  done
  tail -n 30 "$dir/postgres.log" >&2 || true
  cd - >/dev/null
  return 1
}

STARTED_BASE=""
start_cluster source
SOURCE_BASE="$STARTED_BASE"
start_cluster target
TARGET_BASE="$STARTED_BASE"
export SCHEMASHIFT_TEST_SOURCE="$SOURCE_BASE"
export SCHEMASHIFT_TEST_TARGET="$TARGET_BASE"
echo "test.sh: source cluster $SOURCE_BASE, target cluster $TARGET_BASE" >&2

cargo nextest run --workspace --no-fail-fast "$@"
