//! Nothing acknowledged is out of reach: with a plain local repository, a restore reaches every
//! commit the stream acknowledged, though its segment never filled — read from the durable
//! prefix the streamer recorded in its spool. A quiet server, lost with `-m immediate` and
//! never read again.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn lsn(s: &str) -> u64 {
    let (hi, lo) = s.trim().split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn restore(repo: &str, pgdata: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "restore",
        "--repo",
        repo,
        "--pgdata",
        pgdata.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    if is_root() && !extra.contains(&"--dry-run") {
        args.extend_from_slice(&["--owner", "postgres"]);
    }
    archiver_ok(&args)
}

/// The durable prefix the streamer recorded: (segment, bytes).
fn flushed_record(repo: &Path) -> (String, u64) {
    try_flushed_record(repo).expect("the streamer recorded a durable prefix")
}

/// The same, `None` before the streamer's first fsync of a partial segment (no record yet).
fn try_flushed_record(repo: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(repo.join("spool/stream.flushed")).ok()?;
    let mut f = text.split_whitespace();
    let seg = f.next()?.to_string();
    let len = u64::from_str_radix(f.next()?, 16).ok()?;
    Some((seg, len))
}

#[test]
fn synchronous_standby_loses_no_acknowledged_commit() {
    let dir = TestDir::new();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();
    let mut pg = Pg::create(&dir, "pg", "synchronous_standby_names = 'archiver'\n", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    // A backup first (it fetches its own WAL), then the synchronous stream.
    archiver_ok(&["backup", "--repo", r, "-d", &ci, "--checkpoint", "fast"]);
    let mut a = Archiver::stream(&dir, "stream", &["--repo", r, "-d", &ci, "--synchronous"]);
    wait_until("archiver is the synchronous standby", T, || {
        pg.psql("select sync_state from pg_stat_replication where application_name = 'archiver'")
            == "sync"
    });
    // A quiet server: a few commits, far from a segment boundary; each returns only once the
    // archive has fsync'd its WAL.
    pg.psql("create table marker(x int)");
    pg.psql("insert into marker values (1)");
    std::thread::sleep(Duration::from_millis(1100));
    let between = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    for x in 2..=5 {
        pg.psql(&format!("insert into marker values ({x})"));
    }
    let committed = lsn(&pg.psql("select pg_current_wal_flush_lsn()"));
    let walfile = current_walfile(&pg);
    let server_wal = std::fs::read(pg.wal_dir().join(&walfile)).unwrap();

    // wal-fetch of the segment being received, while the streamer writes it: exactly the
    // recorded durable prefix, identical to the server's WAL, zeros after it (never a torn
    // page), and it covers every acknowledged commit.
    let (rec_seg, rec_len) = flushed_record(&repo);
    assert_eq!(rec_seg, walfile);
    let seg_start = committed & !((16u64 << 20) - 1);
    assert!(seg_start + rec_len >= committed, "{rec_len} {committed:X}");
    let fetched = dir.join("fetched");
    archiver_ok(&[
        "wal-fetch",
        "--repo",
        r,
        "--prefetch",
        "0",
        &walfile,
        fetched.to_str().unwrap(),
    ]);
    let got = std::fs::read(&fetched).unwrap();
    assert_eq!(
        got.len(),
        16 << 20,
        "served zero-filled to the segment size"
    );
    let n = (committed - seg_start) as usize;
    assert!(
        got[..n] == server_wal[..n],
        "the served prefix is the server's WAL"
    );
    let (_, len_now) = flushed_record(&repo);
    assert!(
        got[len_now as usize..].iter().all(|b| *b == 0),
        "nothing after the durable prefix"
    );

    // The primary is lost: stopped as a crash would, its data directory never read again.
    // The stream reconnects in vain; a service stop (SIGTERM) ends it at once, exit 0 — not
    // after --reconnect-timeout (5 minutes).
    pg.stop_immediate();
    a.wait_log("reconnecting", T);
    std::thread::sleep(Duration::from_millis(500));
    a.signal(libc::SIGTERM);
    let st = a.wait(Duration::from_secs(10));
    assert!(st.success(), "{st:?}\n{}", a.log_text());
    assert!(
        a.log_text().contains("stop requested while reconnecting"),
        "{}",
        a.log_text()
    );
    // Its stage totals: synchronous, so at least one fsync and one status update per commit
    // above, never more fsyncs than batches of messages.
    let log = a.log_text();
    let totals = log
        .lines()
        .find(|l| l.contains("stage totals"))
        .unwrap_or_else(|| panic!("no stage totals:\n{log}"));
    let field = |k: &str| -> u64 {
        let v = totals
            .split(&format!(" {k}="))
            .nth(1)
            .unwrap_or_else(|| panic!("{k}: {totals}"));
        v.split_whitespace().next().unwrap().parse().unwrap()
    };
    assert!(field("fsyncs") >= 6, "{totals}");
    assert!(field("status_updates") >= field("fsyncs"), "{totals}");
    assert!(field("batches") >= field("fsyncs"), "{totals}");
    // The longest single step is part of its stage's total.
    assert!(field("slowest_fsync_ms") <= field("fsync_ms"), "{totals}");
    assert!(field("slowest_write_ms") <= field("write_ms"), "{totals}");
    assert!(field("slowest_queue_ms") <= field("queue_ms"), "{totals}");
    assert!(
        field("wal_bytes") > 0 && field("messages") >= field("batches"),
        "{totals}"
    );

    // The plan says the WAL ends in the spool's partial segment, and how far it reaches.
    let plan = restore(r, &dir.join("dry"), &["--dry-run", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let last = v["segments"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["name"], walfile.as_str(), "{plan}");
    assert_eq!(last["partial"], true, "{plan}");
    assert_eq!(last["source"]["kind"], "spool_tail", "{plan}");
    assert!(
        lsn(v["partial_reaches"].as_str().unwrap()) >= committed,
        "{plan}"
    );
    let text = restore(r, &dir.join("dry"), &["--dry-run"]);
    assert!(
        text.contains("ends in partial segment") && text.contains("local spool"),
        "{text}"
    );

    // Latest: every acknowledged commit.
    let latest = dir.join("latest");
    restore(r, &latest, &[]);
    let mut restored = start_recovering(&dir, "latest", latest, None);
    assert_eq!(
        restored.psql("select string_agg(x::text, ',' order by x) from marker"),
        "1,2,3,4,5"
    );
    restored.stop();
    // A time between two commits inside the partial segment stops between them.
    let at = dir.join("at-time");
    restore(r, &at, &["--target-time", &between]);
    let at_time = start_recovering(&dir, "at-time", at, None);
    assert_eq!(
        at_time.psql("select string_agg(x::text, ',' order by x) from marker"),
        "1"
    );
}

#[test]
fn without_synchronous_everything_up_to_the_last_fsync() {
    let dir = TestDir::new();
    let repo = dir.join("repo");
    let r = repo.to_str().unwrap();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::stream(
        &dir,
        "stream",
        // A fast zstd level (negative): what it archives reads back like any other.
        &[
            "--repo",
            r,
            "-d",
            &ci,
            "--fsync-interval",
            "200ms",
            "--compress-level",
            "-3",
        ],
    );
    archiver_ok(&["backup", "--repo", r, "-d", &ci, "--checkpoint", "fast"]);
    pg.psql("create table marker as select 7 as x");
    let committed = lsn(&pg.psql("select pg_current_wal_flush_lsn()"));
    let walfile = current_walfile(&pg);
    // After the fsync interval the commit is durable in the spool.
    wait_until("the commit is fsync'd in the spool", T, || {
        try_flushed_record(&repo).is_some_and(|(seg, len)| {
            seg == walfile && (committed & !((16u64 << 20) - 1)) + len >= committed
        })
    });
    pg.stop_immediate();
    a.kill9();
    let latest = dir.join("latest");
    restore(r, &latest, &[]);
    let restored = start_recovering(&dir, "latest", latest, None);
    assert_eq!(restored.psql("select x from marker"), "7");
}
