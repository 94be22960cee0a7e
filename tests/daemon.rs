//! `archiver run`, the sidecar, against real PostgreSQL (and a real moto S3 server for the
//! remote tier): scheduled backups appear and are expired, `/metrics` parses as Prometheus text
//! and agrees with `list` and `tiers`, SIGHUP reloads the schedule; `/ready` follows an outage
//! of the server, which the daemon reconnects from by itself, and a local webhook receiver and
//! SMTP sink get exactly one alert and one resolve for it; a backup that cannot be taken is
//! tried 1 + 3 times, then alerted once; SIGTERM during a backup exits 0 and leaves no record
//! `running`; a bad configuration refuses the start.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(90);

/// `GET path` on 127.0.0.1:port: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    // axum answers with Content-Length (no chunking) for these bodies.
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    Some((status, body.to_string()))
}

/// The samples of `/metrics`, parsed by a Prometheus text parser.
fn scrape(port: u16) -> prometheus_parse::Scrape {
    let (status, body) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of metric `name` with label `label=value` (or the only one).
fn metric(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// A webhook receiver: every JSON body POSTed to it.
struct Webhook {
    port: u16,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let b = bodies.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    b.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    let mut w = conn;
                    let _ = w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                });
            }
        });
        Webhook { port, bodies }
    }

    /// (event, status) of every delivery of `event`.
    fn of(&self, event: &str) -> Vec<String> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b["event"] == event)
            .map(|b| b["status"].as_str().unwrap().to_string())
            .collect()
    }
}

/// An SMTP sink: every message's text (plain SMTP, as a relay on the same host).
struct SmtpSink {
    port: u16,
    messages: Arc<Mutex<Vec<String>>>,
}

impl SmtpSink {
    fn start() -> SmtpSink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let m = messages.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    let _ = w.write_all(b"220 sink ESMTP\r\n");
                    let mut data: Option<String> = None;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(d) = data.as_mut() {
                            if line == ".\r\n" {
                                m.lock().unwrap().push(data.take().unwrap());
                                let _ = w.write_all(b"250 queued\r\n");
                            } else {
                                d.push_str(&line);
                            }
                            continue;
                        }
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 sink\r\n",
                            "DATA" => {
                                data = Some(String::new());
                                b"354 go on\r\n"
                            }
                            "QUIT" => {
                                let _ = w.write_all(b"221 bye\r\n");
                                return;
                            }
                            _ => b"250 OK\r\n",
                        };
                        let _ = w.write_all(reply);
                    }
                });
            }
        });
        SmtpSink { port, messages }
    }

    /// Messages whose text contains all of `needles`.
    fn with(&self, needles: &[&str]) -> usize {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .filter(|m| needles.iter().all(|n| m.contains(n)))
            .count()
    }
}

