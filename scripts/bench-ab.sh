#!/usr/bin/env bash
# A/B of archiver builds (or settings) as an asynchronous WAL stream: each round runs every
# build once, in rotated order, next to the same pgbench load, and prints TPS, the WAL the
# server wrote, the stream's CPU seconds (from /proc/PID/stat, until 3 s after pgbench ends,
# so the last segments' compression counts) per GB of that WAL, its peak RSS, and the bytes its
# repository holds afterwards (the stored WAL and its index).
# A "build" is NAME=COMMAND: an archiver binary, or a wrapper that sets an environment.
# Usage: [ROUNDS=3] [SECS=15] [SCALE=50] [UNIX=1] [MODE_ARGS=--synchronous] \
#        scripts/bench-ab.sh old=/path/to/archiver new=target/release/archiver
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SCALE=${SCALE:-50}
[ "$#" -ge 1 ] || { echo "usage: scripts/bench-ab.sh NAME=ARCHIVER ..." >&2; exit 2; }
bench_cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true; }
. scripts/bench-cluster.sh
HOST=127.0.0.1
[ -n "${UNIX:-}" ] && HOST=$W
CONN="host=$HOST port=$PORT user=postgres"
lsn() { "${PSQL[@]}" -c "select pg_current_wal_lsn() - '0/0'"; }
builds=("$@")
n=${#builds[@]}
for r in $(seq 1 "$ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
        spec=${builds[$(((k + r) % n))]}
        name=${spec%%=*} cmd=${spec#*=}
        rm -rf "$W/ab-repo"
        mkdir -m 700 "$W/ab-repo"
        "${PSQL[@]}" -c checkpoint
        $cmd stream --repo "$W/ab-repo" -d "$CONN" --slot ab ${MODE_ARGS:-} > "$W/ab.log" 2>&1 &
        PID=$!
        for _ in $(seq 1 100); do grep -q "streaming started" "$W/ab.log" && break; sleep 0.1; done
        sleep 1
        l0=$(lsn)
        c0=$(awk '{print $14 + $15}' "/proc/$PID/stat")
        tps=$(pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -T "${SECS:-15}" postgres 2>/dev/null \
            | grep -oP 'tps = \K[0-9.]+' | head -1)
        l1=$(lsn)
        sleep 3
        c1=$(awk '{print $14 + $15}' "/proc/$PID/stat")
        hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
        kill -INT "$PID"
        wait "$PID" || true
        PID=""
        "${PSQL[@]}" -c "select pg_drop_replication_slot('ab')" >/dev/null
        stored=$(du -sb --exclude=spool "$W/ab-repo" | cut -f1)
        python3 -c "import sys; r, name, tps, l0, l1, c0, c1, hwm, stored = sys.argv[1:]; gb = (int(l1) - int(l0)) / 1e9; cpu = (int(c1) - int(c0)) / 100
print(f'round {r} {name:12} tps {float(tps):8.1f}  wal_mb {gb * 1000:6.0f}  cpu_s {cpu:5.2f}  cpu_s_per_gb {cpu / gb:6.3f}  peak_rss_mb {int(hwm) / 1024:5.1f}  stored_mb {int(stored) / 1e6:6.1f}')" \
            "$r" "$name" "$tps" "$l0" "$l1" "$c0" "$c1" "$hwm" "$stored"
    done
done
