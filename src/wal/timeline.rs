//! Timeline history files (`readTimeLineHistory` in `src/backend/access/transam/timeline.c`).
//!
//! A `0000000N.history` file lists, one line per ancestor, `parentTLI <tab> switchpoint <tab> reason`.

use super::{Lsn, TimeLineId};

/// One ancestor timeline and the LSN at which its child forked off (`TimeLineHistoryEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub tli: TimeLineId,
    /// First LSN that is *not* on `tli` (the switch point).
    pub end: Lsn,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed timeline history line {line}: {reason}")]
pub struct HistoryParseError {
    pub line: usize,
    pub reason: &'static str,
}

/// Parses history file content. Comments (`#`) and blank lines are skipped, like PostgreSQL.
pub fn parse_history(content: &str) -> Result<Vec<HistoryEntry>, HistoryParseError> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for (i, raw) in content.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let err = |reason| HistoryParseError {
            line: i + 1,
            reason,
        };
        let tli: TimeLineId = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| err("expected a numeric timeline ID"))?;
        let end: Lsn = fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| err("expected a switch point LSN"))?;
        if let Some(prev) = out.last() {
            if tli <= prev.tli {
                return Err(err("timeline IDs must be increasing"));
            }
            if end < prev.end {
                return Err(err("switch points must not go backwards"));
            }
        }
        out.push(HistoryEntry { tli, end });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_history() {
        let h = "1\t0/3000100\tno recovery target specified\n\n# comment\n2\t0/5000000\tat restore point \"x\"\n";
        let e = parse_history(h).unwrap();
        assert_eq!(
            e,
            vec![
                HistoryEntry {
                    tli: 1,
                    end: Lsn(0x3000100)
                },
                HistoryEntry {
                    tli: 2,
                    end: Lsn(0x5000000)
                }
            ]
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_history("x\t0/1\n").unwrap_err().line, 1);
        assert!(parse_history("1\tzz\n").is_err());
        assert!(parse_history("2\t0/5\n1\t0/6\n").is_err());
        assert!(parse_history("1\t0/6\n2\t0/5\n").is_err());
    }
}