fn config(dir: &TestDir, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn list_json(cfg: &str) -> Vec<serde_json::Value> {
    let out = archiver_ok(&["list", "--config", cfg, "--json"]);
    serde_json::from_str(&out).unwrap()
}

fn count_status(backups: &[serde_json::Value], status: &str) -> usize {
    backups.iter().filter(|b| b["status"] == status).count()
}

fn aws_env() -> [(&'static str, &'static str); 4] {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn run_schedules_backups_expires_and_serves_metrics() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    pg.pgbench(&["-i", "-s", "1"]);
    let moto = Moto::start();
    if moto.is_none() {
        eprintln!("no moto_server: the remote tier is left out (scripts/test.sh installs it)");
    }
    let remote = match &moto {
        Some(m) => {
            for (k, v) in aws_env() {
                std::env::set_var(k, v);
            }
            m.bucket("offsite", false).await;
            format!(
                "[[remote]]\nname = \"offsite\"\nurl = \"s3://offsite/a\"\nendpoint = \"{}\"\npath_style = true\nregion = \"us-east-1\"\n[remote.retention]\nkeep_last = 3\n",
                m.endpoint
            )
        }
        None => String::new(),
    };
    let port = free_port();
    let hot = dir.join("hot");
    let body = |schedule: &str| {
        format!(
            "environment = \"test\"\n[hot]\npath = \"{}\"\n[upload]\npartial_upload_interval = \"1s\"\n[retention]\nkeep_last = 2\n[server]\nconninfo = \"{}\"\n[schedule]\n{schedule}\nbackup_retry_delay = \"1s\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{remote}",
            hot.display(),
            pg.conninfo("postgres"),
        )
    };
    let cfg = config(&dir, "archiver.toml", &body("backup = \"*/6 * * * * *\""));
    let c = cfg.to_str().unwrap();
    let env = aws_env();
    let mut d = Archiver::spawn_env(&dir, "run", &["run", "--config", c], &env);
    d.wait_log("streaming started", T);

    // /health at once; /ready once streaming (every tier within its objective).
    wait_until("/health", T, || {
        http_get(port, "/health").is_some_and(|(s, _)| s == 200)
    });
    wait_until("/ready", T, || {
        http_get(port, "/ready").is_some_and(|(s, _)| s == 200)
    });

    // Backups every 6 s (the first at once: the repository had none); keep_last = 2.
    wait_until("four scheduled backups", Duration::from_secs(120), || {
        metric(
            &scrape(port),
            "archiver_backups_total",
            Some(("result", "success")),
        )
        .is_some_and(|v| v >= 4.0)
    });
    // Expire ran after each, per tier: the hot tier keeps 2 complete backups (its catalog, in
    // the metrics), the remote tier 3 (what `list` shows is every tier's).
    let backups = list_json(c);
    let want = if moto.is_some() { 3 } else { 2 };
    let ok = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        count_status(&list_json(c), "complete") == want
            && metric(&scrape(port), "archiver_backups_complete", None) == Some(2.0)
    });
    assert!(ok, "{:?}\n{}", list_json(c), d.log_text());
    assert!(
        backups.iter().all(|b| b["environment"] == "test"),
        "{backups:?}"
    );
    let s = scrape(port);
    assert_eq!(
        metric(&s, "archiver_expires_total", Some(("result", "failure"))),
        None,
        "{}",
        d.log_text()
    );
    assert!(metric(&s, "archiver_expires_total", Some(("result", "success"))).unwrap() >= 3.0);

    // /status has the whole state.
    let (st, status) = http_get(port, "/status").unwrap();
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["environment"], "test");
    assert_eq!(v["stream"]["connected"], true);
    assert!(v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["job"] == "backup"
            && j["schedule"] == "*/6 * * * * *"
            && j["next"].is_string()));
    assert!(!status.contains("password"));

    // SIGHUP: a new schedule (no more backups; a verify and a drill every 5 s) without a
    // restart.
    std::fs::write(
        &cfg,
        body("verify = \"*/5 * * * * *\"\ndrill = \"*/5 * * * * *\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("reloaded [schedule]", T);
    wait_until("the last backup to finish", T, || {
        metric(
            &scrape(port),
            "archiver_job_running",
            Some(("job", "backup")),
        ) == Some(0.0)
    });

    // The stream's positions: flushed ≤ server; the hot tier's durable LSN is the flushed one.
    pg.psql("create table t as select generate_series(1, 10000) i; select pg_switch_wal();");
    wait_until("the metrics refresh", T, || {
        let s = scrape(port);
        metric(&s, "archiver_replication_connected", None) == Some(1.0)
            && metric(&s, "archiver_backups_complete", None) == Some(2.0)
    });
    let s = scrape(port);
    // Sound WAL: no segment failed its record checks.
    assert_eq!(metric(&s, "archiver_wal_damaged_segments", None), Some(0.0));
    let flushed = metric(&s, "archiver_flushed_lsn", None).unwrap();
    let server = metric(&s, "archiver_server_lsn", None).unwrap();
    assert!(flushed > 0.0 && flushed <= server, "{flushed} {server}");
    assert_eq!(
        metric(&s, "archiver_tier_durable_lsn", Some(("tier", "hot"))),
        Some(flushed)
    );
    let rpo = metric(&s, "archiver_tier_rpo_seconds", Some(("tier", "hot"))).unwrap();
    assert!((0.0..60.0).contains(&rpo), "{rpo}");
    assert_eq!(
        metric(
            &s,
            "archiver_tier_rpo_objective_seconds",
            Some(("tier", "hot"))
        ),
        Some(900.0)
    );
    let free = metric(&s, "archiver_hot_disk_free_ratio", None).unwrap();
    assert!(free > 0.0 && free <= 1.0);
    // The newest complete backup in the metrics is the newest one `list` shows.
    let newest = list_json(c)
        .into_iter()
        .filter(|b| b["status"] == "complete")
        .max_by_key(|b| b["id"].as_str().unwrap().to_string())
        .unwrap();
    let s = scrape(port);
    assert_eq!(
        metric(&s, "archiver_last_backup_stored_bytes", None),
        newest["stored_bytes"].as_f64()
    );
    assert_eq!(
        metric(&s, "archiver_last_backup_size_bytes", None),
        newest["size_bytes"].as_f64()
    );
    if moto.is_some() {
        // The remote tier: durable in the metrics never ahead of what `tiers` reports later.
        wait_until("offsite durable", T, || {
            metric(
                &scrape(port),
                "archiver_tier_durable_lsn",
                Some(("tier", "offsite")),
            )
            .is_some_and(|v| v > 0.0)
        });
        let m = metric(
            &scrape(port),
            "archiver_tier_durable_lsn",
            Some(("tier", "offsite")),
        )
        .unwrap();
        // (`tiers` reads spool/tiers.json, which the uploader rewrites once a second: it
        // catches up to the metric, never the other way round.)
        let from_tiers = || {
            let tiers: serde_json::Value =
                serde_json::from_str(&archiver_ok(&["tiers", "--config", c, "--json"])).unwrap();
            let t = tiers["tiers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == "offsite")
                .unwrap()
                .clone();
            t["durable"]["lsn"].as_str().map(lsn_of).unwrap_or(0)
        };
        wait_until(
            "the tier state file reaches the metric's durable position",
            Duration::from_secs(10),
            || m as u64 <= from_tiers(),
        );
    }

    wait_until("a scheduled verify", T, || {
        metric(
            &scrape(port),
            "archiver_verifies_total",
            Some(("result", "success")),
        )
        .is_some_and(|v| v >= 1.0)
    });
    // A drill: restored and replayed in a scratch cluster; its recovery time is the RTO.
    let ok = (0..240).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        metric(
            &scrape(port),
            "archiver_drills_total",
            Some(("result", "success")),
        )
        .is_some_and(|v| v >= 1.0)
    });
    assert!(ok, "{}", d.log_text());
    let rto = metric(&scrape(port), "archiver_last_drill_rto_seconds", None).unwrap();
    assert!(rto > 0.0 && rto < 120.0, "{rto}");
    assert!(
        !d.log_text().contains("\"verify_failed\""),
        "{}",
        d.log_text()
    );

    // SIGTERM: exit 0, nothing left running.
    assert!(d.term().success(), "{}", d.log_text());
    let after = list_json(c);
    assert_eq!(
        count_status(&after, "running"),
        0,
        "{:?}\n{}",
        after
            .iter()
            .map(|b| (b["id"].clone(), b["status"].clone()))
            .collect::<Vec<_>>(),
        d.log_text()
    );
    assert!(d.log_text().contains("stopped cleanly"));
}

