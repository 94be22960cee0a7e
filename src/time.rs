//! Time: one type, [`Timestamp`] (jiff's: an instant, nanosecond precision, serialized as
//! RFC 3339 in UTC), for catalog times, recovery targets and WAL commit times.
//!
//! Owns the conversions at the edges: PostgreSQL's `TimestampTz` (microseconds since
//! 2000-01-01 UTC, in WAL records and the replication protocol), the operator's input (a time
//! without a zone is local time: `TZ`, else the system's zone, as `date` reads it) and the
//! setting PostgreSQL reads back (`recovery_target_time`, always `+00`).

use jiff::civil::DateTime;
use jiff::fmt::temporal::{Pieces, PiecesOffset};
use jiff::tz::TimeZone;
pub use jiff::Timestamp;

/// Microseconds between the Unix epoch and PostgreSQL's epoch, 2000-01-01 (`POSTGRES_EPOCH_JDATE`).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Now, to the microsecond (PostgreSQL's precision: a recorded time compares with a target
/// or a commit time exactly as the server would).
pub fn now() -> Timestamp {
    let t = Timestamp::now();
    Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
}

/// To the second, for tables: `2026-11-22T22:30:00Z`.
pub fn short(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A PostgreSQL `TimestampTz` as an instant (saturating at the ends of the representable range).
pub fn from_pg(t: i64) -> Timestamp {
    let micros = t.saturating_add(PG_EPOCH_OFFSET_MICROS);
    Timestamp::from_microsecond(micros).unwrap_or(if micros < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

/// An instant as PostgreSQL's `TimestampTz`.
pub fn to_pg(t: Timestamp) -> i64 {
    t.as_microsecond() - PG_EPOCH_OFFSET_MICROS
}

/// Now, as PostgreSQL's `TimestampTz` (the replication protocol's send times).
pub fn pg_now() -> i64 {
    to_pg(now())
}

/// An instant from the system clock's representation (file times, S3 times).
pub fn from_system(t: std::time::SystemTime) -> Timestamp {
    Timestamp::try_from(t).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Parses a time the operator gave: RFC 3339 / ISO 8601 (`2026-11-23T01:30:00Z`,
/// `2026-11-23 02:30:00+01:00`, `+01`, `-0530`, fractions allowed). A time without a zone is
/// local time.
pub fn parse(s: &str) -> Result<Timestamp, String> {
    parse_in(s, &TimeZone::system())
}

/// [`parse`] reading a time without a zone as UTC.
#[cfg(test)]
pub fn parse_utc(s: &str) -> Result<Timestamp, String> {
    parse_in(s, &TimeZone::UTC)
}

fn parse_in(s: &str, zone_less: &TimeZone) -> Result<Timestamp, String> {
    let bad = || {
        format!(
            "cannot read {s:?} as a time: use RFC 3339, e.g. 2026-11-23T01:30:00Z or \
             '2026-11-23 02:30:00+01:00' (a time without a zone is the machine's local time)"
        )
    };
    let pieces = Pieces::parse(s.trim()).map_err(|_| bad())?;
    // A date alone is refused (it would silently mean midnight), and so is a zone name:
    // the instant must be readable from what was typed.
    let time = pieces.time().ok_or_else(bad)?;
    if pieces.time_zone_annotation().is_some() {
        return Err(bad());
    }
    let civil = pieces.date().to_datetime(time);
    let zone = match pieces.offset() {
        None => zone_less.clone(),
        Some(PiecesOffset::Zulu) => TimeZone::UTC,
        Some(PiecesOffset::Numeric(n)) if n.offset().seconds().abs() < 24 * 3600 => {
            TimeZone::fixed(n.offset())
        }
        Some(_) => return Err(bad()),
    };
    zone.to_timestamp(civil)
        .map_err(|e| format!("{}: {e}", bad()))
}

/// The instant as PostgreSQL reads it unambiguously: `2026-11-23 01:30:00.250000+00`.
pub fn format_pg(t: Timestamp) -> String {
    t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// backup_label's `START TIME: 2026-11-22 22:40:00 UTC` (the server's `log_timezone`), when
/// its zone is UTC or GMT: other abbreviations are ambiguous, and then the caller keeps its own.
pub fn parse_label_time(v: &str) -> Option<Timestamp> {
    let v = v.trim();
    let civil = v.strip_suffix(" UTC").or_else(|| v.strip_suffix(" GMT"))?;
    let civil: DateTime = civil.parse().ok()?;
    TimeZone::UTC.to_timestamp(civil).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_795_397_400_000_000; // 2026-11-23T01:30:00Z

    fn at(micros: i64) -> Timestamp {
        Timestamp::from_microsecond(micros).unwrap()
    }

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
            assert_eq!(parse_utc(s), Ok(at(want)), "{s}");
        }
        for s in [
            "yesterday",
            "2026-11-23",
            "2026-13-01 00:00:00",
            "2026-11-23 01:30:00+25:00",
            "2026-11-23 01:30:00+1",
        ] {
            assert!(parse_utc(s).is_err(), "{s}");
        }
    }

    #[test]
    fn formats_and_postgres_epoch() {
        assert_eq!(format_pg(at(T0 + 250_000)), "2026-11-23 01:30:00.250000+00");
        assert_eq!(format_pg(at(T0)), "2026-11-23 01:30:00.000000+00");
        assert_eq!(at(T0).to_string(), "2026-11-23T01:30:00Z");
        assert_eq!(from_pg(0).as_microsecond(), PG_EPOCH_OFFSET_MICROS);
        assert_eq!(to_pg(from_pg(123_456_789)), 123_456_789);
        assert!(pg_now() > 0);
        assert_eq!(now().subsec_nanosecond() % 1000, 0);
        assert_eq!(short(at(T0 + 250_000)), "2026-11-23T01:30:00Z");
        assert_eq!(from_pg(i64::MAX), Timestamp::MAX);
        // Catalogs written before jiff hold seconds or microseconds, with a Z.
        let old: Timestamp = serde_json::from_str("\"2026-11-23T01:30:00.000000Z\"").unwrap();
        assert_eq!(old, at(T0));
        assert_eq!(
            serde_json::to_string(&at(T0)).unwrap(),
            "\"2026-11-23T01:30:00Z\""
        );
    }

    #[test]
    fn label_times() {
        assert_eq!(
            parse_label_time("2026-11-22 22:40:00 UTC"),
            Some("2026-11-22T22:40:00Z".parse().unwrap())
        );
        assert_eq!(parse_label_time("2026-11-22 22:40:00 CET"), None);
    }
}
