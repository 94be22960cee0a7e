#!/usr/bin/env bash
# Soak benchmark of `archiver run`: pgbench against a server whose synchronous standby is the
# daemon, backups on a schedule, and a remote tier (moto) behind the fault-injecting proxy of
# the test suite. Afterwards the test checks that no acknowledged WAL is lost, every object of
# every tier verifies, no backup is left running and descriptors stayed flat; it records peak
# RSS outside and during backups, RSS and descriptors early and late, and the faults injected.
#
# Usage: scripts/bench-soak.sh [SECONDS] [BACKUP_CRON] [PGBENCH_SCALE]
#        (defaults: 1800, "0 */5 * * * *" = every 5 minutes, 20)
# Writes target/bench/soak.json. Needs what scripts/test.sh installs (PostgreSQL, moto).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-1800}
EVERY=${2:-"0 */5 * * * *"}
SCALE=${3:-20}
mkdir -p target/bench
export ARCHIVER_TEST_MOTO=${ARCHIVER_TEST_MOTO:-$PWD/target/moto-venv/bin/moto_server}
[ -x "$ARCHIVER_TEST_MOTO" ] || { echo "no moto_server at $ARCHIVER_TEST_MOTO: run scripts/test.sh once" >&2; exit 1; }
ARCHIVER_SOAK_SECS=$SECS ARCHIVER_SOAK_BACKUP_EVERY="$EVERY" ARCHIVER_SOAK_SCALE=$SCALE \
ARCHIVER_SOAK_REPORT=$PWD/target/bench/soak.json \
  cargo test --release --locked --test soak -- --nocapture
echo "--- target/bench/soak.json"
cat target/bench/soak.json
