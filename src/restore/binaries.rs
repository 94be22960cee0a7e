//! Which PostgreSQL major a set of server binaries or a data directory belongs to, so that a
//! restore or drill refuses, before anything is written, to hand a backup to a server of
//! another major (PostgreSQL cannot start a data directory of another major version: the
//! catalog and the control file differ).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The major version in `postgres --version` output
/// (`postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`, `postgres (PostgreSQL) 17beta1`).
pub(crate) fn version_major(text: &str) -> Option<u32> {
    let v = text.split_whitespace().nth(2)?;
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The major of the server binaries in `dir` (`dir/postgres --version`).
pub(crate) fn binaries_major(dir: &Path) -> Result<u32, String> {
    let postgres = dir.join("postgres");
    let out = Command::new(&postgres)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", postgres.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    version_major(&text).ok_or_else(|| {
        format!(
            "cannot tell the version of {}: {}",
            postgres.display(),
            text.trim()
        )
    })
}

/// Refuses binaries of another major than the backup's, naming both.
pub(crate) fn check_binaries(dir: &Path, backup_major: u32) -> Result<(), String> {
    match binaries_major(dir)? {
        m if m == backup_major => Ok(()),
        m => Err(format!(
            "{} holds PostgreSQL {m}; the backup is PostgreSQL {backup_major}, which only PostgreSQL {backup_major}'s binaries can start (point --pg-bin at them)",
            dir.display()
        )),
    }
}

/// The first directory on PATH with `pg_ctl` and `postgres`, else Debian's place for `major`.
pub(crate) fn default_bin_dir(major: u32) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .find(|d| d.join("pg_ctl").is_file() && d.join("postgres").is_file())
        })
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")))
}

/// The major of the cluster whose data directory is `dir` (its `PG_VERSION`), if it is one.
pub(crate) fn data_dir_major(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_text() {
        assert_eq!(
            version_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(version_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(version_major("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(version_major("garbage"), None);
    }

    #[test]
    fn pg_version_file() {
        let d = std::env::temp_dir().join(format!("archiver-pgv-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(data_dir_major(&d), None);
        std::fs::write(d.join("PG_VERSION"), "14\n").unwrap();
        assert_eq!(data_dir_major(&d), Some(14));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn binaries_that_cannot_run_are_named() {
        let e = binaries_major(Path::new("/nonexistent/bin")).unwrap_err();
        assert!(e.contains("/nonexistent/bin/postgres"), "{e}");
    }
}
