#!/usr/bin/env bash
# The main job on a local disk: builds archiver, starts a throwaway PostgreSQL (in ./.demo, on
# port 54329, installing PostgreSQL from apt if missing), puts some load on it and streams its WAL
# into ./archive until you press Ctrl-C. Against your own server instead, run:
#   archiver stream --repo ./archive -d 'host=... user=... '
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.demo
PORT=${PORT:-54329}
REPO=${ARCHIVER_REPO:-$ROOT/archive}

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v pgbench >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql postgresql-contrib
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
cargo build --release --locked
AS=()
if [ "$(id -u)" -eq 0 ]; then AS=(runuser -u postgres --); fi

if [ ! -d "$DEMO/data" ]; then
    mkdir -p "$DEMO/data"
    [ "$(id -u)" -eq 0 ] && chown -R postgres "$DEMO" && chmod 755 "$DEMO"
    "${AS[@]}" "$BIN/initdb" -D "$DEMO/data" -A trust -U postgres >/dev/null
    cat >> "$DEMO/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DEMO'
wal_level = replica
max_wal_senders = 5
dynamic_shared_memory_type = mmap
CONF
fi
"${AS[@]}" "$BIN/pg_ctl" -D "$DEMO/data" -l "$DEMO/log" -w start >/dev/null
trap '"${AS[@]}" "$BIN/pg_ctl" -D "$DEMO/data" -m fast stop >/dev/null; kill ${LOAD:-} 2>/dev/null || true' EXIT
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -i -s 5 -q postgres >/dev/null 2>&1
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -T 3600 -R 200 postgres >/dev/null 2>&1 &
LOAD=$!
echo "streaming WAL of the demo cluster (port $PORT) into $REPO; Ctrl-C to stop"
./target/release/archiver stream --repo "$REPO" -d "host=127.0.0.1 port=$PORT user=postgres" || true
echo "archive: $(find "$REPO/wal" -name '*.zst' | wc -l) objects in $REPO/wal"