fn lsn_of(s: &str) -> u64 {
    let (hi, lo) = s.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[test]
fn run_alerts_once_per_outage_and_after_failed_backup_retries() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    pg.psql("create role arch login replication; grant pg_read_all_stats to arch;");
    let hook = Webhook::start();
    let smtp = SmtpSink::start();
    let port = free_port();
    let hot = dir.join("hot");
    let ci = pg.conninfo("arch");
    let body = |schedule: &str| {
        format!(
            "environment = \"staging\"\n[hot]\npath = \"{}\"\n[server]\nconninfo = \"{}\"\n[schedule]\n{schedule}\nbackup_retries = 3\nbackup_retry_delay = \"1s\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[alerts]\ndisconnected_after = \"2s\"\ndisk_usage_percent = 99.9\n[[notify]]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{}/hook?token=sekrit\"\n[[notify]]\ntype = \"slack\"\nurl = \"http://127.0.0.1:{}/slack\"\n[[notify]]\ntype = \"email\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"archiver@example.com\"\nto = [\"ops@example.com\"]\n",
            hot.display(),
            ci,
            hook.port,
            hook.port,
            smtp.port,
        )
    };
    let cfg = config(&dir, "archiver.toml", &body(""));
    let c = cfg.to_str().unwrap();
    let mut d = Archiver::spawn(&dir, "run", &["run", "--config", c]);
    d.wait_log("streaming started", T);
    wait_until("ready", T, || {
        http_get(port, "/ready").is_some_and(|(s, _)| s == 200)
    });

    // An outage: /ready 503 with the reason, one alert on each channel after 2 s.
    pg.stop();
    wait_until("not ready", T, || {
        http_get(port, "/ready").is_some_and(|(s, b)| s == 503 && b.contains("not connected"))
    });
    wait_until("the disconnection alert", T, || {
        hook.of("stream_disconnected") == ["firing"]
            && smtp.with(&["FIRING", "stream_disconnected"]) == 1
    });
    assert_eq!(
        metric(&scrape(port), "archiver_replication_connected", None),
        Some(0.0)
    );
    std::thread::sleep(Duration::from_secs(4)); // still down: no second alert
    pg.start();
    wait_until("ready again (reconnected by itself)", T, || {
        http_get(port, "/ready").is_some_and(|(s, _)| s == 200)
    });
    wait_until("the resolve", T, || {
        hook.of("stream_disconnected") == ["firing", "resolved"]
            && smtp.with(&["RESOLVED", "stream_disconnected"]) == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hook.of("stream_disconnected"), ["firing", "resolved"]);
    // A server shutdown is an outage, not a failure of the stream.
    assert_eq!(hook.of("stream_failed"), Vec::<String>::new());
    assert_eq!(smtp.with(&["stream_disconnected"]), 2);
    // The Slack channel got the same two, as text.
    let slack: Vec<String> = hook
        .bodies
        .lock()
        .unwrap()
        .iter()
        .filter_map(|b| b["text"].as_str().map(str::to_string))
        .filter(|t| t.contains("stream_disconnected"))
        .collect();
    assert_eq!(slack.len(), 2, "{slack:?}");
    assert!(slack[0].starts_with("[staging] FIRING") && slack[1].starts_with("[staging] RESOLVED"));
    let first = hook
        .bodies
        .lock()
        .unwrap()
        .iter()
        .find(|b| b.get("event").is_some())
        .cloned()
        .unwrap();
    assert_eq!(
        first["event"],
        "stream_disconnected",
        "{:?}",
        hook.bodies.lock().unwrap()
    );
    assert_eq!(first["environment"], "staging");
    assert_eq!(first["severity"], "critical");
    assert!(first["time"].is_string() && first["summary"].is_string());
    assert!(smtp.with(&["[archiver staging] FIRING"]) == 1);
    let s = scrape(port);
    assert!(
        metric(
            &s,
            "archiver_alert_deliveries_total",
            Some(("channel", "webhook-1"))
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        metric(
            &s,
            "archiver_alert_deliveries_total",
            Some(("channel", "email-3"))
        )
        .unwrap()
            >= 2.0
    );

    // A backup that cannot be taken (REPLICATION revoked): 1 + 3 attempts, then one alert.
    // Due once, a few seconds from now (the schedule's clock is UTC by default): with a
    // schedule that came round again, its next run's retries could be counted before the
    // scrape below.
    pg.psql("alter role arch noreplication");
    let at = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(4))
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC);
    let once = format!(
        "backup = \"{} {} {} * * *\"",
        at.second(),
        at.minute(),
        at.hour()
    );
    std::fs::write(&cfg, body(&once)).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("reloaded [schedule]", T);
    wait_until("the backup failure alert", Duration::from_secs(120), || {
        hook.of("backup_failed") == ["firing"] && smtp.with(&["backup_failed"]) == 1
    });
    let s = scrape(port);
    assert_eq!(
        metric(&s, "archiver_retries_total", Some(("operation", "backup"))),
        Some(3.0)
    );
    assert_eq!(
        metric(&s, "archiver_backups_total", Some(("result", "failure"))),
        Some(1.0)
    );
    let alert = hook
        .bodies
        .lock()
        .unwrap()
        .iter()
        .find(|b| b["event"] == "backup_failed")
        .cloned()
        .unwrap();
    assert!(
        alert["summary"].as_str().unwrap().contains("4 attempts"),
        "{alert}"
    );
    assert!(
        alert["details"].as_str().unwrap().contains("REPLICATION"),
        "{alert}"
    );
    // The webhook's token never reaches the logs.
    pg.psql("alter role arch replication");
    assert!(d.term().success(), "{}", d.log_text());
    assert!(!d.log_text().contains("sekrit"));
}

