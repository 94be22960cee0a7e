#!/usr/bin/env bash
# Tiered-storage benchmark against a local S3 API server (moto, from scripts/test.sh's
# virtualenv), in one run on one database:
#  1. upload: `archiver backup` straight into S3 (--repo s3://…, multipart, streamed) and into a
#     tiered repository (--config: hot tier, then shipped; returns once the remote tier holds
#     it), with wall time and peak RSS; the uploader's own throughput for the base archive; and,
#     as the peer, boto3's upload_file (multipart, 10 threads — what `aws s3 cp` does) of the
#     same stored bytes;
#  2. offsite lag under pgbench: every 0.5 s the server's flush LSN is sampled; its lag is the
#     time until the remote tier's durable position (spool/tiers.json) passes it. Reported as
#     p50 / p99 / max for partial_upload_interval $INTERVAL (target p99 ≤ interval + 2 s).
# Usage: [INTERVAL=10s] [PARTS=8] [ROUNDS=3] scripts/bench-tiered.sh [SCALE] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-100}
SECS=${2:-60}
INTERVAL=${INTERVAL:-10s}
ROUNDS=${ROUNDS:-3}
MOTO="$PWD/target/moto-venv/bin/moto_server"
PY="$PWD/target/moto-venv/bin/python"
[ -x "$MOTO" ] || { echo "no moto: run scripts/test.sh once (it installs it)"; exit 1; }
cargo build --release --locked -q
cargo bench --locked -q --bench upload --no-run 2>/dev/null
bench_cleanup() {
    [ -n "${STREAM_PID:-}" ] && kill "$STREAM_PID" 2>/dev/null && wait "$STREAM_PID" 2>/dev/null
    [ -n "${MOTO_PID:-}" ] && kill "$MOTO_PID" 2>/dev/null && wait "$MOTO_PID" 2>/dev/null
    true
}
. scripts/bench-cluster.sh
cp target/release/archiver "$W/archiver"
MPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$MPORT" >"$W/moto.log" 2>&1 &
MOTO_PID=$!
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true
EP="http://127.0.0.1:$MPORT"
export AWS_ENDPOINT_URL="$EP"
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection((\"127.0.0.1\", $MPORT))" 2>/dev/null && break; sleep 0.1; done
"$PY" - "$EP" <<'PY'
import boto3, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
for b in ("direct", "tiered", "peer", "bench-upload"):
    s3.create_bucket(Bucket=b)
PY
DBSIZE=$("${PSQL[@]}" -c "select sum(pg_database_size(oid)) from pg_database")
echo "pgbench scale $SCALE, databases $((DBSIZE / 1000000)) MB, PostgreSQL $("${PSQL[@]}" -c 'show server_version'), $(nproc) cores, moto $("$PY" -c 'import moto; print(moto.__version__)')"
CI="host=127.0.0.1 port=$PORT user=postgres"
cat > "$W/archiver.toml" <<CONF
[hot]
path = "$W/hot"
[upload]
partial_upload_interval = "$INTERVAL"
concurrency = 4
[[remote]]
name = "bench"
url = "s3://tiered/r"
endpoint = "$EP"
part_concurrency = ${PARTS:-8}
CONF

echo
echo "== upload of a base backup"
printf '%-44s %8s %10s %10s\n' "" "wall_s" "stored_MB" "peak_RSS"
timed() { # name command...
    local name=$1; shift
    "${PSQL[@]}" -c checkpoint
    /usr/bin/time -f "%e %M" -o "$W/time" "$@" >"$W/out.log" 2>"$W/err.log" || { cat "$W/err.log"; exit 1; }
    read -r wall rss < "$W/time"
    printf '%-44s %8s %10s %7s MB\n' "$name" "$wall" "${STORED:-}" "$((rss / 1024))"
}
timed "archiver backup --repo DIR (local only)" "$W/archiver" backup --repo "$W/local" -d "$CI" --checkpoint fast
BASE=$(ls "$W"/local/backups/*/base.tar.zst | head -n 1)
STORED=$(( $(stat -c %s "$BASE") / 1000000 ))
for r in $(seq "$ROUNDS"); do
    timed "archiver backup --repo s3:// (multipart)" "$W/archiver" backup --repo s3://direct/r \
        --spool-dir "$W/spool-direct" -d "$CI" --checkpoint fast
    ARCHIVER_LOG=archiver::upload=debug timed "archiver backup --config (hot, then shipped)" \
        "$W/archiver" --log-format json backup --config "$W/archiver.toml" -d "$CI" --checkpoint fast
    # The uploader's own time for the base archive (from its debug event), then the peer on
    # the same bytes.
    "$PY" - "$W/err.log" >> "$W/rates" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("message") == "uploaded" and e.get("key", "").endswith("base.tar.zst"):
        print(f"archiver {e['bytes'] / 1e6 / (e['elapsed_ms'] / 1000):.1f}")
PY
    "$PY" - "$EP" "$BASE" >> "$W/rates" <<'PY'
import boto3, os, sys, time
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
t = time.time()
s3.upload_file(sys.argv[2], "peer", "base.tar.zst", Config=TransferConfig(multipart_chunksize=8 << 20, max_concurrency=10))
print(f"boto3 {os.path.getsize(sys.argv[2]) / 1e6 / (time.time() - t):.1f}")
PY
done
python3 - "$W/rates" "$STORED" "${PARTS:-8}" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    k, v = line.split()
    rates.setdefault(k, []).append(float(v))
a, b = statistics.median(rates["archiver"]), statistics.median(rates["boto3"])
print(f"  upload of base.tar.zst ({sys.argv[2]} MB), median of {len(rates['archiver'])}: "
      f"archiver uploader {a:.0f} MB/s ({sys.argv[3]} parts in flight) vs boto3 upload_file "
      f"{b:.0f} MB/s (10 threads) = {a / b:.2f}x")
print("  per round archiver / boto3:", ", ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(rates["archiver"], rates["boto3"])))
PY
# The uploader alone (benches/upload.rs: nothing else running in the process), same bytes.
ARCHIVER_BENCH_S3="$EP" ARCHIVER_BENCH_OBJECT="$BASE" ROUNDS="$ROUNDS" \
    cargo bench --locked -q --bench upload 2>/dev/null | grep '^uploader' > "$W/alone"
python3 - "$W/alone" "$W/rates" <<'PY'
import statistics, sys
alone = [float(l.split()[1]) for l in open(sys.argv[1])]
peer = [float(l.split()[1]) for l in open(sys.argv[2]) if l.startswith("boto3")]
a, b = statistics.median(alone), statistics.median(peer)
print(f"  the uploader alone (benches/upload.rs), median of {len(alone)}: {a:.0f} MB/s = {a / b:.2f}x boto3"
      f" (rounds: {', '.join(f'{x:.0f}' for x in alone)})")
PY

echo
echo "== offsite lag under pgbench (-c 4, ${SECS}s), partial_upload_interval $INTERVAL"
"$W/archiver" stream --config "$W/archiver.toml" -d "$CI" 2>"$W/stream.log" &
STREAM_PID=$!
for _ in $(seq 100); do grep -q "streaming started" "$W/stream.log" && break; sleep 0.1; done
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -T "$SECS" postgres >"$W/pgbench.log" 2>&1 &
PGB=$!
"$PY" - "$W/hot/spool/tiers.json" "$SECS" "$PORT" "$INTERVAL" <<'PY'
import json, subprocess, sys, time
state, secs, port, interval = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
def lsn(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
def flush():
    out = subprocess.run(["psql", "-X", "-qAt", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                          "-c", "select pg_current_wal_flush_lsn()"], capture_output=True, text=True)
    return lsn(out.stdout.strip())
def durable():
    try:
        d = json.load(open(state))["tiers"][0]["durable"]
        return lsn(d["lsn"]) if d else 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0
samples, lags, t0 = [], [], time.time()
while time.time() - t0 < secs + 30:
    now = time.time()
    if now - t0 < secs:
        samples.append((now, flush()))
    d = durable()
    while samples and samples[0][1] <= d:
        lags.append(now - samples.pop(0)[0])
    if now - t0 >= secs and not samples:
        break
    time.sleep(0.5)
lags.sort()
if not lags:
    sys.exit("no sample reached the remote tier")
p = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]
print(f"  {len(lags)} samples ({len(samples)} never offsite): p50 {p(0.5):.1f} s, p99 {p(0.99):.1f} s, max {lags[-1]:.1f} s")
PY
wait "$PGB"
echo "  pgbench: $(grep -o 'tps = [0-9.]*' "$W/pgbench.log" | head -n 1)"
kill "$STREAM_PID"; wait "$STREAM_PID" || true; STREAM_PID=
