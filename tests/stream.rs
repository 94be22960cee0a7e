//! `archiver stream` against real PostgreSQL clusters.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn stream_args<'a>(repo: &'a str, conninfo: &'a str) -> Vec<&'a str> {
    vec!["--repo", repo, "-d", conninfo, "--progress-interval", "1s"]
}

/// Writes some WAL, switches segment, and waits until the repository holds the finished segment.
fn switch_and_wait(pg: &Pg, repo: &std::path::Path) -> String {
    pg.psql("create table if not exists filler(x int); insert into filler select generate_series(1,1000)");
    let name = current_walfile(pg);
    pg.psql("select pg_switch_wal()");
    wait_archived(repo, &name, T);
    name
}

/// A started cluster (with `conf` appended) and where its repository goes.
struct Setup {
    // Destructure with `dir` first: locals drop in reverse, so the cluster stops before its
    // directory is removed.
    pg: Pg,
    repo: std::path::PathBuf,
    repo_s: String,
    ci: String,
    dir: TestDir,
}

fn setup(conf: &str) -> Setup {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", conf, "");
    pg.start();
    let repo = dir.join("repo");
    let repo_s = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    Setup {
        pg,
        repo,
        repo_s,
        ci,
        dir,
    }
}

#[test]
fn segments_are_byte_identical_after_pgbench() {
    let Setup {
        dir,
        pg,
        repo,
        repo_s,
        ci,
    } = setup("");
    let mut a = Archiver::stream(&dir, "stream", &stream_args(&repo_s, &ci));

    pg.pgbench(&["-i", "-s", "3", "-q"]);
    // A lost connection (the walsender terminated) is retried, and streaming resumes.
    pg.psql("select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = 'archiver'");
    a.wait_log("reconnecting", T);
    wait_until("a second streaming start", T, || {
        a.log_text().matches("streaming started").count() >= 2
    });
    pg.pgbench(&["-c", "2", "-j", "2", "-T", "3"]);
    switch_and_wait(&pg, &repo);

    let compared = assert_segments_match(&repo, 1, &pg.wal_dir());
    assert!(compared >= 3, "only {compared} segments compared");
    // The repository records its cluster.
    let meta = std::fs::read_to_string(repo.join("repo.json")).unwrap();
    let sysid = pg.psql("select system_identifier from pg_control_system()");
    assert!(
        meta.contains(&format!("\"system_identifier\": \"{sysid}\"")),
        "{meta}"
    );
    // Progress lines are logged; the slot is ours and physical.
    a.wait_log("progress", T);
    assert_eq!(
        pg.psql("select slot_type from pg_replication_slots where slot_name = 'archiver'"),
        "physical"
    );
    assert_eq!(
        pg.psql("select application_name from pg_stat_replication"),
        "archiver"
    );

    // SIGTERM: clean exit, lock released, final flush reported.
    let st = a.term();
    assert!(st.success(), "exit {st}:\n{}", a.log_text());
    assert!(a.log_text().contains("final status sent"));
    let slot_lsn =
        pg.psql("select restart_lsn from pg_replication_slots where slot_name='archiver'");
    assert!(!slot_lsn.is_empty());
}

#[test]
fn kill_9_mid_load_resumes_without_gap_or_duplicate() {
    let Setup {
        dir,
        pg,
        repo,
        repo_s,
        ci,
    } = setup("");
    pg.pgbench(&["-i", "-s", "1", "-q"]);

    let mut a = Archiver::stream(&dir, "stream1", &stream_args(&repo_s, &ci));
    // Load in the background while we kill the archiver twice.
    let mut load = pg.pgbench_background(&["-c", "2", "-T", "6"]);
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        a.kill9();
        std::thread::sleep(Duration::from_millis(300));
        a = Archiver::stream(
            &dir,
            &format!("stream{}", round + 2),
            &stream_args(&repo_s, &ci),
        );
        assert!(a.log_text().contains("resumed=true"), "{}", a.log_text());
    }
    assert!(load.wait().unwrap().success());
    switch_and_wait(&pg, &repo);
    let compared = assert_segments_match(&repo, 1, &pg.wal_dir());
    assert!(compared >= 2, "only {compared} compared");
    // No leftovers: the spool holds at most the one segment being received.
    let spool: Vec<_> = std::fs::read_dir(repo.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n != "stream.lock"
                && n != "stream.next"
                && n != "stream.flushed"
                && !n.starts_with(".next-segment.")
        })
        .collect();
    assert!(
        spool.len() <= 1 && spool.iter().all(|n| n.ends_with(".partial")),
        "{spool:?}"
    );
    assert!(a.term().success());
}

