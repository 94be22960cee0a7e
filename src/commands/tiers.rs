//! `archiver tiers`: each remote tier's state as the streamer last recorded it
//! (`spool/tiers.json`): how far the WAL is durable there, what is still queued, the last error.

use super::{report, RepoArg, EXIT_ERROR};

#[derive(clap::Args, Debug)]
pub struct TiersArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Print the state file's JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: TiersArgs) -> u8 {
    match tiers(args) {
        Ok(()) => 0,
        Err(e) => report(&e, EXIT_ERROR),
    }
}

fn tiers(args: TiersArgs) -> anyhow::Result<()> {
    let path = args
        .repo
        .local_dir("tiers")?
        .join(crate::repo::SPOOL_DIR)
        .join(crate::upload::TIERS_STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{} does not exist: no `archiver stream` has recorded the remote tiers' state here yet",
            path.display()
        ),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is damaged: {e}", path.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("recorded at {}", v["updated_at"].as_str().unwrap_or("?"));
    let s = |x: &serde_json::Value| match x {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        o => o.to_string(),
    };
    let mut rows = vec![[
        "TIER",
        "URL",
        "DURABLE TLI",
        "DURABLE LSN",
        "SINCE",
        "PENDING",
        "UPLOADED",
        "LAST ERROR",
    ]
    .map(String::from)];
    for t in v["tiers"].as_array().into_iter().flatten() {
        rows.push([
            s(&t["name"]),
            s(&t["url"]),
            s(&t["durable"]["tli"]),
            s(&t["durable"]["lsn"]),
            s(&t["durable_at"]),
            s(&t["pending_objects"]),
            s(&t["uploaded_objects"]),
            s(&t["last_error"]),
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}
