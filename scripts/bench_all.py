#!/usr/bin/env python3
"""The driver of scripts/bench-all.sh (which builds, installs pgBackRest and starts the cluster,
then runs this with W, PORT, BIN, SCALE, AS_USER, MOTO, MOTO_PY, UPLOAD_BENCH, OUT in the
environment). Every tool is measured in the same run on the same database, alternating round by
round; each figure is a median over the rounds. Wall time, CPU seconds and peak RSS of a command
come from wait4(2) (the command and the children it waited for)."""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

W = os.environ["W"]
PORT = os.environ["PORT"]
BIN = os.environ["BIN"]
SCALE = int(os.environ["SCALE"])
AS_USER = os.environ.get("AS_USER", "")
OUT = os.environ["OUT"]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SYNC_ROUNDS = max(ROUNDS, int(os.environ.get("SYNC_ROUNDS", "5")))
STREAM_SECS = int(os.environ.get("STREAM_SECS", "15"))
LOAD_SECS = int(os.environ.get("LOAD_SECS", "30"))
CLIENTS = 4
A = os.path.join(W, "archiver")
CI = f"host=127.0.0.1 port={PORT} user=postgres"
OWNER = ["--owner", "postgres"] if AS_USER else []
HZ = os.sysconf("SC_CLK_TCK")

results = {}  # work -> tool -> list of per-round dicts
stages = {}  # run name -> archiver stage totals
work_stages = {}  # "archiver backup, round 1" -> the backup's or restore's stage totals


def text_fields(path, message):
    """The numeric fields of the last text-format log line carrying `message`."""
    found = None
    for line in open(path, errors="replace"):
        if f" {message} " in line:
            found = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)\b", line)}
    return found
started = time.time()


def log(msg):
    print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)


def as_pg(cmd):
    return ["runuser", "-u", AS_USER, "--"] + cmd if AS_USER else cmd


def chown_pg(path):
    if AS_USER:
        shutil.chown(path, AS_USER)


def psql_cmd(port=PORT, host="127.0.0.1"):
    return ["psql", "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(port), "-U", "postgres",
            "-d", "postgres"]


def psql(sql, port=PORT, host="127.0.0.1"):
    return subprocess.run(psql_cmd(port, host) + ["-c", sql], capture_output=True, text=True,
                          check=True).stdout.strip()