#[test]
fn synchronous_standby_commits_complete_and_are_durable() {
    let Setup {
        dir,
        pg,
        repo,
        repo_s,
        ci,
    } = setup("synchronous_standby_names = 'archiver'\n");
    let mut args = stream_args(&repo_s, &ci);
    args.push("--synchronous");
    let mut a = Archiver::stream(&dir, "stream", &args);
    a.wait_log(BLOCKING_LOOP, T);
    wait_until("archiver to be the sync standby", T, || {
        pg.psql("select sync_state from pg_stat_replication where application_name='archiver'")
            == "sync"
    });
    // Commits complete (they would hang if the archiver never confirmed the flush).
    pg.psql("set statement_timeout = '20s'; create table t(x int); insert into t select generate_series(1, 10000)");
    let lsn = pg.psql("select pg_current_wal_lsn() - '0/0'::pg_lsn");
    let flush: u64 = pg
        .psql("select flush_lsn - '0/0'::pg_lsn from pg_stat_replication where application_name='archiver'")
        .parse()
        .unwrap();
    let lsn: u64 = lsn.parse().unwrap();
    assert!(
        flush >= lsn - 200,
        "flush {flush} well behind the commit {lsn}"
    );
    // Everything acknowledged is on disk in the repository, even after kill -9.
    a.kill9();
    let seg = (flush - 1) / (16 << 20);
    let name = format!("00000001{:08X}{:08X}", seg / 256, seg % 256);
    let partial = repo.join("spool").join(format!("{name}.partial"));
    let raw = match std::fs::read(&partial) {
        Ok(r) => r,
        Err(_) => {
            archived_segments(&repo, 1)
                .into_iter()
                .find(|(n, _)| *n == name)
                .expect("segment held")
                .1
        }
    };
    let upto = (flush % (16 << 20)) as usize;
    let server = std::fs::read(pg.wal_dir().join(&name)).unwrap();
    assert!(
        raw.len() >= upto,
        "spool holds {} bytes, flush reported {upto}",
        raw.len()
    );
    assert!(
        raw[..upto] == server[..upto],
        "acknowledged WAL differs from the server's"
    );
}

#[test]
fn promotion_archives_new_timeline_and_history() {
    promotion_case(false);
}

/// The same through the synchronous stream's loop, which blocks its own thread on the
/// socket: across the end of a timeline and a stop request.
#[test]
fn promotion_archives_new_timeline_and_history_as_a_synchronous_stream() {
    promotion_case(true);
}

fn promotion_case(synchronous: bool) {
    let dir = TestDir::new();
    let mut primary = Pg::create(&dir, "primary", "", "");
    primary.start();
    primary.psql("create table before_promo as select generate_series(1,1000) x");
    let standby = Pg::standby_of(&dir, "standby", &primary);

    let repo = dir.join("repo");
    let repo_s = repo.to_str().unwrap().to_string();
    let ci = standby.conninfo("postgres");
    let mut args = stream_args(&repo_s, &ci);
    if synchronous {
        args.push("--synchronous");
    }
    let mut a = Archiver::stream(&dir, "stream", &args);
    primary.psql("insert into before_promo select generate_series(1,50000)");
    let name = current_walfile(&primary);
    primary.psql("select pg_switch_wal()");
    wait_archived(&repo, &name, T);

    primary.stop();
    standby.promote();
    standby.psql("create table after_promo as select generate_series(1,1000) x");
    let name2 = current_walfile(&standby);
    assert!(name2.starts_with("00000002"), "{name2}");
    standby.psql("select pg_switch_wal()");
    wait_archived(&repo, &name2, T);
    a.wait_log("end of timeline", T);

    // The history file is archived and matches the server's.
    let hist =
        std::fs::read(repo.join("wal/history/00000002.history.zst")).expect("history archived");
    let (raw, _) = archiver::decode_bytes(&hist).unwrap();
    assert_eq!(
        raw,
        std::fs::read(standby.wal_dir().join("00000002.history")).unwrap()
    );
    // wal-fetch serves it as restore_command would ask for it.
    let dest = dir.join("fetched.history");
    archiver_ok(&[
        "wal-fetch",
        "--repo",
        &repo_s,
        "00000002.history",
        dest.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&dest).unwrap(), raw);
    // New-timeline segments are identical to the new primary's.
    assert!(assert_segments_match(&repo, 2, &standby.wal_dir()) >= 1);
    assert!(assert_segments_match(&repo, 1, &standby.wal_dir()) >= 1);
    // The old timeline's last segment is kept as a partial: exactly the WAL up to the switch
    // point, identical to the prefix of the server's own `.partial` file.
    let hist_text = String::from_utf8(raw).unwrap();
    let switch: archiver::Lsn = hist_text
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let seg = archiver::SegmentName::containing(1, switch, 16 << 20);
    let obj = std::fs::read(repo.join(format!("wal/00000001/{seg}.partial.zst")))
        .expect("old timeline partial archived");
    let (partial, _) = archiver::decode_bytes(&obj).unwrap();
    assert_eq!(partial.len() as u64, switch.segment_offset(16 << 20));
    let server = std::fs::read(standby.wal_dir().join(format!("{seg}.partial")))
        .or_else(|_| std::fs::read(standby.wal_dir().join(seg.to_string())))
        .expect("the server still has the old timeline's last segment");
    assert!(
        server[..partial.len()] == partial[..],
        "partial differs from the server's"
    );
    let t = std::time::Instant::now();
    assert!(a.term().success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        a.log_text().contains(BLOCKING_LOOP),
        synchronous,
        "{}",
        a.log_text()
    );
}

