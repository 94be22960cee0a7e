#!/usr/bin/env bash
# The WAL index's cost on the receive path: the same WAL (pgbench for SECONDS, kept by one
# slot per run made before the load) streamed by `archiver stream` with the index on and with
# --no-index, alternating, ROUNDS times; reports CPU seconds per GB of WAL for each and the
# ratio of the medians. Also: what the index stores per segment.
# Usage: [ROUNDS=3] scripts/bench-index.sh [SECONDS] [SCALE]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-30}
SCALE=${2:-20}
ROUNDS=${ROUNDS:-3}
cargo build --release --locked -q
ARCHIVER=$PWD/target/release/archiver
bench_cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true; }
. scripts/bench-cluster.sh
for R in $(seq "$ROUNDS"); do
    for mode in on off; do
        "${PSQL[@]}" -c "select pg_create_physical_replication_slot('s_${mode}_$R', true)" >/dev/null
    done
done
START=$("${PSQL[@]}" -c "select pg_current_wal_lsn()")
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -T "$DUR" postgres >/dev/null 2>&1
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
END=$("${PSQL[@]}" -c "select pg_current_wal_lsn()")
LASTSEG=$("${PSQL[@]}" -c "select pg_walfile_name(pg_lsn '$END' - 1)")
BYTES=$("${PSQL[@]}" -c "select pg_lsn '$END' - min(restart_lsn) from pg_replication_slots")
echo "PostgreSQL $("${PSQL[@]}" -c 'show server_version'), pgbench scale $SCALE for ${DUR}s: $((BYTES / 1000000)) MB of WAL from $START to $END, streamed $ROUNDS times each way"
printf '%-8s %6s %10s %10s %10s\n' "index" "round" "seconds" "CPU_s" "CPU_s/GB"
: >"$W/results"
for R in $(seq "$ROUNDS"); do
    for mode in on off; do
        extra=()
        [ "$mode" = off ] && extra=(--no-index)
        repo="$W/repo-$mode-$R"
        t0=$(date +%s.%N)
        "$ARCHIVER" stream --repo "$repo" -d "host=127.0.0.1 port=$PORT user=postgres" \
            --slot "s_${mode}_$R" "${extra[@]}" >"$W/stream.log" 2>&1 &
        PID=$!
        until [ -e "$repo/wal/00000001/$LASTSEG.zst" ]; do
            if ! kill -0 "$PID" 2>/dev/null; then cat "$W/stream.log" >&2; exit 1; fi
            sleep 0.05
        done
        t1=$(date +%s.%N)
        cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/hz}' "/proc/$PID/stat")
        kill -INT "$PID"; wait "$PID" || true; PID=""
        per=$(echo "$cpu $BYTES" | awk '{printf "%.2f", $1 / ($2 / 1e9)}')
        printf '%-8s %6s %10.2f %10s %10s\n' "$mode" "$R" "$(echo "$t1 - $t0" | bc)" "$cpu" "$per"
        echo "$mode $per" >>"$W/results"
    done
done
med() { grep "^$1 " "$W/results" | cut -d' ' -f2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ON=$(med on); OFF=$(med off)
echo "median CPU s/GB: index on $ON, off $OFF: on/off = $(echo "$ON $OFF" | awk '{printf "%.3f", $1/$2}')"
repo="$W/repo-on-1"
n=$(ls "$repo"/index/00000001/*.zst | grep -vc points || true)
ix=$(cat "$repo"/index/00000001/*.zst | wc -c)
wal=$(cat "$repo"/wal/00000001/*.zst | wc -c)
echo "index: $n segments, $((ix / n)) bytes stored per segment on average ($(echo "$ix $wal" | awk '{printf "%.2f", 100*$1/$2}')% of the stored WAL)"
