//! PostgreSQL 17+ incremental backups end to end, on PostgreSQL 17 and 18 (the npm builds
//! scripts/test.sh fetches; skipped without them): full → writes → incremental → writes →
//! incremental under a running streamer; each point restored to a time after it through its
//! chain, checked with pg_verifybackup (PostgreSQL 18's, when fetched) and started: data exact;
//! a damaged object in the middle link refuses the restore and leaves nothing; a drill of the
//! newest incremental; retention keeping the newest incremental keeps its chain; and the
//! refusals (summarize_wal off, an unknown parent, a server older than 17), which change
//! nothing.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn json(out: std::process::Output, what: &str) -> serde_json::Value {
    let out = succeeded(out, what);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn backup_json(r: &str, ci: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "backup",
        "--repo",
        r,
        "-d",
        ci,
        "--checkpoint",
        "fast",
        "--json",
    ];
    args.extend_from_slice(extra);
    json(archiver(&args), "archiver backup")
}

fn catalog_len(r: &str) -> usize {
    json(archiver(&["list", "--repo", r, "--json"]), "archiver list")
        .as_array()
        .unwrap()
        .len()
}

/// Writes, then the state and a time after them (a second on each side).
fn checkpoint_in_time(pg: &Pg, round: &str) -> (String, String) {
    pg.psql(&format!(
        "insert into t select g, '{round}' from generate_series(1, 500) g \
         on conflict (id) do update set v = excluded.v"
    ));
    pg.pgbench(&["-t", "100", "-c", "2"]);
    std::thread::sleep(Duration::from_millis(1100));
    let s = accounts_and_t(pg);
    let time = pg.psql("select clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1100));
    (s, time)
}

fn chain_end_to_end(major: u32) {
    let Some(bin) = pg_bin_of_major(major) else {
        eprintln!("skipped: no PostgreSQL {major} binaries (scripts/test.sh fetches them)");
        return;
    };
    let tools = std::env::var("ARCHIVER_TEST_PG18_TOOLS")
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let dir = TestDir::new();
    let mut pg = Pg::create_with_bin(&dir, "pg", "summarize_wal = on\n", &bin);
    pg.start();
    let Streaming {
        mut streamer,
        pg,
        repo,
        r,
        ci,
        dir,
    } = Streaming::on(dir, pg, &[]);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.psql("create table t (id int primary key, v text)");

    // Refusals before there is anything to build on; nothing changes.
    let refused = |extra: &[&str], needle: &str| {
        let mut args = vec!["backup", "--repo", &r, "-d", &ci, "--checkpoint", "fast"];
        args.extend_from_slice(extra);
        let before = std::fs::read_dir(repo.join("backups")).map_or(0, |d| d.count());
        let out = archiver(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{needle:?} in {err}");
        assert!(err.contains("take a full backup"), "{err}");
        assert_eq!(
            std::fs::read_dir(repo.join("backups")).map_or(0, |d| d.count()),
            before
        );
    };
    refused(&["--incremental"], "no complete backup of this cluster");

    // A tablespace the full backup holds and the incrementals no longer do.
    let gone = dir.join("ts-gone");
    std::fs::create_dir(&gone).unwrap();
    chown_pg(&gone);
    pg.psql(&format!(
        "create tablespace gone location '{}'",
        gone.display()
    ));
    pg.psql("create table in_gone tablespace gone as select generate_series(1, 1000) x");
    let full = backup_json(&r, &ci, &[]);
    assert!(full.get("parent").is_none());
    assert_eq!(full["tablespaces"].as_array().unwrap().len(), 1);
    pg.psql("drop table in_gone");
    pg.psql("drop tablespace gone");
    refused(&["--incremental", "--from", "nope"], "no backup nope");
    pg.psql("alter system set summarize_wal = off");
    pg.psql("select pg_reload_conf()");
    refused(&["--incremental"], "summarize_wal = off");
    pg.psql("alter system set summarize_wal = on");
    pg.psql("select pg_reload_conf()");

    let (_, _) = checkpoint_in_time(&pg, "one");
    let inc1 = backup_json(&r, &ci, &["--incremental"]);
    assert_eq!(inc1["parent"], full["id"]);
    let (at2, time2) = checkpoint_in_time(&pg, "two");
    let inc2 = backup_json(&r, &ci, &["--incremental"]);
    assert_eq!(inc2["parent"], inc1["id"]);
    let (at3, time3) = checkpoint_in_time(&pg, "three");
    pg.psql("delete from t where id <= 100");
    let last = pg.psql("select pg_walfile_name(pg_switch_wal())");
    wait_archived(&repo, &last, T);
    // ~1% of the data changed: the incrementals store a fraction of the full backup.
    let stored = |b: &serde_json::Value| b["stored_bytes"].as_u64().unwrap();
    assert!(
        stored(&inc1) * 3 < stored(&full),
        "{} vs {}",
        stored(&inc1),
        stored(&full)
    );
    let text = archiver_ok(&["list", "--repo", &r]);
    assert!(
        text.lines()
            .any(|l| l.starts_with(inc2["id"].as_str().unwrap())
                && l.contains("incremental")
                && l.contains(inc1["id"].as_str().unwrap())),
        "{text}"
    );

    let restore = |name: &str, args: &[&str]| -> (std::process::Output, PathBuf) {
        let pgdata = dir.join(name);
        let mut all = vec![
            "restore".to_string(),
            "--repo".into(),
            r.clone(),
            "--pgdata".into(),
            pgdata.display().to_string(),
            "--pg-bin".into(),
            bin.display().to_string(),
        ];
        if is_root() {
            all.extend(["--owner".into(), "postgres".into()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        (
            archiver(&all.iter().map(String::as_str).collect::<Vec<_>>()),
            pgdata,
        )
    };

    // The dry run shows and checks the whole chain.
    let (out, _) = restore("dry", &["--target-time", &time3, "--dry-run", "--json"]);
    let d: serde_json::Value = json(out, "archiver restore --dry-run");
    let chain: Vec<&str> = d["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        chain,
        [&full["id"], &inc1["id"], &inc2["id"]].map(|v| v.as_str().unwrap())
    );

    // Each point restored through its chain to a time after it: pg_verifybackup passes on
    // the combined directory, and the server started on it has exactly the data of then.
    for (name, time, wanted, via) in [("at2", &time2, &at2, &inc1), ("at3", &time3, &at3, &inc2)] {
        let (out, pgdata) = restore(name, &["--target-time", time.as_str(), "--json"]);
        let done = json(out, "archiver restore");
        assert_eq!(done["backup_id"], via["id"]);
        // (PostgreSQL 18's pg_verifybackup reads only 18's pg_control.)
        if let Some(tools) = tools.as_ref().filter(|_| major == 18) {
            let v = std::process::Command::new(tools.join("pg_verifybackup"))
                .args(["-n", "-q"])
                .arg(&pgdata)
                .output()
                .unwrap();
            must(v, "pg_verifybackup of the combined directory");
        }
        let restored = start_recovering(&dir, name, pgdata, Some(&bin));
        assert_eq!(&accounts_and_t(&restored), wanted, "{name}");
    }

    // The dropped tablespace was neither restored from the full backup nor checked against it.
    assert_eq!(std::fs::read_dir(&gone).unwrap().count(), 0);

    // A drill of the newest (incremental) backup.
    let drill = drill_with(&dir, &r, &bin);
    assert_eq!(drill["passed"], true, "{drill}");

    // The middle link's object damaged: refused, nothing left behind.
    let object = repo
        .join("backups")
        .join(inc1["id"].as_str().unwrap())
        .join("base.tar.zst");
    let good = std::fs::read(&object).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&object, &bad).unwrap();
    let (out, pgdata) = restore("damaged", &["--target-time", &time3]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(inc1["id"].as_str().unwrap()), "{err}");
    assert!(!pgdata.exists(), "nothing left behind");
    std::fs::write(&object, &good).unwrap();

    // Retention keeping only the newest restorable point keeps its whole chain.
    let plan = json(
        archiver(&["expire", "--repo", &r, "--keep-last", "1", "--json"]),
        "archiver expire",
    );
    let kept: Vec<&str> = plan["plan"]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["keep"] == true)
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        kept,
        [&full["id"], &inc1["id"], &inc2["id"]].map(|v| v.as_str().unwrap()),
        "{plan:#}"
    );
    assert_eq!(catalog_len(&r), 3);
    assert!(streamer.term().success());
}

#[test]
fn postgresql_17_incremental_chain() {
    chain_end_to_end(17);
}

#[test]
fn postgresql_18_incremental_chain() {
    chain_end_to_end(18);
}

#[test]
fn incremental_backups_need_postgresql_17() {
    let dir = TestDir::new();
    let mut pg = Pg::create(&dir, "pg", "", "");
    pg.start();
    let r = dir.join("repo");
    let r = r.to_str().unwrap();
    let ci = pg.conninfo("postgres");
    // Into a repository that does not exist yet: refused, and none is initialised.
    let out = archiver(&["backup", "--repo", r, "-d", &ci, "--incremental"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not an archiver repository"), "{err}");
    assert!(!dir.join("repo").join("repo.json").exists());
    archiver_ok(&["backup", "--repo", r, "-d", &ci, "--checkpoint", "fast"]);
    let out = archiver(&["backup", "--repo", r, "-d", &ci, "--incremental"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("need PostgreSQL 17 or newer (the server is 15)"),
        "{err}"
    );
    assert_eq!(catalog_len(r), 1);
}
