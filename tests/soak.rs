//! A soak of `archiver run`: pgbench against a server whose synchronous standby is the daemon,
//! scheduled backups, and a remote tier reached through a proxy that injects S3 faults. It runs
//! for `ARCHIVER_SOAK_SECS` (default 60 in the test suite; `scripts/bench-soak.sh` runs it for
//! 30 minutes and records the figures). Afterwards: every acknowledged transaction is in the
//! archive (the archived WAL equals the server's, byte for byte), `verify` reads back every
//! object of every tier whole, no backup is left running, the daemon stopped with exit 0, and
//! its open file descriptors stayed flat.
//!
//! Peak RSS and descriptors over time are written to `ARCHIVER_SOAK_REPORT` when set; their
//! targets live in docs/benchmarks.md, not in assertions here.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(120);

fn rss_kb(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn fds(pid: i32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// `GET /metrics` and the value of the first sample named `name` with `label` in its labels.
fn metric(port: u16, name: &str, label: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn soak_under_load_with_s3_faults() {
    let secs: u64 = std::env::var("ARCHIVER_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let backup_every =
        std::env::var("ARCHIVER_SOAK_BACKUP_EVERY").unwrap_or_else(|_| "*/20 * * * * *".into());
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let scale = std::env::var("ARCHIVER_SOAK_SCALE").unwrap_or_else(|_| "5".into());
    pg.pgbench(&["-i", "-s", &scale]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let moto = Moto::start();
    let (remote, _proxy) = match &moto {
        Some(m) => {
            rt.block_on(m.bucket("soak", false));
            let proxy = FaultyProxy::start(&m.endpoint);
            (
                format!(
                    "[[remote]]\nname = \"offsite\"\nurl = \"s3://soak/a\"\nendpoint = \"{}\"\npath_style = true\nregion = \"us-east-1\"\nrpo_objective = \"10m\"\n",
                    proxy.endpoint
                ),
                Some(proxy),
            )
        }
        None => {
            eprintln!("no moto_server: the remote tier is left out (scripts/test.sh installs it)");
            (String::new(), None)
        }
    };
    let port = free_port();
    let hot = dir.join("hot");
    let cfg = dir.join("archiver.toml");
    std::fs::write(
        &cfg,
        format!(
            "environment = \"soak\"\n[hot]\npath = \"{}\"\n[upload]\npartial_upload_interval = \"1s\"\n[retention]\nkeep_last = 2\n[server]\nconninfo = \"{}\"\nsynchronous = true\n[schedule]\nbackup = \"{backup_every}\"\nbackup_retry_delay = \"1s\"\nstop_timeout = \"5s\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[alerts]\ndisk_usage_percent = 99.9\n{remote}",
            hot.display(),
            pg.conninfo("postgres"),
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    // For the commands run afterwards (verify, list) as well.
    for (k, v) in env {
        std::env::set_var(k, v);
    }
    let mut d = Archiver::spawn_env(&dir, "run", &["run", "--config", c], &env);
    d.wait_log("streaming started", T);
    let pid = d.pid();
    // Only now the daemon is the synchronous standby (before, commits would wait for it).
    pg.psql("alter system set synchronous_standby_names = 'archiver'");
    pg.psql("select pg_reload_conf()");
    wait_until("archiver is the synchronous standby", T, || {
        pg.psql("select sync_state from pg_stat_replication where application_name = 'archiver'")
            .trim()
            == "sync"
    });

    // Load for the whole soak: every commit waits for the daemon's fsync (synchronous standby).
    let mut bench = pg.pgbench_background(&["-c", "4", "-j", "2", "-T", &secs.to_string()]);
    let t0 = Instant::now();
    let (mut peak_idle, mut peak_backup) = (0u64, 0u64);
    let mut fd_samples = Vec::new();
    let mut rss_samples = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        let (Some(r), Some(f)) = (rss_kb(pid), fds(pid)) else {
            panic!("the daemon is gone:\n{}", d.log_text());
        };
        let backing_up = metric(port, "archiver_job_running", "backup") == Some(1.0);
        if backing_up {
            peak_backup = peak_backup.max(r);
        } else {
            peak_idle = peak_idle.max(r);
        }
        fd_samples.push(f);
        rss_samples.push(r);
    }
    assert!(bench.wait().unwrap().success(), "pgbench failed");
    let backups_ok = metric(port, "archiver_backups_total", "success").unwrap_or(0.0);
    assert!(backups_ok >= 1.0, "{}", d.log_text());

    // Let the remote tier catch up, then stop: exit 0.
    pg.psql("select pg_switch_wal()");
    std::thread::sleep(Duration::from_secs(3));
    let st = d.term();
    assert!(st.success(), "{st}: {}", d.log_text());

    // Every acknowledged transaction is archived: the archive's segments equal the server's.
    pg.stop();
    let n = assert_segments_match(&hot, 1, &pg.wal_dir());
    assert!(n >= 1);
    // Every object of every tier reads back whole.
    let out = archiver_cmd(
        std::process::Command::new(archiver_bin())
            .args(["verify", "--config", c])
            .envs(env),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = archiver_ok(&["list", "--config", c, "--json"]);
    assert!(!list.contains("\"running\""), "{list}");

    // Descriptors flat: the last quarter's peak is no higher than the first quarter's + slack.
    let q = fd_samples.len() / 4;
    let (first, last) = (
        fd_samples[..q.max(1)].iter().max().copied().unwrap_or(0),
        fd_samples[fd_samples.len() - q.max(1)..]
            .iter()
            .max()
            .copied()
            .unwrap_or(0),
    );
    assert!(last <= first + 16, "descriptors grew: {first} -> {last}");
    let report = serde_json::json!({
        "seconds": secs,
        "pgbench_scale": scale,
        "backup_schedule": backup_every,
        "backups": backups_ok,
        "peak_rss_mb_outside_backups": peak_idle as f64 / 1024.0,
        "peak_rss_mb_during_backups": peak_backup as f64 / 1024.0,
        "rss_mb_first_quarter_max": rss_samples[..q.max(1)].iter().max().copied().unwrap_or(0) as f64 / 1024.0,
        "rss_mb_last_quarter_max": rss_samples[rss_samples.len() - q.max(1)..].iter().max().copied().unwrap_or(0) as f64 / 1024.0,
        "fds_first_quarter_max": first,
        "fds_last_quarter_max": last,
        "s3_faults_injected": _proxy.as_ref().map(|p| p.faults.load(std::sync::atomic::Ordering::Relaxed)),
        "segments_compared": n,
    });
    eprintln!("soak: {report}");
    if let Ok(p) = std::env::var("ARCHIVER_SOAK_REPORT") {
        std::fs::write(p, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}
