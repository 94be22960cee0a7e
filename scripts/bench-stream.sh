#!/usr/bin/env bash
# Side-by-side WAL streaming benchmark: the same pgbench load with nothing attached, with
# `pg_receivewal --synchronous` and with `archiver stream --synchronous`, each also as the
# synchronous standby (RPO 0). Reports TPS, pg_stat_replication.flush_lag (median / max, sampled
# every 0.2 s) and the client's peak RSS and CPU seconds. ROUNDS=n repeats the set, alternating
# and ends with the median TPS of each configuration.
# Usage: [ROUNDS=3] scripts/bench-stream.sh [SECONDS] [SCALE]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-20}
SCALE=${2:-20}
CLIENTS=${CLIENTS:-4}
ROUNDS=${ROUNDS:-1}
cargo build --release --locked -q
ARCHIVER=$PWD/target/release/archiver
bench_cleanup() { [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true; }
. scripts/bench-cluster.sh
echo "pgbench scale $SCALE, $CLIENTS clients, ${DUR}s per run, PostgreSQL $("${PSQL[@]}" -c 'show server_version')"
printf '%-42s %8s %14s %14s %10s %8s\n' "attached" "TPS" "flush_lag_med" "flush_lag_max" "peak_RSS" "CPU_s"

run() { # name sync_name command...
    local name=$1 sync=$2; shift 2
    # ONLY=pattern restricts the set to matching configurations.
    if [ -n "${ONLY:-}" ] && [[ "$name" != *"$ONLY"* ]]; then return; fi
    "${PSQL[@]}" -c "alter system set synchronous_standby_names = '$sync'" -c "select pg_reload_conf()" >/dev/null
    # A checkpoint first, so a new slot's restart_lsn is recent and every client starts without
    # a backlog: the runs measure steady-state streaming.
    "${PSQL[@]}" -c "checkpoint" >/dev/null
    PID=""
    if [ "$#" -gt 0 ]; then
        "$@" >"$W/client.log" 2>&1 &
        PID=$!
        local ok=""
        for _ in $(seq 100); do
            [ "$("${PSQL[@]}" -c 'select count(*) from pg_stat_replication')" = 1 ] && ok=1 && break
            sleep 0.1
        done
        if [ -z "$ok" ]; then
            echo "$name: the client did not connect:" >&2
            cat "$W/client.log" >&2
            exit 1
        fi
    fi
    ( while sleep 0.2; do
        "${PSQL[@]}" -c "select coalesce(extract(epoch from flush_lag)*1000, 0) from pg_stat_replication" 2>/dev/null || true
      done ) >"$W/lag" &
    local SAMPLER=$!
    local tps
    tps=$(pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -T "$DUR" postgres 2>/dev/null | awk '/^tps/ {print int($3); exit}')
    kill "$SAMPLER" 2>/dev/null || true
    local rss="-" cpu="-"
    if [ -n "$PID" ]; then
        rss=$(awk '/VmHWM/ {printf "%dMB", $2/1024}' "/proc/$PID/status" 2>/dev/null || echo "-")
        cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14+$15)/hz}' "/proc/$PID/stat" 2>/dev/null || echo "-")
        kill -INT "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
        PID=""
    fi
    local med max
    med=$(sort -n "$W/lag" | awk '{a[NR]=$1} END {if (NR) printf "%.2f ms", a[int((NR+1)/2)]; else print "-"}')
    max=$(sort -n "$W/lag" | awk '{m=$1} END {if (NR) printf "%.2f ms", m; else print "-"}')
    printf '%-42s %8s %14s %14s %10s %8s\n' "$name" "$tps" "$med" "$max" "$rss" "$cpu"
    echo "$name|$tps" >>"$W/results"
    "${PSQL[@]}" -c "select pg_drop_replication_slot(slot_name) from pg_replication_slots where not active" >/dev/null
}

round() {
    run "none" ""
    receivewal_slot() { mkdir -p "$W/$1"; "${PSQL[@]}" -c "select pg_create_physical_replication_slot('${1//-/_}', true)" >/dev/null; }
    receivewal_slot rw1-$R
    run "pg_receivewal --synchronous" "" pg_receivewal -h 127.0.0.1 -p "$PORT" -U postgres -D "$W/rw1-$R" --synchronous --slot "rw1_$R" -n
    run "archiver --synchronous" "" "$ARCHIVER" stream --repo "$W/a1-$R" -d "host=127.0.0.1 port=$PORT user=postgres" --synchronous --slot "a1_$R"
    receivewal_slot rw2-$R
    run "pg_receivewal --synchronous, sync standby" "pg_receivewal" pg_receivewal -h 127.0.0.1 -p "$PORT" -U postgres -D "$W/rw2-$R" --synchronous --slot "rw2_$R" -n
    run "archiver --synchronous, sync standby" "archiver" "$ARCHIVER" stream --repo "$W/a2-$R" -d "host=127.0.0.1 port=$PORT user=postgres" --synchronous --slot "a2_$R"
}
for R in $(seq "$ROUNDS"); do
    echo "-- round $R"
    round
done
if [ "$ROUNDS" -gt 1 ]; then
    echo "-- median TPS over $ROUNDS rounds"
    for name in $(cut -d'|' -f1 "$W/results" | awk '!seen[$0]++' | tr ' ' '~'); do
        n=${name//\~/ }
        med=$(grep -F "$n|" "$W/results" | cut -d'|' -f2 | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
        printf '%-42s %8s\n' "$n" "$med"
    done
fi
