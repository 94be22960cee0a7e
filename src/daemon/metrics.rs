//! The daemon's Prometheus metrics (the `prometheus` crate's registry and text encoder; no
//! hand-written exposition). Gauges of state are set from the shared state just before each
//! scrape ([`super::Shared::refresh_metrics`]); counters are incremented where things happen.
//! Every name starts with `archiver_`; no label or value carries a secret.

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub received_lsn: IntGauge,
    pub flushed_lsn: IntGauge,
    pub server_lsn: IntGauge,
    pub connected: IntGauge,
    pub wal_damaged_segments: IntGauge,
    pub tier_durable_lsn: IntGaugeVec,
    pub tier_rpo_seconds: GaugeVec,
    pub tier_rpo_objective_seconds: GaugeVec,
    pub tier_stored_bytes: IntGaugeVec,
    pub tier_pending_objects: IntGaugeVec,
    pub slot_retained_bytes: IntGauge,
    pub last_backup_time: Gauge,
    pub last_backup_duration: Gauge,
    pub last_backup_size: IntGauge,
    pub last_backup_stored: IntGauge,
    pub backups_complete: IntGauge,
    pub backups: IntCounterVec,
    pub verifies: IntCounterVec,
    pub drills: IntCounterVec,
    pub expires: IntCounterVec,
    pub retries: IntCounterVec,
    pub last_drill_rto: Gauge,
    pub hot_disk_free_ratio: Gauge,
    pub alert_deliveries: IntCounterVec,
    pub alerts_firing: IntGauge,
    pub job_running: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let ig = |n: &str, h: &str| reg(&r, IntGauge::new(n, h).expect("valid metric"));
        let g = |n: &str, h: &str| reg(&r, Gauge::new(n, h).expect("valid metric"));
        let igv = |n: &str, h: &str, l: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(n, h), l).expect("valid metric"),
            )
        };
        let gv = |n: &str, h: &str, l: &[&str]| {
            reg(&r, GaugeVec::new(Opts::new(n, h), l).expect("valid metric"))
        };
        let cv = |n: &str, h: &str, l: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(n, h), l).expect("valid metric"),
            )
        };
        let build = igv(
            "archiver_build_info",
            "The archiver version (value 1).",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            received_lsn: ig("archiver_received_lsn", "WAL received from the server (LSN as a number)."),
            flushed_lsn: ig("archiver_flushed_lsn", "WAL fsync'd in the hot tier and acknowledged to the server (LSN as a number)."),
            server_lsn: ig("archiver_server_lsn", "The server's WAL end, from its last message (LSN as a number)."),
            connected: ig("archiver_replication_connected", "1 while the replication stream is connected."),
            wal_damaged_segments: ig("archiver_wal_damaged_segments", "Segments streamed since start whose WAL records failed their CRC-32C (archived as received, without an index)."),
            tier_durable_lsn: igv("archiver_tier_durable_lsn", "WAL durable in the tier (LSN as a number).", &["tier"]),
            tier_rpo_seconds: gv("archiver_tier_rpo_seconds", "Live RPO: how long ago the server wrote the oldest WAL the tier does not hold yet.", &["tier"]),
            tier_rpo_objective_seconds: gv("archiver_tier_rpo_objective_seconds", "The tier's RPO objective.", &["tier"]),
            tier_stored_bytes: igv("archiver_tier_stored_bytes", "Bytes the tier stores (as last listed).", &["tier"]),
            tier_pending_objects: igv("archiver_tier_pending_objects", "Objects waiting to be shipped to the remote tier.", &["tier"]),
            slot_retained_bytes: ig("archiver_slot_retained_bytes", "WAL the replication slot holds on the server."),
            last_backup_time: g("archiver_last_backup_timestamp_seconds", "When the newest complete backup finished (Unix time)."),
            last_backup_duration: g("archiver_last_backup_duration_seconds", "How long the newest complete backup took."),
            last_backup_size: ig("archiver_last_backup_size_bytes", "The newest complete backup's size (uncompressed)."),
            last_backup_stored: ig("archiver_last_backup_stored_bytes", "The newest complete backup's stored size."),
            backups_complete: ig("archiver_backups_complete", "Complete backups in the hot tier's catalog."),
            backups: cv("archiver_backups_total", "Backups the daemon ran, by result (success, failure; a retried attempt is one failure).", &["result"]),
            verifies: cv("archiver_verifies_total", "Verifies the daemon ran, by result (success, problems, error).", &["result"]),
            drills: cv("archiver_drills_total", "Restore drills the daemon ran, by result (success, failure).", &["result"]),
            expires: cv("archiver_expires_total", "Expire runs after backups, by result.", &["result"]),
            retries: cv("archiver_retries_total", "Retries, by operation (backup, stream, notify).", &["operation"]),
            last_drill_rto: g("archiver_last_drill_rto_seconds", "The last drill's measured recovery time (restore + replay until usable)."),
            hot_disk_free_ratio: g("archiver_hot_disk_free_ratio", "Free space on the hot tier's file system (0..1)."),
            alert_deliveries: cv("archiver_alert_deliveries_total", "Alert deliveries, by channel and result (ok, failed, dropped).", &["channel", "result"]),
            alerts_firing: ig("archiver_alerts_firing", "Alert conditions firing now."),
            job_running: igv("archiver_job_running", "1 while a scheduled job runs.", &["job"]),
            registry: r,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into memory does not fail");
        String::from_utf8(buf).expect("the exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::new();
        m.tier_rpo_seconds.with_label_values(&["hot"]).set(1.5);
        m.backups.with_label_values(&["success"]).inc();
        let t = m.render();
        assert!(
            t.contains("archiver_tier_rpo_seconds{tier=\"hot\"} 1.5"),
            "{t}"
        );
        assert!(t.contains("archiver_backups_total{result=\"success\"} 1"));
        assert!(t.contains("# TYPE archiver_replication_connected gauge"));
        assert!(t.contains("archiver_build_info{version="));
    }
}