/// What a synchronous stream logs when its loop blocks its own thread on the socket.
const BLOCKING_LOOP: &str = "blocking on its socket";

#[test]
fn wal_gone_from_the_server_stops_with_exit_3() {
    let dir = TestDir::new();
    // Keep as little WAL as the server allows, so removed segments are really gone.
    let mut pg = Pg::create(
        &dir,
        "pg",
        "wal_keep_size = 0\nmax_wal_size = '32MB'\nmin_wal_size = '32MB'\n",
        "",
    );
    pg.start();
    let repo = dir.join("repo");
    let repo_s = repo.to_str().unwrap().to_string();
    let ci = pg.conninfo("postgres");
    let mut a = Archiver::stream(&dir, "stream1", &stream_args(&repo_s, &ci));
    switch_and_wait(&pg, &repo);
    assert!(a.term().success());

    // While archiver is down, its slot is dropped and the server recycles the WAL it would need.
    pg.psql("select pg_drop_replication_slot('archiver')");
    for _ in 0..4 {
        pg.psql("insert into filler select generate_series(1, 20000); select pg_switch_wal()");
        pg.psql("checkpoint");
    }
    let before = std::fs::read_dir(repo.join("wal/00000001"))
        .unwrap()
        .count();
    let mut a = Archiver::spawn_stream(&dir, "stream2", &stream_args(&repo_s, &ci));
    let st = a.wait(T);
    let log = a.log_text();
    assert_eq!(st.code(), Some(3), "{log}");
    assert!(log.contains("no longer available on the server"), "{log}");
    // Nothing was archived past the hole.
    assert_eq!(
        std::fs::read_dir(repo.join("wal/00000001"))
            .unwrap()
            .count(),
        before
    );
}

#[test]
fn damaged_wal_from_the_server_is_refused() {
    let Setup {
        dir,
        pg,
        repo,
        repo_s,
        ci,
    } = setup("");
    let mut a = Archiver::stream(&dir, "stream1", &stream_args(&repo_s, &ci));
    switch_and_wait(&pg, &repo);
    assert!(a.term().success());

    // While archiver is down, a segment completes on the server and is then damaged in pg_wal
    // (the walsender sends what the file holds): a page address that does not match.
    pg.psql("insert into filler select generate_series(1, 20000)");
    let name = current_walfile(&pg);
    pg.psql("select pg_switch_wal()");
    let path = pg.wal_dir().join(&name);
    let mut wal = std::fs::read(&path).unwrap();
    wal[2 * 8192 + 9] ^= 0x40; // xlp_pageaddr of the third page
    std::fs::write(&path, &wal).unwrap();

    let mut a = Archiver::spawn_stream(&dir, "stream2", &stream_args(&repo_s, &ci));
    let st = a.wait(T);
    let log = a.log_text();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        log.contains("refusing to archive invalid WAL") && log.contains("xlp_pageaddr"),
        "{log}"
    );
    assert!(
        !repo.join(format!("wal/00000001/{name}.zst")).exists(),
        "the damaged segment must not be archived"
    );
}
