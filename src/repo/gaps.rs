//! Known holes in the archive and the replication slots archiver created, as repository records.
//!
//! A gap is WAL the server no longer had when the stream needed it (a dropped slot, recycled
//! WAL), accepted by the operator (`stream --accept-gap`): `gaps/<TLI>-<from LSN>.json`, one
//! sealed-JSON record each. Slots are one sealed list, `slots.json`.
//!
//! Invariants: a gap is recorded *before* any WAL after it is streamed, so a repository never
//! holds WAL on both sides of a hole without the record that explains it; the restore planner
//! never plans across a recorded gap. Records are only added or widened, never removed.

use serde::{Deserialize, Serialize};

use super::{sealed, Repo, RepoError};
use crate::storage::StorageError;
use crate::time::Timestamp;
use crate::wal::{Lsn, TimeLineId};

pub const GAPS_PREFIX: &str = "gaps/";
pub const SLOTS_KEY: &str = "slots.json";

/// WAL `[from_lsn, to_lsn)` is missing from the archive and can never be archived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The timeline the archive had reached before the gap.
    pub from_timeline: TimeLineId,
    pub from_lsn: Lsn,
    /// The timeline streaming continued on after it.
    pub timeline: TimeLineId,
    pub to_lsn: Lsn,
    /// When the gap was accepted.
    pub at: Timestamp,
    /// When the newest WAL before the gap was received, when known: the recovery window
    /// before the gap ends there.
    pub last_received_before: Option<Timestamp>,
    /// What the server said.
    pub reason: String,
}

impl Gap {
    pub fn key(&self) -> String {
        format!(
            "{GAPS_PREFIX}{:08X}-{:016X}.json",
            self.from_timeline, self.from_lsn.0
        )
    }

    /// Whether `lsn` (on any timeline) lies inside the gap.
    pub fn contains(&self, lsn: Lsn) -> bool {
        self.from_lsn <= lsn && lsn < self.to_lsn
    }

    /// When the recovery window before the gap ends: when its last WAL was received, else
    /// (unknown) when the gap was accepted.
    pub fn window_end(&self) -> Timestamp {
        self.last_received_before.unwrap_or(self.at)
    }

    /// "WAL from 0/5004000 (timeline 1) to 0/9000000 (timeline 1) is missing (…)".
    pub fn describe(&self) -> String {
        format!(
            "WAL from {} (timeline {}) to {} (timeline {}) is missing ({}; accepted at {})",
            self.from_lsn, self.from_timeline, self.to_lsn, self.timeline, self.reason, self.at
        )
    }
}

/// `slots.json`: sealed JSON is an object, so the list is a field.
#[derive(Serialize, Deserialize, Default)]
struct SlotsFile {
    slots: Vec<SlotRecord>,
}

/// A replication slot archiver created for this repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub name: String,
    /// When it was created.
    pub created_at: Timestamp,
}

impl Repo {
    /// Records (or widens) a gap; written before any WAL after it is streamed.
    pub async fn put_gap(&self, gap: &Gap) -> Result<(), RepoError> {
        let body = sealed::seal(gap).map_err(|e| RepoError::BadMeta(e.to_string()))?;
        Ok(self.storage().put(&gap.key(), body.into()).await?)
    }

    /// Every recorded gap, in LSN order.
    pub async fn list_gaps(&self) -> Result<Vec<Gap>, RepoError> {
        let mut out: Vec<Gap> = Vec::new();
        for m in self.storage().list(GAPS_PREFIX).await? {
            if !m.key.ends_with(".json") {
                continue;
            }
            let raw = self.storage().get(&m.key).await?;
            out.push(sealed::open(&raw).map_err(|e| RepoError::Corrupt {
                key: m.key.clone(),
                reason: e.to_string(),
            })?);
        }
        out.sort_by_key(|g| (g.from_lsn, g.from_timeline));
        Ok(out)
    }

    /// The slots archiver created for this repository.
    pub async fn list_slots(&self) -> Result<Vec<SlotRecord>, RepoError> {
        match self.storage().get(SLOTS_KEY).await {
            Ok(raw) => sealed::open::<SlotsFile>(&raw)
                .map(|f| f.slots)
                .map_err(|e| RepoError::Corrupt {
                    key: SLOTS_KEY.into(),
                    reason: e.to_string(),
                }),
            Err(StorageError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the list of slots archiver created.
    pub async fn put_slots(&self, slots: &[SlotRecord]) -> Result<(), RepoError> {
        let file = SlotsFile {
            slots: slots.to_vec(),
        };
        let body = sealed::seal(&file).map_err(|e| RepoError::BadMeta(e.to_string()))?;
        Ok(self.storage().put(SLOTS_KEY, body.into()).await?)
    }

    /// Notes that archiver created slot `name` (idempotent).
    pub async fn record_slot(&self, name: &str) -> Result<(), RepoError> {
        let mut slots = self.list_slots().await?;
        if slots.iter().any(|s| s.name == name) {
            return Ok(());
        }
        slots.push(SlotRecord {
            name: name.to_string(),
            created_at: crate::time::now(),
        });
        self.put_slots(&slots).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn gaps_and_slots_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::repo::test_repo(dir.path()).await;
        assert!(repo.list_gaps().await.unwrap().is_empty());
        let mut g = Gap {
            from_timeline: 1,
            from_lsn: Lsn(0x0900_0000),
            timeline: 1,
            to_lsn: Lsn(0x0C00_0000),
            at: "2026-12-03T10:00:00Z".parse().unwrap(),
            last_received_before: None,
            reason: "removed".into(),
        };
        let early = Gap {
            from_lsn: Lsn(0x0200_0000),
            to_lsn: Lsn(0x0300_0000),
            ..g.clone()
        };
        repo.put_gap(&g).await.unwrap();
        repo.put_gap(&early).await.unwrap();
        // Widening replaces the record of the same start.
        g.to_lsn = Lsn(0x0D00_0000);
        repo.put_gap(&g).await.unwrap();
        assert_eq!(repo.list_gaps().await.unwrap(), vec![early, g.clone()]);
        assert!(g.contains(Lsn(0x0900_0000)) && !g.contains(Lsn(0x0D00_0000)));
        assert!(g.describe().contains("0/9000000"), "{}", g.describe());

        assert!(repo.list_slots().await.unwrap().is_empty());
        repo.record_slot("archiver").await.unwrap();
        repo.record_slot("archiver").await.unwrap();
        repo.record_slot("other").await.unwrap();
        let names: Vec<_> = repo
            .list_slots()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["archiver", "other"]);
    }
}
