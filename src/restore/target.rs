//! Recovery targets as the operator gives them, and their PostgreSQL settings
//! (`recovery_target_*`, see `src/backend/access/transam/xlogrecovery.c`).
//!
//! A time is parsed here ([`crate::time::parse`]), not by the server, so that the plan and the
//! server agree: RFC 3339 (`2026-11-23T01:30:00Z`, `2026-11-23 02:30:00+01:00`, fractions
//! allowed). **A time without a zone is read in the local time zone of the machine** (`TZ`,
//! else the system's zone, as `date` reads it), never the server's `timezone`; every plan
//! prints the instant chosen in UTC, and the setting written for PostgreSQL always carries
//! `+00`.

use crate::time::{self, Timestamp};
use crate::wal::{Lsn, TimeLineId};

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// The first consistent point after the backup.
    Immediate,
    /// An instant (the operator's input is parsed by [`crate::time::parse`]).
    Time(Timestamp),
    Lsn(Lsn),
    Xid(u64),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
}

/// `recovery_target_timeline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimelineChoice {
    Latest,
    /// The backup's own timeline (`current`).
    Current,
    Id(TimeLineId),
}

impl std::str::FromStr for TimelineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => Ok(TimelineChoice::Latest),
            "current" => Ok(TimelineChoice::Current),
            n => n
                .parse::<TimeLineId>()
                .ok()
                .filter(|t| *t > 0)
                .map(TimelineChoice::Id)
                .ok_or_else(|| {
                    format!("{n:?} is not a timeline (a number, `latest` or `current`)")
                }),
        }
    }
}

/// Quotes a value for postgresql.conf (`'` doubled, backslashes doubled).
pub fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

impl Target {
    /// The `recovery_target*` lines for this target (`exclusive`: stop just before it).
    pub fn settings(&self, exclusive: bool) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match self {
            Target::Latest => {}
            Target::Immediate => out.push(("recovery_target".into(), conf_quote("immediate"))),
            Target::Time(t) => out.push((
                "recovery_target_time".into(),
                conf_quote(&time::format_pg(*t)),
            )),
            Target::Lsn(l) => out.push(("recovery_target_lsn".into(), conf_quote(&l.to_string()))),
            Target::Xid(x) => out.push(("recovery_target_xid".into(), conf_quote(&x.to_string()))),
            Target::Name(n) => out.push(("recovery_target_name".into(), conf_quote(n))),
        }
        if exclusive && !matches!(self, Target::Latest | Target::Immediate) {
            out.push(("recovery_target_inclusive".into(), "off".into()));
        }
        out
    }

    /// A short description for plans and messages.
    pub fn describe(&self) -> String {
        match self {
            Target::Latest => "the end of the archived WAL".into(),
            Target::Immediate => "the end of the backup (immediate)".into(),
            Target::Time(t) => format!("time {t}"),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Xid(x) => format!("transaction {x}"),
            Target::Name(n) => format!("restore point {n:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_for_each_target() {
        assert!(Target::Latest.settings(true).is_empty());
        assert_eq!(
            Target::Immediate.settings(false),
            [("recovery_target".to_string(), "'immediate'".to_string())]
        );
        assert_eq!(
            Target::Name("it's".into()).settings(true),
            [
                ("recovery_target_name".to_string(), "'it''s'".to_string()),
                ("recovery_target_inclusive".to_string(), "off".to_string())
            ]
        );
        assert_eq!(
            Target::Lsn(Lsn(0x1_0000_0028)).settings(false)[0].1,
            "'1/28'"
        );
        let t = crate::time::parse_utc("2026-11-23 02:30:00.25+01").unwrap();
        assert_eq!(
            Target::Time(t).settings(false),
            [(
                "recovery_target_time".to_string(),
                "'2026-11-23 01:30:00.250000+00'".to_string()
            )]
        );
        assert_eq!(Target::Time(t).describe(), "time 2026-11-23T01:30:00.25Z");
        assert_eq!("latest".parse(), Ok(TimelineChoice::Latest));
        assert_eq!("3".parse(), Ok(TimelineChoice::Id(3)));
        assert!("0".parse::<TimelineChoice>().is_err());
    }
}
