//! The WAL index against a real server: written beside each segment while streaming, rebuilt
//! identically by `archiver reindex`, and a record whose CRC fails is never indexed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Every index object of `repo`, by file name: its stored bytes.
fn index_objects(repo: &Path) -> BTreeMap<String, Vec<u8>> {
    let dir = repo.join("index/00000001");
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".zst") && !n.starts_with('.') {
                out.insert(n, std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// A segment's index object (not its restore points or drops).
fn is_index(key: &str) -> bool {
    !key.contains(".points") && !key.contains(".drops")
}

fn decoded(obj: &[u8]) -> serde_json::Value {
    let (raw, _) = archiver::decode_bytes(obj).expect("index object verifies");
    serde_json::from_slice(&raw).unwrap()
}

#[test]
fn streaming_indexes_every_segment_and_reindex_rebuilds_the_same() {
    let mut s = Streaming::start("", &[]);
    s.backup();
    // A second streamer of the same WAL, without the index.
    let plain = s.dir.join("plain");
    let p = plain.to_str().unwrap().to_string();
    let mut plain_streamer = Archiver::stream(
        &s.dir,
        "plain",
        &["--repo", &p, "-d", &s.ci, "--slot", "plain", "--no-index"],
    );
    s.pg.pgbench(&["-i", "-s", "2", "-q"]);
    s.pg.pgbench(&["-T", "3", "-c", "2"]);
    let rp: archiver::Lsn =
        s.pg.psql("select pg_create_restore_point('index_me')")
            .parse()
            .unwrap();
    let rp_seg = s.pg.psql(&format!("select pg_walfile_name('{rp}')"));
    s.pg.pgbench(&["-T", "1", "-c", "2"]);
    let last = current_walfile(&s.pg);
    s.pg.psql("select pg_switch_wal()");
    s.pg.psql("select 1"); // a record after the switch
    wait_archived(&s.repo, &last, Duration::from_secs(60));
    wait_archived(&plain, &last, Duration::from_secs(60));
    assert!(s.streamer.term().success());
    assert!(plain_streamer.term().success());

    let segments = archived_segments(&s.repo, 1);
    let streamed = index_objects(&s.repo);
    // One index per complete segment, and a restore-point object for the right one.
    for (name, _) in &segments {
        assert!(
            streamed.contains_key(&format!("{name}.zst")),
            "no index for {name}: {:?}",
            streamed.keys()
        );
    }
    let points: Vec<&String> = streamed.keys().filter(|k| k.contains(".points")).collect();
    assert_eq!(points, vec![&format!("{rp_seg}.points.zst")]);
    let rps = decoded(&streamed[&format!("{rp_seg}.points.zst")]);
    assert_eq!(rps[0]["name"], "index_me");
    assert_eq!(rps[0]["end"], rp.to_string());
    // The commits of the run are there, in WAL order.
    let mut commits = 0;
    let mut last_end = 0u64;
    for (name, obj) in streamed.iter().filter(|(k, _)| is_index(k)) {
        let seg = archiver::SegmentName::parse(name.trim_end_matches(".zst"), 16 << 20).unwrap();
        let (raw, _) = archiver::decode_bytes(obj).expect("index object verifies");
        let ix = archiver::SegmentIndex::decode(&raw, &seg).unwrap();
        for e in &ix.xacts.end {
            assert!(*e > last_end);
            last_end = *e;
        }
        commits += ix.xacts.len();
    }
    // Each pgbench transaction committed one row of pgbench_history.
    let done: usize =
        s.pg.psql("select count(*) from pgbench_history")
            .parse()
            .unwrap();
    assert!(
        done > 500 && commits >= done,
        "{commits} transaction ends, {done} pgbench transactions"
    );

    // The repository streamed without the index has none; reindexed, it has the same (but for
    // its first segment, whose first record began before that streamer's start).
    assert!(!plain.join("index").exists() && !plain.join("relmaps").exists());
    archiver_ok(&["reindex", "--repo", &p]);
    let plain_ix = index_objects(&plain);
    assert!(plain_ix.len() >= 3, "{:?}", plain_ix.keys());
    let first = plain_ix.keys().next().unwrap()[..24].to_string();
    for (k, v) in plain_ix.iter().filter(|(k, _)| !k.starts_with(&first)) {
        assert!(
            streamed.get(k) == Some(v),
            "{k} differs from the indexed stream's"
        );
    }
    // Without the index objects, reindex rebuilds them byte for byte.
    std::fs::remove_dir_all(s.repo.join("index")).unwrap();
    let out = archiver_ok(&["reindex", "--repo", &s.r, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["indexed"], segments.len());
    assert_eq!(r["restore_points"], 1);
    let rebuilt = index_objects(&s.repo);
    assert_eq!(
        rebuilt.keys().collect::<Vec<_>>(),
        streamed.keys().collect::<Vec<_>>()
    );
    for (k, v) in &streamed {
        assert!(rebuilt[k] == *v, "{k} differs after reindex");
    }
    // Nothing left to do; --force rebuilds the same again.
    let r: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["reindex", "--repo", &s.r, "--json"])).unwrap();
    assert_eq!(
        (r["indexed"].as_u64(), r["skipped_indexed"].as_u64()),
        (Some(0), Some(segments.len() as u64))
    );
    archiver_ok(&["reindex", "--repo", &s.r, "--force"]);
    assert_eq!(index_objects(&s.repo), streamed);

    // A record damaged inside a segment (its object re-sealed, so only the record's own
    // CRC-32C can tell): reindex refuses that segment, names it, and exits 1.
    let (name, raw) = &segments[segments.len() / 2];
    let mut bad = raw.clone();
    let at = bad.len() / 2 + 1000;
    bad[at] ^= 0x55;
    let mut obj = Vec::new();
    archiver::encode_object(&bad[..], &mut obj, archiver::ObjectKind::WalSegment, 1).unwrap();
    std::fs::write(s.repo.join(format!("wal/00000001/{name}.zst")), obj).unwrap();
    let out = archiver(&["reindex", "--repo", &s.r, "--force"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("NOT INDEXED: {name}")) && text.contains("CRC-32C"),
        "{text}"
    );
    // A restore's dry run reads every record of its WAL: refused, naming the segment.
    let dest = s.dir.join("dry");
    let out = archiver(&[
        "restore",
        "--repo",
        &s.r,
        "--pgdata",
        dest.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("WAL segment {name}")) && err.contains("CRC-32C"),
        "{err}"
    );
    assert!(!dest.exists());
}

/// A dry run finds time, transaction and restore-point targets through the index, and names
/// the transactions on either side of each.
#[test]
fn dry_run_locates_targets_through_the_index() {
    let s = Streaming::start("autovacuum = off\n", &[]);
    s.pg.psql("create table mark (x int)");
    s.backup();
    s.pg.pgbench(&["-i", "-s", "2", "-q"]);
    s.pg.pgbench(&["-T", "2", "-c", "2"]);
    let xid = |sql: &str| -> u64 {
        let out =
            s.pg.psql(&format!("begin; {sql}; select txid_current(); commit;"));
        out.lines().find_map(|l| l.parse().ok()).unwrap()
    };
    let x = xid("insert into mark values (1)");
    std::thread::sleep(Duration::from_millis(100));
    let t = s.pg.psql(
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(100));
    let y = xid("insert into mark values (2)");
    s.pg.psql("select pg_create_restore_point('after_y')");
    let z = xid("insert into mark values (3)");
    s.pg.psql("checkpoint"); // a running-xacts snapshot after them
    s.pg.pgbench(&["-T", "2", "-c", "2"]);
    let last = current_walfile(&s.pg);
    s.pg.psql("select pg_switch_wal()");
    wait_archived(&s.repo, &last, Duration::from_secs(60));

    let dry = |target: &[&str]| -> serde_json::Value {
        let dest = s.dir.join(&format!("dry{}", unique()));
        let d = dest.to_str().unwrap();
        let mut args = vec![
            "restore",
            "--repo",
            &s.r,
            "--pgdata",
            d,
            "--dry-run",
            "--json",
        ];
        args.extend_from_slice(target);
        let v: serde_json::Value = serde_json::from_str(&archiver_ok(&args)).unwrap();
        v["located"].clone()
    };
    let xid_of = |v: &serde_json::Value| v["xid"].as_u64().unwrap();
    // A time between x and y: x is the last applied, y the first not.
    let l = dry(&["--target-time", &t]);
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (x, y),
        "{l}"
    );
    assert!(l["index_objects_read"].as_u64().unwrap() >= 1, "{l}");
    // Transaction y: applied (inclusive), z next; exclusive: x applied, y not.
    let l = dry(&["--target-xid", &y.to_string()]);
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (y, z),
        "{l}"
    );
    assert_eq!(l["wal_segments_decoded"], 0, "{l}");
    let l = dry(&["--target-xid", &y.to_string(), "--exclusive"]);
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (x, y),
        "{l}"
    );
    // --before-xid is the same as --target-xid with --exclusive.
    let l = dry(&["--before-xid", &y.to_string()]);
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (x, y),
        "{l}"
    );
    // The restore point: from its own object and its segment's index (two reads, no WAL).
    let l = dry(&["--target-name", "after_y"]);
    assert_eq!(l["restore_point"]["name"], "after_y");
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (y, z),
        "{l}"
    );
    assert_eq!(
        (
            l["index_objects_read"].as_u64(),
            l["wal_segments_decoded"].as_u64()
        ),
        (Some(2), Some(0)),
        "{l}"
    );
    // A damaged index object is not trusted: the WAL is read in its place, same answer.
    let seg_of_y = s.pg.psql(&format!(
        "select pg_walfile_name('{}')",
        l["last_applied"]["end"].as_str().unwrap()
    ));
    let ix_path = s.repo.join(format!("index/00000001/{seg_of_y}.zst"));
    let mut obj = std::fs::read(&ix_path).unwrap();
    obj[10] ^= 0x01;
    std::fs::write(&ix_path, obj).unwrap();
    let l = dry(&["--target-xid", &y.to_string()]);
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (y, z),
        "{l}"
    );
    assert!(l["wal_segments_decoded"].as_u64().unwrap() >= 1, "{l}");
    // Without the index, the same answers from the WAL itself.
    std::fs::remove_dir_all(s.repo.join("index")).unwrap();
    let l = dry(&["--target-time", &t]);
    assert_eq!(
        (xid_of(&l["last_applied"]), xid_of(&l["first_not_applied"])),
        (x, y),
        "{l}"
    );
    assert_eq!(l["index_objects_read"], 0);
    assert!(l["wal_segments_decoded"].as_u64().unwrap() >= 1);
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The state of a table restored by --before-drop is the one it had at the drop.
fn count(pg: &Pg, db: &str, table: &str) -> u64 {
    pg.psql_db(db, &format!("select count(*) from {table}"))
        .parse()
        .unwrap()
}

