# Sourced by the bench-*.sh scripts: a throwaway PostgreSQL cluster tuned for benchmarks, started
# on a free port in a new directory $W (removed on exit with the cluster), with pgbench data at
# scale $SCALE. Sets BIN, W, AS (run-as-postgres prefix when root), PORT and PSQL. A script may
# define bench_cleanup (called first on exit) to stop its own processes.
# BENCH_PG_BIN: other server binaries; BENCH_PG_CONF: extra postgresql.conf lines.
BIN=${BENCH_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
W=$(mktemp -d /tmp/archiver-bench-XXXXXX)
chmod 755 "$W"
AS=()
if [ "$(id -u)" -eq 0 ]; then AS=(runuser -u postgres --); chown postgres "$W"; fi
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${AS[@]}" "$BIN/initdb" -D "$W/data" -A trust -U postgres >/dev/null
cat >> "$W/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$W'
shared_buffers = '256MB'
max_wal_size = '4GB'
wal_level = replica
max_wal_senders = 5
dynamic_shared_memory_type = mmap
${BENCH_PG_CONF:-}
CONF
cleanup() {
    declare -F bench_cleanup >/dev/null && bench_cleanup
    "${AS[@]}" "$BIN/pg_ctl" -D "$W/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$W"
}
trap cleanup EXIT
"${AS[@]}" "$BIN/pg_ctl" -D "$W/data" -l "$W/log" -w start >/dev/null
PSQL=(psql -X -qAt -h 127.0.0.1 -p "$PORT" -U postgres -d postgres)
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1

# pgBackRest for the same cluster: repository $W/pgbr, zstd level 3, process-max 2, no archive
# check (archiver's bench compares backups, not archiving). Sets PGBR (the command, as postgres).
pgbackrest_setup() {
    mkdir -p "$W/pgbr" "$W/pgbrlog" "$W/pgbrlock"
    [ "$(id -u)" -eq 0 ] && chown postgres "$W/pgbr" "$W/pgbrlog" "$W/pgbrlock"
    cat > "$W/pgbackrest.conf" <<CONF
[global]
repo1-path=$W/pgbr
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-check=n
log-level-console=warn
log-level-file=off
log-path=$W/pgbrlog
lock-path=$W/pgbrlock
[bench]
pg1-path=$W/data
pg1-port=$PORT
pg1-socket-path=$W
pg1-user=postgres
CONF
    PGBR=("${AS[@]}" pgbackrest --config="$W/pgbackrest.conf" --stanza=bench)
    "${PGBR[@]}" stanza-create >/dev/null
}