def lsn(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def du(path):
    if not os.path.exists(path):
        return 0
    return int(subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout.split()[0])


def run(cmd, logname, env=None):
    """Runs cmd to completion; returns wall s, CPU s and peak RSS MB (wait4 rusage)."""
    with open(os.path.join(W, logname), "wb") as out:
        t = time.monotonic()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stdout.write(open(os.path.join(W, logname), errors="replace").read()[-4000:])
        raise SystemExit(f"{' '.join(cmd)}: exit {p.returncode}")
    return {"wall_s": round(wall, 3), "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
            "rss_mb": round(ru.ru_maxrss / 1024, 1)}


def record(work, tool, figures):
    results.setdefault(work, {}).setdefault(tool, []).append(figures)


def med(work, tool, key):
    vals = [r[key] for r in results.get(work, {}).get(tool, []) if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def json_events(path, message):
    out = []
    for line in open(path, errors="replace"):
        if message in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def quiesce():
    psql("checkpoint")
    subprocess.run(["sync"], check=True)


# ---------------------------------------------------------------------------------------------
# The archive everything else uses: a streamer into W/repo for the whole backup/restore part.

def start_streamer():
    logf = open(os.path.join(W, "stream-main.log"), "wb")
    p = subprocess.Popen([A, "--log-format", "json", "stream", "--repo", os.path.join(W, "repo"), "-d", CI,
                          "--slot", "bench_main"], stdout=logf, stderr=subprocess.STDOUT)
    for _ in range(200):
        if "streaming started" in open(os.path.join(W, "stream-main.log"), errors="replace").read():
            return p
        if p.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit("the streamer did not start: " + open(os.path.join(W, "stream-main.log")).read()[-2000:])


# pgBackRest as scripts/bench-cluster.sh's pgbackrest_setup configured it (bench-all.sh ran it).
PGBR = as_pg(["pgbackrest", f"--config={W}/pgbackrest.conf", "--stanza=bench"])


def bench_backups():
    log(f"base backups, {ROUNDS} rounds")
    pgbb = os.path.join(W, "pgbb")
    os.makedirs(pgbb, exist_ok=True)
    chown_pg(pgbb)
    # What each tool stores for one backup: archiver's new backup directory (the repository
    # also holds the streamer's spool and WAL, which change meanwhile), the others' destination.
    tools = [
        ("archiver", os.path.join(W, "repo", "backups"),
         lambda r: [A, "backup", "--repo", os.path.join(W, "repo"), "-d", CI, "--checkpoint", "fast"]),
        ("archiver --server-compress", os.path.join(W, "repo", "backups"),
         lambda r: [A, "backup", "--repo", os.path.join(W, "repo"), "-d", CI, "--checkpoint", "fast",
                    "--server-compress"]),
        ("pg_basebackup client-zstd", pgbb,
         lambda r: as_pg([f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-Ft", "-X",
                          "none", "--compress=client-zstd", "-c", "fast", "-D", os.path.join(pgbb, f"r{r}")])),
        ("pgBackRest zst process-max 2", os.path.join(W, "pgbr"), lambda r: PGBR + ["backup", "--type=full"]),
    ]
    for r in range(ROUNDS):
        order = tools if r % 2 == 0 else list(reversed(tools))
        for name, dest, cmd in order:
            before = du(dest)
            quiesce()
            f = run(cmd(r), "backup.log")
            f["stored_mb"] = round((du(dest) - before) / 1e6, 1)
            record("base backup", name, f)
            if name.startswith("archiver"):
                work_stages[f"{name}, round {r + 1}"] = text_fields(os.path.join(W, "backup.log"),
                                                                    "backup stage totals")
            log(f"  {name}: {f}")


def bench_restores():
    log(f"restores, {ROUNDS} rounds")
    base_tar = os.path.join(W, "pgbb", f"r{ROUNDS - 1}", "base.tar.zst")
    def archiver_restore(d):
        return [A, "restore", "--repo", os.path.join(W, "repo"), "--pgdata", d, "--target-immediate"] + OWNER
    def pgbr_restore(d):
        os.makedirs(d)
        chown_pg(d)
        return PGBR + ["restore", f"--pg1-path={d}"]
    def tar_restore(d):
        os.makedirs(d)
        return ["sh", "-c", f'tar -I zstd -xf "{base_tar}" -C "{d}" && sync']
    tools = [("archiver", archiver_restore), ("pgBackRest process-max 2", pgbr_restore),
             ("tar -I zstd -xf + sync", tar_restore)]
    for r in range(ROUNDS):
        order = tools if r % 2 == 0 else list(reversed(tools))
        for name, cmd in order:
            d = os.path.join(W, "restored")
            subprocess.run(["sync"], check=True)
            f = run(cmd(d), "restore.log")
            record("restore", name, f)
            if name == "archiver":
                work_stages[f"archiver restore, round {r + 1}"] = text_fields(os.path.join(W, "restore.log"),
                                                                              "restore stage totals")
            log(f"  {name}: {f}")
            shutil.rmtree(d)


def load_and_replay(streamer):
    log(f"{LOAD_SECS}s of pgbench for the WAL to replay")
    subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-c", str(CLIENTS), "-j", "2",
                    "-T", str(LOAD_SECS), "postgres"], check=True, capture_output=True)
    last = psql("select pg_walfile_name(pg_current_wal_lsn())")
    psql("select pg_switch_wal()")
    want = os.path.join(W, "repo", "wal", "00000001", last + ".zst")
    for _ in range(600):
        if os.path.exists(want):
            break
        time.sleep(0.1)
    streamer.send_signal(signal.SIGINT)
    streamer.wait()
    for e in json_events(os.path.join(W, "stream-main.log"), "stage totals"):
        stages["archiver stream (async, whole run)"] = e
    wal_dir = os.path.join(W, "repo", "wal", "00000001")
    plain = os.path.join(W, "plainwal")
    os.makedirs(plain, exist_ok=True)
    segs = sorted(f for f in os.listdir(wal_dir) if f.endswith(".zst"))
    for f in segs:
        subprocess.run(["sh", "-c", f'zstd -q -d < "{wal_dir}/{f}" > "{plain}/{f[:-4]}"'], check=True)
    subprocess.run(["chmod", "-R", "a+rX", plain, os.path.join(W, "repo")], check=True)
    log(f"WAL replay of {len(segs)} archived segments, {ROUNDS} rounds")
    rport = int(PORT) + 1

    def replay(name, command):
        d = os.path.join(W, "replay")
        subprocess.run([A, "restore", "--repo", os.path.join(W, "repo"), "--pgdata", d] + OWNER,
                       check=True, capture_output=True)
        conf = os.path.join(d, "postgresql.auto.conf")
        text = re.sub(r"(?m)^restore_command = .*$", f"restore_command = '{command}'", open(conf).read())
        text += f"port = {rport}\nlisten_addresses = ''\nunix_socket_directories = '{W}'\n"
        open(conf, "w").write(text)
        subprocess.run(["sync"], check=True)
        t = time.monotonic()
        subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", d, "-l", os.path.join(W, "replay.log"), "start"]),
                       check=True, capture_output=True)
        while True:
            try:
                if psql("select pg_is_in_recovery()", port=rport, host=W) == "f":
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        wall = time.monotonic() - t
        subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", d, "-m", "immediate", "stop"]), check=True,
                       capture_output=True)
        shutil.rmtree(d)
        f = {"wall_s": round(wall, 3), "segments": len(segs)}
        record("WAL replay", name, f)
        log(f"  {name}: {f}")

    tools = [("archiver wal-fetch", f"{A} wal-fetch --repo {W}/repo %f %p"),
             ("cp of uncompressed WAL", f"cp {plain}/%f %p")]
    for r in range(ROUNDS):
        for name, command in (tools if r % 2 == 0 else list(reversed(tools))):
            replay(name, command)
    shutil.rmtree(plain)


