//! Recovery targets as the operator gives them, and their PostgreSQL settings
//! (`recovery_target_*`, see `src/backend/access/transam/xlogrecovery.c`).
//!
//! A time is parsed here, not by the server, so that the plan and the server agree: RFC 3339
//! (`2026-11-23T01:30:00Z`, `2026-11-23 02:30:00+01:00`, fractions allowed). **A time without a
//! zone is read in the local time zone of the machine** (`TZ`, else `/etc/localtime`, as
//! `date` reads it), never the server's `timezone`; every plan prints the instant chosen in UTC,
//! and the setting written for PostgreSQL always carries `+00`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::wal::{Lsn, TimeLineId};

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// The first consistent point after the backup.
    Immediate,
    /// Microseconds since the Unix epoch.
    Time(i64),
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

/// Parses a target time; see the module comment for the accepted forms. A time without a
/// zone is local time.
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_with(s, local_to_utc)
}

/// [`parse_time`] reading a time without a zone as UTC.
pub fn parse_time_utc(s: &str) -> Result<i64, String> {
    parse_time_with(s, Some)
}

/// The UTC instant (Unix microseconds) of a local wall-clock time given as if it were UTC:
/// `mktime(3)` with `tm_isdst = -1`, which follows `TZ` and the system's zone files (in a DST
/// gap or overlap, as the C library resolves it). None if it cannot say.
pub fn local_to_utc(naive: i64) -> Option<i64> {
    let secs = naive.div_euclid(1_000_000);
    let frac = naive.rem_euclid(1_000_000);
    let t = secs as libc::time_t;
    // SAFETY: gmtime_r and mktime write only into the tm we own (mktime reads TZ itself).
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::gmtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm.tm_isdst = -1;
        let local = libc::mktime(&mut tm);
        if local == -1 && secs != -1 {
            return None;
        }
        Some(local as i64 * 1_000_000 + frac)
    }
}

fn parse_time_with(s: &str, naive_to_utc: impl Fn(i64) -> Option<i64>) -> Result<i64, String> {
    let bad = || {
        format!(
            "cannot read {s:?} as a time: use RFC 3339, e.g. 2026-11-23T01:30:00Z or \
             '2026-11-23 02:30:00+01:00' (a time without a zone is the machine's local time)"
        )
    };
    let t = s.trim();
    // Split off a zone: Z, ±HH, ±HH:MM or ±HHMM after the seconds.
    let (body, offset_secs, zoned) =
        if let Some(b) = t.strip_suffix('Z').or_else(|| t.strip_suffix('z')) {
            (b, 0i64, true)
        } else {
            let tpos = t.find(['T', 't', ' ']).ok_or_else(bad)?;
            match t[tpos..].rfind(['+', '-']) {
                Some(i) => {
                    let (b, z) = t.split_at(tpos + i);
                    let sign = if z.starts_with('-') { -1 } else { 1 };
                    let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
                    if !(digits.len() == 2 || digits.len() == 4)
                        || !digits.bytes().all(|c| c.is_ascii_digit())
                    {
                        return Err(bad());
                    }
                    let h: i64 = digits[..2].parse().map_err(|_| bad())?;
                    let m: i64 = if digits.len() == 4 {
                        digits[2..].parse().map_err(|_| bad())?
                    } else {
                        0
                    };
                    if h > 23 || m > 59 {
                        return Err(bad());
                    }
                    (b.trim_end(), sign * (h * 3600 + m * 60), true)
                }
                None => (t, 0, false),
            }
        };
    let utc = humantime::parse_rfc3339_weak(body).map_err(|_| bad())?;
    let micros = match utc.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    };
    if !zoned {
        return naive_to_utc(micros).ok_or_else(bad);
    }
    Ok(micros - offset_secs * 1_000_000)
}

/// Formats microseconds since the epoch as PostgreSQL reads it unambiguously:
/// `2026-11-23 01:30:00.250000+00`.
pub fn format_pg_time(micros: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
    let s = humantime::format_rfc3339_micros(t).to_string(); // 2026-11-23T01:30:00.250000Z
    format!("{}+00", s.trim_end_matches('Z').replace('T', " "))
}

/// RFC 3339 (UTC) of microseconds since the epoch, for plans and logs.
pub fn format_rfc3339(micros: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(micros.max(0) as u64);
    humantime::format_rfc3339_micros(t).to_string()
}

/// Microseconds since the epoch of an RFC 3339 UTC time as the catalog stores them.
pub fn catalog_time(s: &str) -> Option<i64> {
    let t: SystemTime = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_micros() as i64)
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
                conf_quote(&format_pg_time(*t)),
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
            Target::Time(t) => format!("time {}", format_rfc3339(*t)),
            Target::Lsn(l) => format!("LSN {l}"),
            Target::Xid(x) => format!("transaction {x}"),
            Target::Name(n) => format!("restore point {n:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_397_400_000_000; // 2026-11-23T01:30:00Z

    #[test]
    fn times_with_and_without_zones() {
        for (s, want) in [
            ("2026-11-23T01:30:00Z", T0),
            ("2026-11-23 01:30:00", T0),
            ("2026-11-23T01:30:00", T0),
            ("2026-11-23 02:30:00+01:00", T0),
            ("2026-11-23 02:30:00+01", T0),
            ("2026-11-22T20:00:00-0530", T0),
            ("2026-11-23 01:30:00.25Z", T0 + 250_000),
            ("  2026-11-23 01:30:00z ", T0),
        ] {
            assert_eq!(parse_time_utc(s), Ok(want), "{s}");
        }
        for s in [
            "yesterday",
            "2026-11-23",
            "2026-13-01 00:00:00",
            "2026-11-23 01:30:00+25:00",
            "2026-11-23 01:30:00+1",
        ] {
            assert!(parse_time_utc(s).is_err(), "{s}");
        }
        assert_eq!(
            format_pg_time(T0 + 250_000),
            "2026-11-23 01:30:00.250000+00"
        );
        assert_eq!(format_rfc3339(T0), "2026-11-23T01:30:00.000000Z");
        assert_eq!(catalog_time("2026-11-23T01:30:00Z"), Some(T0));
    }

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
        assert_eq!("latest".parse(), Ok(TimelineChoice::Latest));
        assert_eq!("3".parse(), Ok(TimelineChoice::Id(3)));
        assert!("0".parse::<TimelineChoice>().is_err());
    }
}