fn now_utc(pg: &Pg) -> archiver::Timestamp {
    pg.psql(
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .parse()
    .unwrap()
}

/// Under pgbench load, a table dropped in a second database and another truncated: `events`
/// names both with their transactions and times, and `restore --before-drop` brings each back
/// with the rows it had, every other table as it was at that instant.
#[test]
fn drops_and_truncates_under_load_are_named_and_undone() {
    let s = Streaming::start("", &[]);
    s.pg.psql("create database shop");
    s.pg.psql_db(
        "shop",
        "create table orders (id int primary key, item text); \
         insert into orders select g, 'item ' || g from generate_series(1, 5000) g; \
         create table carts (id int); insert into carts select generate_series(1, 300)",
    );
    s.pg.psql("create database scratch");
    s.pg.psql_db(
        "scratch",
        "create table notes (x int); insert into notes select generate_series(1, 77)",
    );
    s.pg.pgbench(&["-i", "-s", "2", "-q"]);
    s.backup();
    let mut load = s.pg.pgbench_background(&["-T", "10", "-c", "2"]);
    // At a random moment under load: the drop, bracketed by the history's size and the clock.
    std::thread::sleep(Duration::from_millis(1500 + fastrand::u64(0..2000)));
    let xid_of = |out: String| -> u32 { out.lines().find_map(|l| l.parse().ok()).unwrap() };
    let (h1, t1) = (count(&s.pg, "postgres", "pgbench_history"), now_utc(&s.pg));
    let drop_xid = xid_of(s.pg.psql_db(
        "shop",
        "begin; drop table orders; select txid_current(); commit;",
    ));
    let (t2, h2) = (now_utc(&s.pg), count(&s.pg, "postgres", "pgbench_history"));
    std::thread::sleep(Duration::from_millis(1000));
    s.pg.psql_db("shop", "insert into carts select generate_series(301, 350)");
    let trunc_xid = xid_of(s.pg.psql_db(
        "shop",
        "begin; truncate carts; select txid_current(); commit;",
    ));
    assert!(load.wait().unwrap().success());
    s.pg.psql("drop database scratch");
    let last = current_walfile(&s.pg);
    s.pg.psql("select pg_switch_wal()");
    wait_archived(&s.repo, &last, Duration::from_secs(60));

    // Drops objects only for the segments whose transactions removed files.
    let all = index_objects(&s.repo);
    let drops = all.keys().filter(|k| k.contains(".drops")).count();
    let indexes = all.keys().filter(|k| is_index(k)).count();
    assert!(
        drops >= 1 && drops < indexes,
        "{drops} drops objects for {indexes} segments"
    );
    let out = archiver_ok(&["events", "--repo", &s.r, "--database", "shop", "--json"]);
    let ev: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ev["commits"].as_u64().unwrap() > 100, "{ev}");
    let rel = |table: &str| -> serde_json::Value {
        ev["relations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["table"] == table)
            .unwrap_or_else(|| panic!("no event for {table}: {ev}"))
            .clone()
    };
    let dropped = rel("public.orders");
    assert_eq!(dropped["change"], "dropped", "{dropped}");
    assert_eq!(dropped["database"], "shop");
    assert_eq!(dropped["xid"], drop_xid);
    let at: archiver::Timestamp = dropped["time"].as_str().unwrap().parse().unwrap();
    assert!(
        t1 <= at && at <= t2,
        "dropped at {at}, between {t1} and {t2}"
    );
    let truncated = rel("public.carts");
    assert_eq!(truncated["change"], "truncated_or_rewritten", "{truncated}");
    assert_eq!(truncated["xid"], trunc_xid);
    // Only shop's tables with --database shop; none of pgbench's.
    assert!(ev["relations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["database"] == "shop"));
    // A window after the drop holds the truncate only; one ending before it, neither.
    let window = |from: &str, to: &str| -> Vec<String> {
        let mut args = vec!["events", "--repo", &s.r, "--database", "shop", "--json"];
        if !from.is_empty() {
            args.extend(["--from", from]);
        }
        if !to.is_empty() {
            args.extend(["--to", to]);
        }
        let v: serde_json::Value = serde_json::from_str(&archiver_ok(&args)).unwrap();
        v["relations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["table"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(window(&t2.to_string(), ""), vec!["public.carts"]);
    assert!(window("", &t1.to_string()).is_empty());
    let text = archiver_ok(&["events", "--repo", &s.r]);
    assert!(
        text.contains("DROP public.orders (database shop)"),
        "{text}"
    );

    // Just before the drop: orders whole, carts before its later rows, pgbench's history
    // exactly as far as it had come.
    let restore = |name: &str, args: &[&str]| -> Pg {
        let pgdata = s.dir.join(name);
        let mut all = vec![
            "restore",
            "--repo",
            &s.r,
            "--pgdata",
            pgdata.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let out = archiver(&all);
        let out = succeeded(out, "restore --before-drop");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("recovering to just before"), "{err}");
        start_recovering(&s.dir, name, pgdata, None)
    };
    let r = restore(
        "undrop",
        &["--before-drop", "public.orders", "--database", "shop"],
    );
    assert_eq!(count(&r, "shop", "orders"), 5000);
    assert_eq!(count(&r, "shop", "carts"), 300);
    let h = count(&r, "postgres", "pgbench_history");
    assert!(h1 <= h && h <= h2, "history {h}, between {h1} and {h2}");
    drop(r);
    // Just before the truncate (a bare name is public's): carts with all its rows, orders gone.
    let r = restore("untruncate", &["--before-drop", "carts"]);
    assert_eq!(count(&r, "shop", "carts"), 350);
    assert_eq!(
        r.psql_db(
            "shop",
            "select count(*) from pg_class where relname = 'orders'"
        ),
        "0"
    );
    drop(r);
    // DROP DATABASE: in events by name, and undone (after the truncate, which stays).
    let ev: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["events", "--repo", &s.r, "--json"])).unwrap();
    let dbs = ev["databases"].as_array().unwrap();
    assert_eq!(dbs.len(), 1, "{ev}");
    assert_eq!(dbs[0]["database"], "scratch", "{ev}");
    assert!(dbs[0]["invalidated"].is_string(), "{ev}");
    let r = restore("undropdb", &["--before-drop-database", "scratch"]);
    assert_eq!(count(&r, "scratch", "notes"), 77);
    assert_eq!(count(&r, "shop", "carts"), 0);
}

fn relmap_count(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("relmaps"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

/// A table created after the last backup, truncated (a new file) and then dropped: the
/// streamer's name snapshots follow it, so both events carry its name.
#[test]
fn names_follow_ddl_while_streaming() {
    let mut s = Streaming::start("", &[]);
    wait_until(
        "the stream's first name snapshot",
        Duration::from_secs(30),
        || relmap_count(&s.repo) >= 1,
    );
    s.backup();
    let snapshots = relmap_count(&s.repo);
    let switch = |s: &Streaming| {
        let name = current_walfile(&s.pg);
        s.pg.psql("select pg_switch_wal()");
        wait_archived(&s.repo, &name, Duration::from_secs(60));
    };
    s.pg.psql("create table late (x int); insert into late select generate_series(1, 100)");
    switch(&s);
    wait_until(
        "a snapshot naming the new table",
        Duration::from_secs(40),
        || relmap_count(&s.repo) > snapshots,
    );
    s.pg.psql("truncate late; insert into late values (1)");
    switch(&s);
    wait_until(
        "a snapshot naming its new file",
        Duration::from_secs(40),
        || relmap_count(&s.repo) > snapshots + 1,
    );
    let out =
        s.pg.psql("begin; drop table late; select txid_current(); commit;");
    let drop_xid: u64 = out.lines().find_map(|l| l.parse().ok()).unwrap();
    switch(&s);
    assert!(s.streamer.term().success());
    let ev: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["events", "--repo", &s.r, "--json"])).unwrap();
    let late: Vec<(String, u64)> = ev["relations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["table"] == "public.late")
        .map(|r| {
            (
                r["change"].as_str().unwrap().to_string(),
                r["xid"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(late.len(), 2, "{ev}");
    assert_eq!(late[0].0, "truncated_or_rewritten", "{ev}");
    assert_eq!(late[1], ("dropped".to_string(), drop_xid), "{ev}");
    // --before-drop picks the newest (the drop) and lists the other.
    let dest = s.dir.join("dry");
    let out = archiver(&[
        "restore",
        "--repo",
        &s.r,
        "--pgdata",
        dest.to_str().unwrap(),
        "--before-drop",
        "late",
        "--dry-run",
    ]);
    let out = succeeded(out, "restore --before-drop --dry-run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "just before DROP public.late (database postgres) by transaction {drop_xid}"
        )),
        "{err}"
    );
    assert!(
        err.contains("earlier: TRUNCATE/rewrite public.late"),
        "{err}"
    );
}