# ---------------------------------------------------------------------------------------------
# Streaming next to pgbench.

def proc_cpu_split(pid):
    """(user, system) CPU seconds of a live process."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / HZ, int(f[12]) / HZ


def proc_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return None


class LagSampler:
    """Flush lag from pg_stat_replication over one psql session that stays open for the run: a
    new psql process and server backend five times a second would cost the 2-core machine CPU
    that pgbench and the tool under test compete for."""

    def __init__(self):
        self.p = subprocess.Popen(psql_cmd(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def sample(self):
        """The lag in ms (0 while the server has none to report), None with no client attached.
        The query returns one row whatever pg_stat_replication holds: a read waiting for a row
        that never comes would hang the run."""
        self.p.stdin.write("select coalesce(max(extract(epoch from flush_lag) * 1000), 0), count(*) "
                           "from pg_stat_replication;\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit("the lag sampler's psql exited")
        lag, clients = line.strip().split("|")
        return float(lag) if int(clients) else None

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def stream_run(mode, tool, r):
    """One pgbench run with `tool` attached in `mode` (async, sync, standby)."""
    sync_name = {"archiver": "archiver", "pg_receivewal": "pg_receivewal"}.get(tool, "") if mode == "standby" else ""
    psql(f"alter system set synchronous_standby_names = '{sync_name}'")
    psql("select pg_reload_conf()")
    psql("checkpoint")
    tag = f"{tool.replace(' ', '')}-{mode}-{r}"
    slot = re.sub(r"[^a-z0-9_]", "_", tag.lower())
    p = None
    logpath = os.path.join(W, f"client-{tag}.log")
    if tool == "pg_receivewal":
        d = os.path.join(W, "rw-" + tag)
        os.makedirs(d)
        psql(f"select pg_create_physical_replication_slot('{slot}', true)")
        cmd = ["pg_receivewal", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-D", d, "--slot", slot, "-n"]
        if mode != "async":
            cmd.append("--synchronous")
    elif tool == "archiver":
        cmd = [A, "--log-format", "json", "stream", "--repo", os.path.join(W, "s-" + tag), "-d", CI, "--slot", slot]
        if mode != "async":
            cmd.append("--synchronous")
    else:
        cmd = None
    if cmd:
        p = subprocess.Popen(cmd, stdout=open(logpath, "wb"), stderr=subprocess.STDOUT)
        for _ in range(200):
            if psql("select count(*) from pg_stat_replication where state = 'streaming'") == "1":
                break
            if p.poll() is not None:
                raise SystemExit(f"{tool} exited: " + open(logpath, errors="replace").read()[-2000:])
            time.sleep(0.1)
        time.sleep(0.5)
    cpu0 = proc_cpu_split(p.pid) if p else (0, 0)
    lsn0 = lsn(psql("select pg_current_wal_lsn()"))
    bench = subprocess.Popen(["pgbench", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-c", str(CLIENTS),
                              "-j", "2", "-T", str(STREAM_SECS), "postgres"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lags = []
    sampler = LagSampler() if p else None
    while bench.poll() is None:
        time.sleep(0.2)
        if sampler:
            v = sampler.sample()
            if v is not None:
                lags.append(v)
    if sampler:
        sampler.close()
    out = bench.stdout.read()
    m = re.search(r"^tps = ([0-9.]+)", out, re.M)
    if not m:
        raise SystemExit("pgbench failed: " + out)
    f = {"tps": round(float(m.group(1)), 1)}
    wal = lsn(psql("select pg_current_wal_lsn()")) - lsn0
    f["wal_mb"] = round(wal / 1e6, 1)
    if p:
        # Until the client has flushed what was written during the run (async: at most a few s).
        end = lsn(psql("select pg_current_wal_lsn()"))
        for _ in range(100):
            v = psql("select flush_lsn from pg_stat_replication")
            if v and lsn(v) >= end:
                break
            time.sleep(0.1)
        user, system = (a - b for a, b in zip(proc_cpu_split(p.pid), cpu0))
        cpu = user + system
        f["cpu_s"] = round(cpu, 3)
        f["cpu_user_s"], f["cpu_system_s"] = round(user, 3), round(system, 3)
        f["cpu_s_per_gb"] = round(cpu / (wal / 1e9), 3) if wal else None
        f["rss_mb"] = round(proc_hwm(p.pid), 1)
        lags.sort()
        if lags:
            f["lag_ms_median"] = round(lags[len(lags) // 2], 3)
            f["lag_ms_p99"] = round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 3)
            f["lag_ms_max"] = round(lags[-1], 3)
            f["lag_samples"] = lags
        p.send_signal(signal.SIGINT)
        p.wait()
        if tool == "archiver":
            for e in json_events(logpath, "stage totals"):
                stages[f"archiver stream, {mode}, round {r + 1}"] = e
        psql("select pg_drop_replication_slot(slot_name) from pg_replication_slots where not active")
        for d in ("rw-" + tag, "s-" + tag):
            shutil.rmtree(os.path.join(W, d), ignore_errors=True)
    label = {"async": "streaming, async", "sync": "streaming, --synchronous",
             "standby": "streaming, synchronous standby (RPO 0)"}
    record(label[mode] if tool != "nothing" else "streaming, nothing attached", tool, f)
    log(f"  {mode:8} {tool:14} " + json.dumps({k: v for k, v in f.items() if k != "lag_samples"}))


def bench_streaming():
    log(f"streaming next to pgbench ({STREAM_SECS}s runs, {ROUNDS} rounds; {SYNC_ROUNDS} of the synchronous standby)")
    modes = os.environ.get("MODES", "async,sync,standby").split(",")
    for r in range(SYNC_ROUNDS):
        pairs = ["archiver", "pg_receivewal"] if r % 2 == 0 else ["pg_receivewal", "archiver"]
        if r < ROUNDS:
            stream_run("none", "nothing", r)
            for mode in ("async", "sync"):
                if mode in modes:
                    for tool in pairs:
                        stream_run(mode, tool, r)
        if "standby" in modes:
            for tool in pairs:
                stream_run("standby", tool, r)
    psql("alter system set synchronous_standby_names = ''")
    psql("select pg_reload_conf()")


# ---------------------------------------------------------------------------------------------
# Upload to a local S3 server (moto) vs boto3 at the same concurrency.

PARTS = 8


def bench_upload():
    moto, py = os.environ.get("MOTO"), os.environ.get("MOTO_PY")
    if not moto:
        log("no moto server (run scripts/test.sh once): S3 upload skipped")
        return
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    mport = s.getsockname()[1]
    s.close()
    mp = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(mport)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        ep = f"http://127.0.0.1:{mport}"
        env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                   AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=ep)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", mport)).close()
                break
            except OSError:
                time.sleep(0.1)
        subprocess.run([py, "-c", "import boto3,sys\ns3=boto3.client('s3',endpoint_url=sys.argv[1])\n"
                        "[s3.create_bucket(Bucket=b) for b in ('tiered','peer','bench-upload')]", ep],
                       env=env, check=True)
        conf = os.path.join(W, "tiered.toml")
        open(conf, "w").write(f"""[hot]
