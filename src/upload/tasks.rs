//! The background work beside a stream into remote storage: the uploader (a tiered
//! repository's hot tier to its remote tiers), the partial-segment shipper, hot-tier retention
//! and the per-tier state file (`spool/tiers.json`). Started and stopped as one.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::UploadConfig;
use crate::spool::Spool;
use crate::storage::tiered::RemoteTier;

/// What runs beside the stream for remote storage.
pub struct TierPlan {
    pub queue: std::sync::Arc<crate::upload::Queue>,
    /// The hot tier to ship from (none when streaming straight into S3).
    pub hot: Option<std::sync::Arc<dyn crate::storage::Storage>>,
    pub remotes: Vec<RemoteTier>,
    pub upload: UploadConfig,
    pub retention: Option<Duration>,
}

/// The background work while streaming into remote storage: the uploader (tiered), the
/// partial-segment shipper, hot-tier retention, and the per-tier state file.
pub struct TierTasks {
    uploader: Option<super::Uploader>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TierTasks {
    /// Starts the tasks; `flushed` is the stream's durable position.
    pub fn start(
        t: TierPlan,
        spool: Spool,
        flushed: watch::Receiver<Option<crate::wal::WalPoint>>,
        level: i32,
    ) -> TierTasks {
        let (stop, stop_rx) = watch::channel(false);
        let seg_size = t.queue.seg_size();
        let uploader = t.hot.clone().map(|hot| {
            super::Uploader::start(
                t.queue.clone(),
                hot,
                t.remotes.clone(),
                super::UploadSettings {
                    concurrency: t.upload.concurrency,
                    max_rate: t.upload.max_rate,
                    reconcile: true,
                },
            )
        });
        let mut tasks = Vec::new();
        let shipper = super::partial::PartialShipper {
            queue: t.queue.clone(),
            remotes: t.remotes.clone(),
            spool: spool.clone(),
            seg_size,
            interval: t.upload.partial_upload_interval,
            level,
        };
        tasks.push(tokio::spawn(shipper.run(flushed, stop_rx.clone())));
        // The per-tier state, for operators and scripts: spool/tiers.json.
        let (queue, dir, mut s) = (t.queue.clone(), spool.dir().to_path_buf(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let states = queue.states();
                let now = serde_json::to_string(&states).unwrap_or_default();
                if now != last {
                    if let Err(e) = crate::upload::write_state(&dir, &states) {
                        tracing::warn!(error = %e, "cannot write the tier state file");
                    }
                    for st in &states {
                        if let Some(d) = st.durable {
                            tracing::debug!(tier = %st.name, lsn = %d.lsn, pending = st.pending_objects, "remote tier durable position");
                        }
                    }
                    last = now;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = s.changed() => return,
                }
            }
        }));
        if let (Some(retention), Some(hot)) = (t.retention, t.hot.clone()) {
            let (remotes, mut s) = (t.remotes.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(async move {
                let every =
                    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = s.changed() => return,
                    }
                    if let Err(e) = crate::upload::evict::evict_once(
                        hot.as_ref(),
                        &remotes,
                        retention,
                        std::time::SystemTime::now(),
                    )
                    .await
                    {
                        tracing::warn!(error = %e, "hot-tier retention pass failed");
                    }
                }
            }));
        }
        TierTasks {
            uploader,
            stop,
            tasks,
        }
    }

    /// Stops them, letting the uploader finish what is queued for at most `drain`.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(u) = self.uploader {
            if let Err(behind) = u.drain(drain).await {
                tracing::warn!(%behind, "stopping with uploads pending; the next start ships them");
            }
            u.stop().await;
        }
    }
}
