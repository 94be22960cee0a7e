#!/usr/bin/env bash
# Verify benchmark, in one run: `archiver verify` of a repository holding a pgbench backup and
# WAL_GB of WAL, against what checking the same files by hand costs: `zstd -t` (decompress and
# check the frames) followed by `sha256sum` (the stored bytes), each over every stored object.
# Both read the same files; the page cache is dropped before each when run as root.
# Usage: scripts/bench-verify.sh [SCALE] [WAL_GB]   (defaults: 100, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-100}
WAL_GB=${2:-2}
cargo build --release --locked -q
. scripts/bench-cluster.sh
cp target/release/archiver "$W/archiver"
A="$W/archiver"
CI="host=127.0.0.1 port=$PORT user=postgres"
"$A" stream --repo "$W/repo" -d "$CI" >"$W/stream.log" 2>&1 &
SPID=$!
bench_cleanup() { kill "$SPID" 2>/dev/null || true; }
sleep 1
"$A" backup --repo "$W/repo" -d "$CI" --checkpoint fast >/dev/null 2>&1
# WAL: pgbench until WAL_GB of it has been written.
START=$("${PSQL[@]}" -c "select pg_current_wal_lsn()")
while [ "$("${PSQL[@]}" -c "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$START') > $WAL_GB * 1e9")" = f ]; do
    pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T 10 postgres >/dev/null 2>&1
done
LAST=$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
while [ ! -e "$W/repo/wal/00000001/$LAST.zst" ]; do sleep 0.2; done
kill "$SPID"; wait "$SPID" 2>/dev/null || true
FILES=$(find "$W/repo/wal" "$W/repo/backups" -name '*.zst' | wc -l)
BYTES=$(find "$W/repo/wal" "$W/repo/backups" -name '*.zst' -printf '%s\n' | awk '{s+=$1} END {print s}')
echo "pgbench scale $SCALE, ${WAL_GB} GB of WAL: $FILES objects, $((BYTES / 1000000)) MB stored; $(nproc) cores"
drop() { sync; [ "$(id -u)" -eq 0 ] && echo 3 > /proc/sys/vm/drop_caches || true; }
t() { /usr/bin/time -f "%e s wall, %U+%S s CPU, %M kB peak RSS" -o "$W/time" "$@" >"$W/out.log" 2>&1 || { cat "$W/out.log"; exit 1; }; cat "$W/time"; }
byhand() {
    find "$W/repo/wal" "$W/repo/backups" -name '*.zst' -print0 | xargs -0 zstd -q -t
    find "$W/repo/wal" "$W/repo/backups" -name '*.zst' -print0 | xargs -0 sha256sum >/dev/null
}
export -f byhand; export W
echo
drop; echo "archiver verify (--jobs 4):      $(t "$A" verify --repo "$W/repo" --jobs 4)"
drop; echo "zstd -t + sha256sum (one core): $(t bash -c byhand)"
