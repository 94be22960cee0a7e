//! The settings that make PostgreSQL recover from the archive: `recovery.signal` and lines
//! appended to `postgresql.auto.conf` (the operator's `postgresql.conf` stays untouched; later
//! lines of the auto file win, so an older `restore_command` there is overridden).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::target::{conf_quote, Target, TimelineChoice};

/// `recovery_target_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    fn name(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// Everything written, in order.
pub fn settings(
    restore_command: &str,
    target: &Target,
    exclusive: bool,
    timeline: TimelineChoice,
    action: TargetAction,
) -> Vec<(String, String)> {
    let mut out = vec![("restore_command".to_string(), conf_quote(restore_command))];
    out.extend(target.settings(exclusive));
    out.push((
        "recovery_target_timeline".into(),
        conf_quote(&match timeline {
            TimelineChoice::Latest => "latest".to_string(),
            TimelineChoice::Current => "current".to_string(),
            TimelineChoice::Id(t) => t.to_string(),
        }),
    ));
    if !matches!(target, Target::Latest) {
        out.push(("recovery_target_action".into(), conf_quote(action.name())));
    }
    out
}

/// The `restore_command` for this binary and repository (absolute paths, shell-quoted);
/// `repo_args` name the repository as `wal-fetch` takes it (`--repo DIR`, `--config FILE`, …).
pub fn restore_command(exe: &Path, repo_args: &[(&str, PathBuf)]) -> String {
    let q = |p: &Path| {
        let s = p.display().to_string();
        if s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@".contains(&b))
        {
            s
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    let args: Vec<String> = repo_args
        .iter()
        .map(|(flag, v)| format!("{flag} {}", q(v)))
        .collect();
    format!("{} wal-fetch {} %f %p", q(exe), args.join(" "))
}

/// Appends the settings to `pgdata/postgresql.auto.conf` and creates `recovery.signal`.
pub fn write(pgdata: &Path, lines: &[(String, String)], header: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(pgdata.join("postgresql.auto.conf"))?;
    writeln!(f, "\n# {header}")?;
    for (k, v) in lines {
        writeln!(f, "{k} = {v}")?;
    }
    f.sync_all()?;
    let s = crate::storage::fs::create_private(&pgdata.join("recovery.signal"))?;
    s.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Lsn;

    #[test]
    fn settings_and_quoting() {
        let cmd = restore_command(
            Path::new("/usr/bin/archiver"),
            &[("--repo", PathBuf::from("/var/lib/my repo"))],
        );
        assert_eq!(
            restore_command(
                Path::new("/a"),
                &[("--config", PathBuf::from("/etc/archiver.toml"))]
            ),
            "/a wal-fetch --config /etc/archiver.toml %f %p"
        );
        assert_eq!(
            cmd,
            "/usr/bin/archiver wal-fetch --repo '/var/lib/my repo' %f %p"
        );
        let s = settings(
            &cmd,
            &Target::Lsn(Lsn(0x3000028)),
            true,
            TimelineChoice::Latest,
            TargetAction::Promote,
        );
        let text: Vec<String> = s.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        assert_eq!(
            text,
            [
                "restore_command = '/usr/bin/archiver wal-fetch --repo ''/var/lib/my repo'' %f %p'",
                "recovery_target_lsn = '0/3000028'",
                "recovery_target_inclusive = off",
                "recovery_target_timeline = 'latest'",
                "recovery_target_action = 'promote'",
            ]
        );
        let s = settings(
            &cmd,
            &Target::Latest,
            false,
            TimelineChoice::Id(2),
            TargetAction::Pause,
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].1, "'2'");
    }
}