#[test]
fn run_stops_cleanly_during_a_backup_and_refuses_bad_configurations() {
    let dir = TestDir::new();
    // Refused before anything starts: a bad schedule, a bad address, a missing file.
    for (text, needle) in [
        ("[schedule]\nbackup = \"at two\"\n", "not a cron schedule"),
        ("[http]\nlisten = \"everywhere\"\n", "not an address"),
        ("[[notify]]\ntype = \"pager\"\n", "pager"),
    ] {
        let cfg = config(
            &dir,
            "bad.toml",
            &format!(
                "[hot]\npath = \"{}\"\n{text}",
                dir.join("bad-hot").display()
            ),
        );
        let out = archiver(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "-d",
            "host=/nonexistent",
        ]);
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle) && err.contains("bad.toml"), "{err}");
        assert!(!dir.join("bad-hot").exists());
    }
    let out = archiver(&["run", "--config", dir.join("none.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.toml"));

    // SIGTERM during the first backup (due at once: the repository has none).
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    pg.pgbench(&["-i", "-s", "10"]);
    let hot = dir.join("hot");
    let port = free_port();
    let cfg = config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[server]\nconninfo = \"{}\"\n[schedule]\nbackup = \"0 2 * * *\"\nstop_timeout = \"1s\"\nbackup_compress_level = 9\n[http]\nlisten = \"127.0.0.1:{port}\"\n",
            hot.display(),
            pg.conninfo("postgres"),
        ),
    );
    let c = cfg.to_str().unwrap();
    // The port is taken: refused.
    let taken = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = archiver(&["run", "--config", c]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    drop(taken);

    let mut d = Archiver::spawn(&dir, "run", &["run", "--config", c]);
    d.wait_log("backup started", T);
    let st = d.term();
    assert!(st.success(), "{st}: {}", d.log_text());
    let backups = list_json(c);
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert!(
        backups[0]["status"] == "failed" || backups[0]["status"] == "complete",
        "{backups:?}"
    );
    // And the next start takes no second backup at once when the first completed, or retries
    // the missed one when it failed: either way it streams again.
    let mut d = Archiver::spawn(&dir, "run2", &["run", "--config", c]);
    d.wait_log("streaming started", T);
    assert!(d.term().success(), "{}", d.log_text());
}

