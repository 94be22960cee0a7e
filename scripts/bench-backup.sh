#!/usr/bin/env bash
# Side-by-side base backup benchmark on one database, in one run: `archiver backup` (client zstd
# on all cores, and with --server-compress), `pg_basebackup -Ft -X none --compress=client-zstd`
# and pgBackRest (compress-type=zst, process-max=2). All at zstd level 3 (archiver's default is 1:
# scripts/bench-all.sh compares the defaults), checkpoint fast.
# Reports wall time, stored bytes and peak RSS of each; ROUNDS=n repeats the set (alternating).
# Usage: [ROUNDS=1] scripts/bench-backup.sh [SCALE]
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
ROUNDS=${ROUNDS:-1}
cargo build --release --locked -q
. scripts/bench-cluster.sh
cp target/release/archiver "$W/archiver"
"${PSQL[@]}" -c checkpoint
DBSIZE=$("${PSQL[@]}" -c "select sum(pg_database_size(oid)) from pg_database")
echo "pgbench scale $SCALE, databases $((DBSIZE / 1000000)) MB, PostgreSQL $("${PSQL[@]}" -c 'show server_version'), $(nproc) cores"

pgbackrest_setup

printf '%-34s %9s %12s %10s\n' "tool" "wall_s" "stored_MB" "peak_RSS"
run() { # name outdir command...  (outdir: where the tool stores; its growth is the stored size)
    local name=$1 out=$2; shift 2
    mkdir -p "$out"; [ "$(id -u)" -eq 0 ] && chown postgres "$out"
    local before
    before=$(du -sb "$out" | cut -f1)
    "${PSQL[@]}" -c checkpoint
    sync
    /usr/bin/time -f "%e %M" -o "$W/time" "$@" >"$W/out.log" 2>&1 || { cat "$W/out.log"; exit 1; }
    read -r wall rss < "$W/time"
    local size
    size=$(( $(du -sb "$out" | cut -f1) - before ))
    printf '%-34s %9s %12s %7s MB\n' "$name" "$wall" "$((size / 1000000))" "$((rss / 1024))"
    echo "$name|$wall" >> "$W/walls"
}
CI="host=127.0.0.1 port=$PORT user=postgres"
for r in $(seq "$ROUNDS"); do
    # archiver fetches the backup's WAL itself here (no streamer): a few MB more than the others.
    run "archiver backup" "$W/repo" "$W/archiver" backup --repo "$W/repo" -d "$CI" \
        --checkpoint fast --compress 3
    run "archiver backup --server-compress" "$W/repo" "$W/archiver" backup --repo "$W/repo" \
        -d "$CI" --checkpoint fast --server-compress --compress 3
    rm -rf "$W/pgbb"
    run "pg_basebackup client-zstd" "$W/pgbb" "${AS[@]}" "$BIN/pg_basebackup" -h 127.0.0.1 \
        -p "$PORT" -U postgres -Ft -X none --compress=client-zstd -c fast -D "$W/pgbb/b"
    run "pgbackrest zst process-max=2" "$W/pgbr" "${PGBR[@]}" backup --type=full
done
echo
echo "median wall time over $ROUNDS round(s):"
python3 - "$W/walls" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, wall = line.rstrip("\n").split("|")
    runs.setdefault(name, []).append(float(wall))
base = statistics.median(runs["pg_basebackup client-zstd"])
for name, walls in runs.items():
    m = statistics.median(walls)
    print(f"  {name:<34} {m:6.2f} s  ({m / base:.2f}x pg_basebackup)")
PY