path = "{W}/hot"
[[remote]]
name = "bench"
url = "s3://tiered/r"
endpoint = "{ep}"
part_concurrency = {PARTS}
""")
        peer = """import boto3, os, sys, time
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
t = time.time()
s3.upload_file(sys.argv[2], "peer", sys.argv[3], Config=TransferConfig(multipart_chunksize=8 << 20,
               max_concurrency=int(sys.argv[4])))
print(f"rate {os.path.getsize(sys.argv[2]) / 1e6 / (time.time() - t):.2f}")
"""
        log(f"backup until offsite and upload to S3 (moto), {ROUNDS} rounds, {PARTS} parts in flight each")
        pgbb = os.path.join(W, "pgbb-offsite")
        os.makedirs(pgbb, exist_ok=True)
        chown_pg(pgbb)
        def archiver_offsite(r):
            # Returns once every object is in the remote tier: the backup until offsite.
            f = run([A, "--log-format", "json", "backup", "--config", conf, "-d", CI, "--checkpoint", "fast"],
                    "upload.log", env=dict(env, ARCHIVER_LOG="info,archiver::upload=debug"))
            for e in json_events(os.path.join(W, "upload.log"), '"uploaded while written"'):
                if e.get("key", "").endswith("base.tar.zst"):
                    f["after_local_ms"] = e["after_publish_ms"]
            record("backup until offsite (S3)", "archiver backup --config", f)
            log(f"  archiver: {f}")
            # boto3 on the very archive archiver just wrote, for the uploader's own row.
            base = sorted(os.path.join(dp, n) for dp, _, fs in os.walk(os.path.join(W, "hot", "backups"))
                          for n in fs if n == "base.tar.zst")[-1]
            g = run([py, "-c", peer, ep, base, f"a{r}", str(PARTS)], "boto3.log", env=env)
            g["mb_s"] = float(open(os.path.join(W, "boto3.log")).read().split()[-1])
            record("upload to S3", f"boto3 upload_file, {PARTS} threads", g)
            log(f"  boto3 (archiver's archive): {g}")
            return base
        def peer_offsite(r):
            d = os.path.join(pgbb, f"r{r}")
            b = run(as_pg([f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-Ft", "-X",
                           "none", "--compress=client-zstd", "-c", "fast", "-D", d]), "pgbb-offsite.log")
            subprocess.run(["sync", "-f", os.path.join(d, "base.tar.zst")], check=True)
            u = run([py, "-c", peer, ep, os.path.join(d, "base.tar.zst"), f"p{r}", str(PARTS)], "boto3.log", env=env)
            f = {"wall_s": round(b["wall_s"] + u["wall_s"], 3), "after_local_ms": round(u["wall_s"] * 1000),
                 "rss_mb": max(b["rss_mb"], u["rss_mb"])}
            record("backup until offsite (S3)", f"pg_basebackup client-zstd + boto3 upload_file, {PARTS} threads", f)
            log(f"  pg_basebackup + boto3: {f}")
            shutil.rmtree(d)
        base = None
        for r in range(ROUNDS):
            for name in (("archiver", "peer") if r % 2 == 0 else ("peer", "archiver")):
                quiesce()
                if name == "archiver":
                    base = archiver_offsite(r)
                else:
                    peer_offsite(r)
        bench_bin = os.environ.get("UPLOAD_BENCH")
        if bench_bin:
            out = subprocess.run([bench_bin], env=dict(env, ARCHIVER_BENCH_S3=ep, ARCHIVER_BENCH_OBJECT=base,
                                                       ROUNDS=str(ROUNDS)),
                                 capture_output=True, text=True, check=True).stdout
            for m in re.finditer(r"^uploader ([0-9.]+) MB/s", out, re.M):
                record("upload to S3", "uploader alone (benches/upload.rs)", {"mb_s": float(m.group(1))})
    finally:
        mp.terminate()
        mp.wait()


# ---------------------------------------------------------------------------------------------

def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def summarize():
    rows = []
    # Lag percentiles over all rounds' samples together (one run's p99 of ~75 samples is its max).
    lag_all = []
    for work, tools in results.items():
        for tool, runs in tools.items():
            samples = sorted(x for r in runs for x in r.pop("lag_samples", []))
            if samples:
                lag_all.append({"work": work, "tool": tool, "samples": len(samples),
                                "lag_ms_p50": samples[len(samples) // 2],
                                "lag_ms_p99": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
                                "lag_ms_max": samples[-1]})


    def row(work, metric, tool, peer, key, target=None, better="lower", note=""):
        a, b = med(work, tool, key), med(work, peer, key)
        if key == "lag_ms_p99":
            lags = {(x["work"], x["tool"]): x["lag_ms_p99"] for x in lag_all}
            a, b = lags.get((work, tool)), lags.get((work, peer))
        rt = ratio(a, b)
        met = None
        if target is not None and rt is not None:
            met = rt <= target if better == "lower" else rt >= target
        rows.append({"work": work, "metric": metric, "archiver": tool, "archiver_value": a, "peer": peer,
                     "peer_value": b, "ratio": rt, "target": target, "better": better, "met": met, "note": note})

    bb = "base backup"
    row(bb, "wall s", "archiver", "pg_basebackup client-zstd", "wall_s", 0.8)
    row(bb, "wall s", "archiver --server-compress", "pg_basebackup client-zstd", "wall_s", 0.8)
    row(bb, "wall s", "archiver", "pgBackRest zst process-max 2", "wall_s")
    for t in ("archiver", "archiver --server-compress"):
        row(bb, "CPU s", t, "pg_basebackup client-zstd", "cpu_s")
        row(bb, "stored MB", t, "pg_basebackup client-zstd", "stored_mb", 1.0)
        row(bb, "peak RSS MB", t, "pg_basebackup client-zstd", "rss_mb", note="bound: 128 MB")
    row("restore", "wall s", "archiver", "pgBackRest process-max 2", "wall_s", 0.6)
    row("restore", "wall s", "archiver", "tar -I zstd -xf + sync", "wall_s")
    row("restore", "peak RSS MB", "archiver", "pgBackRest process-max 2", "rss_mb", note="bound: 128 MB")
    row("WAL replay", "wall s", "archiver wal-fetch", "cp of uncompressed WAL", "wall_s", 1.0)
    for mode, work in (("async", "streaming, async"), ("sync", "streaming, --synchronous"),
                       ("standby", "streaming, synchronous standby (RPO 0)")):
        row(work, "pgbench TPS", "archiver", "pg_receivewal", "tps", 1.0 if mode == "standby" else None, "higher")
        row(work, "flush lag p99 ms (all samples)", "archiver", "pg_receivewal", "lag_ms_p99", 1.0 if mode == "standby" else None)
        row(work, "CPU s per GB of WAL", "archiver", "pg_receivewal", "cpu_s_per_gb", 1.0)
        row(work, "peak RSS MB", "archiver", "pg_receivewal", "rss_mb", note="bound: 64 MB")
    if "upload to S3" in results:
        row("upload to S3", "MB/s", "uploader alone (benches/upload.rs)", f"boto3 upload_file, {PARTS} threads",
            "mb_s", 1.0, "higher")
        off, peer_off = "backup until offsite (S3)", f"pg_basebackup client-zstd + boto3 upload_file, {PARTS} threads"
        row(off, "wall s", "archiver backup --config", peer_off, "wall_s")
        row(off, "ms from local copy to offsite", "archiver backup --config", peer_off, "after_local_ms")
        row(off, "peak RSS MB", "archiver backup --config", peer_off, "rss_mb", note="bound: 128 MB")

    # The machine drifts from round to round (pgbench alone has ranged 2400-2900 TPS in one
    # run), so the two tools' runs in the same round are also compared pair by pair.
    paired_tps = {}
    for work in ("streaming, async", "streaming, --synchronous", "streaming, synchronous standby (RPO 0)"):
        a, b = results.get(work, {}).get("archiver", []), results.get(work, {}).get("pg_receivewal", [])
        pairs = [round(x["tps"] / y["tps"], 3) for x, y in zip(a, b) if y.get("tps")]
        if pairs:
            paired_tps[work] = pairs

    env = {"scale": SCALE, "rounds": ROUNDS, "sync_rounds": SYNC_ROUNDS, "stream_secs": STREAM_SECS,
           "load_secs": LOAD_SECS, "cores": os.cpu_count(), "git": os.environ.get("GIT_REV"),
           "postgres": psql("show server_version"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "db_mb": round(int(psql("select sum(pg_database_size(oid)) from pg_database")) / 1e6),
           "elapsed_s": round(time.time() - started)}
    os.makedirs(OUT, exist_ok=True)
    json.dump({"env": env, "rows": rows, "runs": results, "lag": lag_all, "stages": stages,
               "work_stages": work_stages, "paired_tps": paired_tps},
              open(os.path.join(OUT, "summary.json"), "w"), indent=1)

    def fmt(v):
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) and v < 10 else
                                      f"{v:.1f}" if isinstance(v, float) else str(v))
    md = [f"# bench-all, {env['date']} (commit {env['git']})", "",
          f"pgbench scale {SCALE} ({env['db_mb']} MB), PostgreSQL {env['postgres']}, {env['cores']} cores; "
          f"medians of {ROUNDS} rounds ({SYNC_ROUNDS} for the synchronous standby), tools alternating; "
          f"streaming runs {STREAM_SECS} s of pgbench -c {CLIENTS}; {env['elapsed_s']} s in all.", "",
          "| work | metric | archiver | value | peer | value | ratio | target | met |",
          "|---|---|---|---:|---|---:|---:|---:|---|"]
    for r in rows:
        tgt = "" if r["target"] is None else ("≤ " if r["better"] == "lower" else "≥ ") + f"{r['target']}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        md.append(f"| {r['work']} | {r['metric']} | {r['archiver']} | {fmt(r['archiver_value'])} | {r['peer']} | "
                  f"{fmt(r['peer_value'])} | {fmt(r['ratio'])} | {tgt} | {met} |")
    md += ["", "pgbench TPS, archiver ÷ pg_receivewal in the same round:", ""]
    for work, pairs in paired_tps.items():
        md.append(f"- {work}: {', '.join(f'{x:.3f}' for x in pairs)}; median **{statistics.median(pairs):.3f}**")
    md += ["", "Flush lag over all rounds' samples (every 0.2 s, over one open psql session):", "",
           "| work | tool | p50 ms | p99 ms | max ms | samples |", "|---|---|---:|---:|---:|---:|"]
    for x in lag_all:
        md.append(f"| {x['work']} | {x['tool']} | {x['lag_ms_p50']:.2f} | {x['lag_ms_p99']:.2f} | "
                  f"{x['lag_ms_max']:.2f} | {x['samples']} |")
    if stages:
        md += ["", "archiver stream's own stage totals (its `stage totals` log line at stop):", "",
               "| run | WAL MB | batches | write ms | fsyncs | fsync ms | encode ms (compress+hash+index) | "
               "put ms | stored MB | slowest write / fsync / queue wait ms |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in stages.items():
            md.append(f"| {name} | {e.get('wal_bytes', 0) / 1e6:.0f} | {e.get('batches')} | {e.get('write_ms')} | "
                      f"{e.get('fsyncs')} | {e.get('fsync_ms')} | {e.get('encode_ms')} | {e.get('put_ms')} | "
                      f"{e.get('stored_bytes', 0) / 1e6:.1f} | {e.get('slowest_write_ms')} / "
                      f"{e.get('slowest_fsync_ms')} / {e.get('slowest_queue_ms')} |")
    backups = {k: v for k, v in work_stages.items() if v and "backup" in k}
    if backups:
        md += ["", "archiver backup's own stage totals (`backup stage totals`; time in the receive loop, ms):", "",
               "| run | received MB | receive | encode (compress+checksums) | check (tar+manifest) | write | "
               "finish | stored MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in backups.items():
            md.append(f"| {name} | {e.get('received_bytes', 0) / 1e6:.0f} | {e.get('receive_ms')} | "
                      f"{e.get('encode_ms')} | {e.get('check_ms')} | {e.get('write_ms')} | {e.get('finish_ms')} | "
                      f"{e.get('stored_bytes', 0) / 1e6:.1f} |")
    restores = {k: v for k, v in work_stages.items() if v and "restore" in k}
    if restores:
        md += ["", "archiver restore's own stage totals (`restore stage totals`, ms; archives run in parallel):", "",
               "| run | raw MB | decode (read+decompress+verify) | write (files+checksums) | final syncfs | wall |",
               "|---|---:|---:|---:|---:|---:|"]
        for name, e in restores.items():
            md.append(f"| {name} | {e.get('raw_bytes', 0) / 1e6:.0f} | {e.get('decode_ms')} | {e.get('write_ms')} | "
                      f"{e.get('sync_ms')} | {e.get('wall_ms')} |")
    md += ["", "Every round's figures: summary.json (`runs`)."]
    open(os.path.join(OUT, "summary.md"), "w").write("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    only = os.environ.get("ONLY", "backup,restore,replay,stream,upload").split(",")
    psql("checkpoint")
    log(f"database {int(psql('select sum(pg_database_size(oid)) from pg_database')) // 1000000} MB, "
        f"PostgreSQL {psql('show server_version')}")
    if {"backup", "restore", "replay"} & set(only):
        streamer = start_streamer()
        try:
            bench_backups()
            if "restore" in only:
                bench_restores()
            if "replay" in only:
                load_and_replay(streamer)
        finally:
            if streamer.poll() is None:
                streamer.send_signal(signal.SIGINT)
                streamer.wait()
    if "stream" in only:
        bench_streaming()
    if "upload" in only:
        bench_upload()
    summarize()


if __name__ == "__main__":
    main()
