#!/usr/bin/env bash
# Restore benchmark on one database, in one run.
# 1. Extraction: `archiver restore` (parallel verified extraction) vs `pgbackrest restore`
#    (process-max=2) vs `tar -I zstd -xf` of a `pg_basebackup -Ft --compress=client-zstd` backup.
# 2. Replay: the same backup recovered through `archiver wal-fetch` (with prefetch) vs `cp` from
#    already-uncompressed local WAL, timed from `pg_ctl start` to promotion.
# Usage: scripts/bench-restore.sh [SCALE] [PGBENCH_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
LOAD=${2:-30}
cargo build --release --locked -q
. scripts/bench-cluster.sh
cp target/release/archiver "$W/archiver"
A="$W/archiver"
CI="host=127.0.0.1 port=$PORT user=postgres"
OWNER=(); [ "$(id -u)" -eq 0 ] && OWNER=(--owner postgres)
DBSIZE=$("${PSQL[@]}" -c "select sum(pg_database_size(oid)) from pg_database")
echo "pgbench scale $SCALE ($((DBSIZE / 1000000)) MB), then ${LOAD}s of pgbench for the WAL to replay; $(nproc) cores"

# The archive: a streamer, one backup by each tool, then load.
"$A" stream --repo "$W/repo" -d "$CI" >"$W/stream.log" 2>&1 &
SPID=$!
bench_cleanup() { kill "$SPID" 2>/dev/null || true; }
sleep 1
"$A" backup --repo "$W/repo" -d "$CI" --checkpoint fast >/dev/null 2>&1
mkdir -p "$W/pgbb"
[ "$(id -u)" -eq 0 ] && chown postgres "$W/pgbb"
pgbackrest_setup
"${PGBR[@]}" backup --type=full >/dev/null 2>&1
"${AS[@]}" "$BIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -Ft -X none \
    --compress=client-zstd -c fast -D "$W/pgbb/b" 2>/dev/null
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T "$LOAD" postgres >/dev/null 2>&1
LAST=$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
while [ ! -e "$W/repo/wal/00000001/$LAST.zst" ]; do sleep 0.2; done
kill "$SPID"; wait "$SPID" 2>/dev/null || true
SEGS=$(ls "$W/repo/wal/00000001" | grep -c '\.zst$')

t() { /usr/bin/time -f "%e %M" -o "$W/time" "$@" >"$W/out.log" 2>&1 || { cat "$W/out.log"; exit 1; }; cat "$W/time"; }
echo
echo "extraction (wall s, peak RSS kB):"
sync; echo "  archiver restore:                $(t "$A" restore --repo "$W/repo" --pgdata "$W/r-archiver" "${OWNER[@]}" --target-immediate)"
mkdir -p "$W/r-pgbr"; [ "$(id -u)" -eq 0 ] && chown postgres "$W/r-pgbr"
sync; echo "  pgbackrest restore process-max=2: $(t "${PGBR[@]}" restore --pg1-path="$W/r-pgbr")"
mkdir -p "$W/r-tar"
sync; echo "  tar -I zstd -xf (pg_basebackup):  $(t tar -I zstd -xf "$W/pgbb/b/base.tar.zst" -C "$W/r-tar")"
rm -rf "$W/r-pgbr" "$W/r-tar" "$W/r-archiver"

# Replay: the same backup and WAL, two restore_commands.
replay() { # name restore_command
    local d="$W/replay-$1"
    "$A" restore --repo "$W/repo" --pgdata "$d" "${OWNER[@]}" >/dev/null 2>&1
    sed -i "s|^restore_command = .*|restore_command = '$2'|" "$d/postgresql.auto.conf"
    printf "port = %s\nlisten_addresses = ''\nunix_socket_directories = '%s'\n" "$((PORT + 1))" "$W" >> "$d/postgresql.auto.conf"
    local s=$(date +%s.%N)
    "${AS[@]}" "$BIN/pg_ctl" -D "$d" -l "$W/replay-$1.log" start >/dev/null
    until [ "$(psql -X -qAt -h "$W" -p $((PORT + 1)) -U postgres -d postgres -c 'select pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.05; done
    local e=$(date +%s.%N)
    "${AS[@]}" "$BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null
    rm -rf "$d"
    echo "$e - $s" | bc
}
mkdir -p "$W/plainwal"
for f in "$W"/repo/wal/00000001/*.zst; do zstd -q -d < "$f" > "$W/plainwal/$(basename "${f%.zst}")"; done
chmod -R a+rX "$W/plainwal" "$W/repo"
echo
echo "replay of $SEGS archived segments (s from pg_ctl start to promotion):"
echo "  archiver wal-fetch (prefetch 8): $(replay fetch "$A wal-fetch --repo $W/repo %f %p")"
echo "  cp from uncompressed local WAL:  $(replay cp "cp $W/plainwal/%f %p")"
