//! Text the commands print for people: sizes, the backup table, gaps and windows.

use crate::repo::catalog::BackupRecord;
use crate::repo::gaps::Gap;
use crate::restore::plan::recovery_windows;

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The readable table `list` prints.
pub fn table(records: &[BackupRecord]) -> String {
    let mut rows = vec![[
        "ID".to_string(),
        "STATUS".into(),
        "TYPE".into(),
        "PARENT".into(),
        "LABEL".into(),
        "TLI".into(),
        "START LSN".into(),
        "STOP LSN".into(),
        "START TIME".into(),
        "SIZE".into(),
        "STORED".into(),
        "LAST DRILL".into(),
        "VERIFIED".into(),
    ]];
    for r in records {
        rows.push([
            r.id.clone(),
            serde_json::to_value(r.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            r.kind().to_string(),
            r.parent.clone().unwrap_or_else(|| "-".into()),
            r.label.clone(),
            r.timeline.to_string(),
            r.start_lsn.to_string(),
            r.stop_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "-".into()),
            crate::time::short(r.start_time),
            human_bytes(r.size_bytes),
            human_bytes(r.stored_bytes),
            r.drills.last().map_or_else(
                || "-".to_string(),
                |d| {
                    format!(
                        "{} {} ({:.1} s)",
                        if d.passed { "passed" } else { "FAILED" },
                        d.at,
                        d.seconds
                    )
                },
            ),
            r.verified.as_ref().map_or_else(
                || "-".to_string(),
                |v| {
                    let verdict = if v.ok { "ok" } else { "FAILED" };
                    format!("{verdict} {}", crate::time::short(v.at))
                },
            ),
        ]);
    }
    let widths: Vec<usize> = (0..13)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Per-tier results as one JSON document: `{"tiers": [{"tier": …, "report": …}, …]}`.
pub fn print_tiers_json<T: serde::Serialize>(tiers: &[(String, T)]) -> anyhow::Result<()> {
    let v: Vec<_> = tiers
        .iter()
        .map(|(t, r)| serde_json::json!({"tier": t, "report": r}))
        .collect();
    let doc = serde_json::json!({ "tiers": v });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// The gaps in the WAL and the recovery windows around them, one per line.
pub fn gaps_text(records: &[BackupRecord], gaps: &[Gap]) -> String {
    let mut out = String::new();
    for g in gaps {
        out.push_str(&format!("gap:               {}\n", g.describe()));
    }
    for (i, w) in recovery_windows(records, gaps).iter().enumerate() {
        out.push_str(&format!("recovery window {}: {}\n", i + 1, w.describe()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(3 << 30), "3.0 GB");
    }
}
