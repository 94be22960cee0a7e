#!/usr/bin/env bash
# Every speed comparison in one run, on one pgbench database, the tools alternating round by
# round: base backup (archiver client/server compression vs pg_basebackup client-zstd vs
# pgBackRest), restore (vs pgBackRest and tar + sync), WAL replay (wal-fetch vs cp), streaming
# next to pgbench (async, --synchronous, synchronous standby; vs pg_receivewal) and upload to a
# local S3 server (vs boto3). Writes target/bench/summary.md and target/bench/summary.json
# (medians, ratios, targets, every round's figures). The driver is scripts/bench_all.py.
#
# Installs pgBackRest from Debian's packages when missing (root). The S3 part needs the moto
# server that scripts/test.sh installs (target/moto-venv); without it that part is skipped.
# Usage: [ROUNDS=3] [SYNC_ROUNDS=5] [STREAM_SECS=15] [LOAD_SECS=30] scripts/bench-all.sh [SCALE]
# Parts: ONLY=backup,restore,replay,stream,upload (default all); MODES=async,sync,standby.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-100}
START=$(date +%s)
if ! command -v pgbackrest >/dev/null; then
    echo "installing pgbackrest (Debian package)"
    SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest >/dev/null \
        || { "${SUDO[@]}" apt-get update -q >/dev/null && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbackrest >/dev/null; }
fi
for tool in pg_receivewal pgbench psql zstd; do
    command -v "$tool" >/dev/null || { echo "bench-all: $tool is missing (apt-get install postgresql zstd)" >&2; exit 1; }
done
cargo build --release --locked -q
UPLOAD_BENCH=""
if [ -x target/moto-venv/bin/moto_server ]; then
    UPLOAD_BENCH=$(cargo bench --locked -q --bench upload --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "upload" and m.get("executable"):
        print(m["executable"])' | tail -n 1)
fi
bench_cleanup() { :; }
echo "setting up the cluster (pgbench scale $SCALE)"
. scripts/bench-cluster.sh
cp target/release/archiver "$W/archiver"
pgbackrest_setup
mkdir -p target/bench
export W PORT BIN SCALE UPLOAD_BENCH START
export AS_USER=""; [ "$(id -u)" -eq 0 ] && AS_USER=postgres
export MOTO="" MOTO_PY=""
if [ -x target/moto-venv/bin/moto_server ]; then
    MOTO=$PWD/target/moto-venv/bin/moto_server MOTO_PY=$PWD/target/moto-venv/bin/python
fi
export OUT=$PWD/target/bench GIT_REV=$(git rev-parse --short HEAD)
python3 scripts/bench_all.py
echo "bench-all: $(( $(date +%s) - START )) s in all; target/bench/summary.md"