/// `[schedule] incremental` (PostgreSQL 17+): the first run has nothing to build on and takes a
/// full backup, saying why; the next ones are incremental, each on top of the newest backup;
/// once the server stops summarizing WAL, the same schedule takes full backups.
#[test]
fn run_takes_incremental_backups_and_full_ones_where_it_cannot() {
    let Some(bin) = pg_bin_of_major(17) else {
        eprintln!("skipped: no PostgreSQL 17 binaries (scripts/test.sh fetches them)");
        return;
    };
    let dir = TestDir::new();
    let mut pg = Pg::create_with_bin(&dir, "pg", "summarize_wal = on\n", &bin);
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let cfg = config(
        &dir,
        "archiver.toml",
        &format!(
            "[hot]\npath = \"{}\"\n[server]\nconninfo = \"{}\"\n[schedule]\nincremental = \"*/4 * * * * *\"\nbackup_retry_delay = \"1s\"\n[http]\nlisten = \"\"\n",
            dir.join("hot").display(),
            pg.conninfo("postgres"),
        ),
    );
    let c = cfg.to_str().unwrap();
    let mut d = Archiver::spawn(&dir, "run", &["run", "--config", c]);
    d.wait_log("streaming started", T);
    let complete = |kind: &str| {
        list_json(c)
            .into_iter()
            .filter(|b| b["status"] == "complete" && (b["parent"].is_null() == (kind == "full")))
            .collect::<Vec<_>>()
    };
    wait_until("a full backup, then two incremental ones", T * 2, || {
        pg.pgbench(&["-t", "50"]);
        complete("incremental").len() >= 2
    });
    assert_eq!(complete("full").len(), 1, "{:?}", list_json(c));
    let log = d.log_text();
    assert!(
        log.contains("no complete backup of this cluster")
            && log.contains("taking a full backup instead"),
        "{log}"
    );
    // Each incremental builds on the backup just before it (the newest one when it started).
    let all = list_json(c);
    for b in all.iter().filter(|b| !b["parent"].is_null()) {
        let before: Vec<_> = all
            .iter()
            .filter(|o| o["start_time"].as_str() < b["start_time"].as_str())
            .collect();
        let newest = before
            .iter()
            .max_by_key(|o| o["start_time"].as_str())
            .unwrap();
        assert_eq!(b["parent"], newest["id"], "{all:?}");
    }

    // The server stops summarizing: the schedule goes on with full backups.
    pg.psql("alter system set summarize_wal = off");
    pg.psql("select pg_reload_conf()");
    let fulls = complete("full").len();
    wait_until("a full backup in the incremental schedule", T * 2, || {
        complete("full").len() > fulls
    });
    assert!(
        d.log_text().contains("summarize_wal = off"),
        "{}",
        d.log_text()
    );
    assert!(d.term().success(), "{}", d.log_text());
}
