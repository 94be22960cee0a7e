//! `archiver verify` against a real repository: clean, then one fault at a time — a flipped
//! byte in a WAL object, in a backup archive, a removed segment, a truncated manifest — each
//! named, each failing with exit 1, and the result recorded in the catalog.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn verify(s: &Streaming, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut args = vec!["verify", "--repo", &s.r, "--json"];
    args.extend_from_slice(extra);
    let out = archiver(&args);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), report, err)
}

/// Changes a file and puts it back when dropped.
struct Damage {
    path: PathBuf,
    original: Vec<u8>,
}

impl Damage {
    fn flip(path: &Path) -> Damage {
        let original = std::fs::read(path).unwrap();
        let mut bad = original.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x01;
        std::fs::write(path, bad).unwrap();
        Damage {
            path: path.to_path_buf(),
            original,
        }
    }

    fn truncate(path: &Path) -> Damage {
        let original = std::fs::read(path).unwrap();
        std::fs::write(path, &original[..original.len() / 2]).unwrap();
        Damage {
            path: path.to_path_buf(),
            original,
        }
    }

    fn remove(path: &Path) -> Damage {
        let original = std::fs::read(path).unwrap();
        std::fs::remove_file(path).unwrap();
        Damage {
            path: path.to_path_buf(),
            original,
        }
    }
}

impl Drop for Damage {
    fn drop(&mut self) {
        std::fs::write(&self.path, &self.original).unwrap();
    }
}

fn problems(report: &serde_json::Value, id: &str) -> String {
    report["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .map(|b| b["problems"].to_string())
        .unwrap_or_default()
}

#[test]
fn verify_names_every_kind_of_damage() {
    let s = Streaming::start("", &[]);
    let switch = || {
        s.pg.psql("insert into t select generate_series(1, 20000)");
        let name = current_walfile(&s.pg);
        s.pg.psql("select pg_switch_wal()");
        wait_archived(&s.repo, &name, T);
        name
    };
    s.pg.psql("create table t (x int)");
    switch();
    let a = s.backup();
    let middle = switch();
    switch();
    let b = s.backup();
    switch();

    // Clean: exit 0, every object read, each backup recorded as verified.
    let (code, r, err) = verify(&s, &[]);
    assert_eq!(code, Some(0), "{err}\n{r}");
    assert_eq!(r["ok"], true);
    assert!(r["objects_checked"].as_u64().unwrap() >= 8, "{r}");
    let list: serde_json::Value =
        serde_json::from_str(&archiver_ok(&["list", "--repo", &s.r, "--json"])).unwrap();
    for rec in list.as_array().unwrap() {
        assert_eq!(rec["verified"]["ok"], true, "{rec}");
    }

    // A flipped byte in a WAL object between the backups: named, and A (which needs it) fails.
    let wal_obj = s.repo.join(format!("wal/00000001/{middle}.zst"));
    {
        let _d = Damage::flip(&wal_obj);
        let (code, r, _) = verify(&s, &[]);
        assert_eq!(code, Some(1), "{r}");
        assert_eq!(
            r["damaged"][0]["key"],
            format!("wal/00000001/{middle}.zst"),
            "{r}"
        );
        assert!(problems(&r, &a).contains(&middle), "{r}");
        assert_eq!(problems(&r, &b), "[]", "{r}");
        // One backup alone: B does not need that segment.
        let (code, r, _) = verify(&s, &["--backup", &b]);
        assert_eq!(code, Some(0), "{r}");
        let list: serde_json::Value =
            serde_json::from_str(&archiver_ok(&["list", "--repo", &s.r, "--json"])).unwrap();
        assert_eq!(list[0]["verified"]["ok"], false, "{list}");
    }

    // A flipped byte in B's base archive.
    {
        let _d = Damage::flip(&s.repo.join(format!("backups/{b}/base.tar.zst")));
        let (code, r, _) = verify(&s, &[]);
        assert_eq!(code, Some(1), "{r}");
        assert!(problems(&r, &b).contains("base.tar.zst"), "{r}");
        assert_eq!(problems(&r, &a), "[]", "{r}");
    }

    // A removed segment: the hole is named from LSN to LSN.
    {
        let _d = Damage::remove(&wal_obj);
        let (code, r, _) = verify(&s, &[]);
        assert_eq!(code, Some(1), "{r}");
        let hole = &r["wal_holes"][0];
        assert_eq!(hole["timeline"], 1, "{r}");
        let from: archiver::Lsn = hole["from"].as_str().unwrap().parse().unwrap();
        let to: archiver::Lsn = hole["to"].as_str().unwrap().parse().unwrap();
        assert_eq!(to.0 - from.0, 16 << 20, "{r}");
        assert_eq!(
            archiver::SegmentName::containing(1, from, 16 << 20).to_string(),
            middle
        );
        assert!(problems(&r, &a).contains("is missing"), "{r}");
        let out = archiver(&["verify", "--repo", &s.r]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("missing: WAL from"), "{text}");
    }

    // A flipped byte in a segment's index: named as damaged (exit 1), but no backup needs it
    // to restore (restores read the WAL instead).
    {
        let key = format!("index/00000001/{middle}.zst");
        let _d = Damage::flip(&s.repo.join(&key));
        let (code, r, _) = verify(&s, &[]);
        assert_eq!(code, Some(1), "{r}");
        assert_eq!(r["damaged"][0]["key"], key, "{r}");
        assert_eq!(problems(&r, &a), "[]", "{r}");
    }

    // A truncated manifest.
    {
        let _d = Damage::truncate(&s.repo.join(format!("backups/{a}/backup_manifest.zst")));
        let (code, r, _) = verify(&s, &[]);
        assert_eq!(code, Some(1), "{r}");
        assert!(problems(&r, &a).contains("backup_manifest"), "{r}");
    }

    // Whole again; an unknown backup is bad input.
    let (code, r, err) = verify(&s, &[]);
    assert_eq!(code, Some(0), "{err}\n{r}");
    let (code, _, err) = verify(&s, &["--backup", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("nope"), "{err}");
}
