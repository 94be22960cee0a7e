//! What the cluster holds, read over ordinary SQL connections when a backup is taken and kept in
//! its catalog record ([`ClusterContents`]): the server's version string, each database with its
//! size, its tables and their estimated rows, and its extensions with their versions — so an
//! operator knows what a backup brings back before restoring it.

use tracing::warn;

use crate::pg::conninfo::ConnInfo;
use crate::pg::{Connection, PgError};
use crate::repo::catalog::{ClusterContents, DatabaseContents, Extension};

const TABLES: &str = "select count(*), coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint \
     from pg_class c join pg_namespace n on n.oid = c.relnamespace \
     where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema') \
     and n.nspname not like 'pg_toast%'";

/// Reads the contents over `ci` (its database first, then one connection per database that
/// allows them). A database that cannot be entered keeps its name and size.
pub async fn read_contents(ci: &ConnInfo) -> Result<ClusterContents, PgError> {
    let mut c = Connection::connect(ci, None, "archiver backup").await?;
    let version = c.simple_query("select version()").await;
    let dbs = c
        .simple_query(
            "select datname, pg_database_size(oid) from pg_database \
             where datallowconn order by datname",
        )
        .await;
    c.close().await;
    let mut out = ClusterContents {
        server_version: version?
            .first()
            .and_then(|s| s.text(0, 0))
            .unwrap_or_default()
            .to_string(),
        databases: Vec::new(),
    };
    let dbs = dbs?;
    let Some(rows) = dbs.first() else {
        return Ok(out);
    };
    for row in 0..rows.rows.len() {
        let name = rows.text(row, 0).unwrap_or_default().to_string();
        let mut db = DatabaseContents {
            size_bytes: rows.text(row, 1).and_then(|v| v.parse().ok()).unwrap_or(0),
            name,
            ..DatabaseContents::default()
        };
        if let Err(e) = read_database(ci, &mut db).await {
            warn!(database = %db.name, error = %e, "cannot read the database's tables and extensions");
        }
        out.databases.push(db);
    }
    Ok(out)
}

async fn read_database(ci: &ConnInfo, db: &mut DatabaseContents) -> Result<(), PgError> {
    let mut ci = ci.clone();
    ci.dbname = db.name.clone();
    let mut c = Connection::connect(&ci, None, "archiver backup").await?;
    let tables = c.simple_query(TABLES).await;
    let exts = c
        .simple_query("select extname, extversion from pg_extension order by extname")
        .await;
    c.close().await;
    let tables = tables?;
    if let Some(t) = tables.first() {
        db.tables = t.text(0, 0).and_then(|v| v.parse().ok()).unwrap_or(0);
        db.estimated_rows = t.text(0, 1).and_then(|v| v.parse().ok()).unwrap_or(0);
    }
    if let Some(e) = exts?.first() {
        db.extensions = (0..e.rows.len())
            .map(|r| Extension {
                name: e.text(r, 0).unwrap_or_default().to_string(),
                version: e.text(r, 1).unwrap_or_default().to_string(),
            })
            .collect();
    }
    Ok(())
}
