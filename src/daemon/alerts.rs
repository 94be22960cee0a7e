//! Alerts: conditions that fire once and resolve once, events that happen once, and their
//! delivery to every `[[notify]]` channel without ever holding up archiving.
//!
//! Invariants: a condition (a tier's RPO over its objective, the stream disconnected, the disk
//! full, the slot holding too much WAL) sends one alert when it starts and one resolve when it
//! ends, however often it is evaluated; delivery runs in one task per channel behind a bounded
//! queue (`try_send`: a full queue drops the event and counts it, never waits), each event
//! retried with backoff and jitter until `delivery_give_up_after`; every outcome is logged
//! and counted (`archiver_alert_deliveries_total{channel,result}`); channel URLs and
//! passwords are never logged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::metrics::Metrics;
use super::notify::Channel;
use crate::config::daemon::{AlertsConfig, NotifyConfig};
use crate::retry::RetryPolicy;
use crate::time::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A condition began, or a one-off event happened.
    Firing,
    /// A condition ended.
    Resolved,
}

/// One alert as every channel receives it (the webhook's JSON body).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// `backup_failed`, `rpo_breached`, `stream_disconnected`, `verify_failed`, `drill_failed`,
    /// `drill_rto_exceeded`, `disk_usage_high`, `slot_retained_high`, `backup_succeeded`.
    pub event: String,
    pub status: Status,
    pub severity: Severity,
    pub environment: Option<String>,
    /// What it is about, when there are several (a tier's name).
    pub subject: Option<String>,
    pub summary: String,
    pub details: String,
    pub time: Timestamp,
}

impl Event {
    pub fn new(event: &str, severity: Severity, summary: String, details: String) -> Event {
        Event {
            event: event.to_string(),
            status: Status::Firing,
            severity,
            environment: None,
            subject: None,
            summary,
            details,
            time: crate::time::now(),
        }
    }

    pub fn about(mut self, subject: &str) -> Event {
        self.subject = Some(subject.to_string());
        self
    }

    fn key(&self) -> String {
        match &self.subject {
            Some(s) => format!("{}:{s}", self.event),
            None => self.event.clone(),
        }
    }
}

/// The conditions now firing, by key: turns "is it true now?" into one alert and one resolve.
#[derive(Debug, Default)]
pub struct Conditions {
    firing: BTreeMap<String, Event>,
}

impl Conditions {
    /// `Some(event)` when the condition was not firing (it is now); `None` while it lasts.
    pub fn fire(&mut self, e: Event) -> Option<Event> {
        let key = e.key();
        if self.firing.contains_key(&key) {
            return None;
        }
        self.firing.insert(key, e.clone());
        Some(e)
    }

    /// `Some(resolve)` when the condition `event`/`subject` was firing; `None` otherwise.
    pub fn resolve(
        &mut self,
        event: &str,
        subject: Option<&str>,
        summary: String,
    ) -> Option<Event> {
        let key = match subject {
            Some(s) => format!("{event}:{s}"),
            None => event.to_string(),
        };
        let mut e = self.firing.remove(&key)?;
        e.status = Status::Resolved;
        e.summary = summary;
        e.time = crate::time::now();
        Some(e)
    }

    /// Fires or resolves, as `on` says.
    pub fn set(&mut self, on: bool, e: Event, resolved: impl FnOnce() -> String) -> Option<Event> {
        if on {
            self.fire(e)
        } else {
            let subject = e.subject.clone();
            self.resolve(&e.event, subject.as_deref(), resolved())
        }
    }

    pub fn firing(&self) -> Vec<Event> {
        self.firing.values().cloned().collect()
    }
}

struct Handle {
    label: String,
    tx: mpsc::Sender<Event>,
}

/// Where events go: one queue and worker per channel. Cloned freely; `reload` swaps the
/// channels (the old workers finish what they hold).
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

struct Inner {
    environment: Option<String>,
    metrics: Arc<Metrics>,
    channels: Mutex<Vec<Handle>>,
    conditions: Mutex<Conditions>,
    backup_success: Mutex<bool>,
}

impl Alerts {
    /// Builds every channel of `notify` (refusing a bad one: the daemon does not start) and
    /// starts their workers.
    pub fn start(
        environment: Option<String>,
        alerts: &AlertsConfig,
        notify: &[NotifyConfig],
        metrics: Arc<Metrics>,
    ) -> Result<Alerts, String> {
        let a = Alerts {
            inner: Arc::new(Inner {
                environment,
                metrics,
                channels: Mutex::new(Vec::new()),
                conditions: Mutex::new(Conditions::default()),
                backup_success: Mutex::new(alerts.backup_success),
            }),
        };
        a.reload(alerts, notify)?;
        Ok(a)
    }

    /// Replaces the channels (SIGHUP); on an error the old ones stay.
    pub fn reload(&self, alerts: &AlertsConfig, notify: &[NotifyConfig]) -> Result<(), String> {
        let mut built = Vec::new();
        for (i, n) in notify.iter().enumerate() {
            let label = n.label(i);
            let ch = Channel::build(n).map_err(|e| format!("notify channel {label}: {e}"))?;
            built.push((label, ch));
        }
        let mut handles = Vec::new();
        for (label, ch) in built {
            let (tx, rx) = mpsc::channel(alerts.queue);
            tokio::spawn(deliver(
                label.clone(),
                ch,
                rx,
                alerts.delivery_give_up_after,
                self.inner.metrics.clone(),
            ));
            handles.push(Handle { label, tx });
        }
        *self.inner.backup_success.lock().unwrap() = alerts.backup_success;
        *self.inner.channels.lock().unwrap() = handles;
        Ok(())
    }

    pub fn backup_success_enabled(&self) -> bool {
        *self.inner.backup_success.lock().unwrap()
    }

    /// Sends a one-off event to every channel.
    pub fn send(&self, mut e: Event) {
        e.environment = self.inner.environment.clone();
        match e.status {
            Status::Firing => {
                warn!(event = %e.event, severity = ?e.severity, subject = e.subject.as_deref().unwrap_or(""), "alert: {}", e.summary)
            }
            Status::Resolved => {
                info!(event = %e.event, subject = e.subject.as_deref().unwrap_or(""), "resolved: {}", e.summary)
            }
        }
        for h in self.inner.channels.lock().unwrap().iter() {
            if h.tx.try_send(e.clone()).is_err() {
                warn!(channel = %h.label, event = %e.event, "alert queue full or closed; event dropped");
                self.inner
                    .metrics
                    .alert_deliveries
                    .with_label_values(&[&h.label, "dropped"])
                    .inc();
            }
        }
    }

    /// Fires (or resolves) a condition; sends only on a change.
    pub fn condition(&self, on: bool, e: Event, resolved: impl FnOnce() -> String) {
        let out = self.inner.conditions.lock().unwrap().set(on, e, resolved);
        if let Some(e) = out {
            self.send(e);
        }
    }

    /// The conditions firing now.
    pub fn firing(&self) -> Vec<Event> {
        self.inner.conditions.lock().unwrap().firing()
    }

    /// Waits (at most `limit`) for the queues to empty, at shutdown.
    pub async fn flush(&self, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let busy = self
                .inner
                .channels
                .lock()
                .unwrap()
                .iter()
                .any(|h| h.tx.capacity() < h.tx.max_capacity());
            if !busy || t0.elapsed() > limit {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One channel's worker: each event tried until delivered, refused for good, or given up.
async fn deliver(
    label: String,
    ch: Channel,
    mut rx: mpsc::Receiver<Event>,
    give_up_after: Duration,
    metrics: Arc<Metrics>,
) {
    let policy = RetryPolicy {
        initial: Duration::from_millis(500),
        max_delay: Duration::from_secs(60),
        give_up_after,
    };
    while let Some(e) = rx.recv().await {
        let t0 = Instant::now();
        let mut attempt = 0u32;
        let result = loop {
            match ch.deliver(&e).await {
                Ok(()) => break "ok",
                Err(err) if err.transient && t0.elapsed() < give_up_after => {
                    let d = policy.delay(attempt);
                    warn!(channel = %label, event = %e.event, error = %err, attempt = attempt + 1, "alert delivery failed; retrying");
                    metrics.retries.with_label_values(&["notify"]).inc();
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                Err(err) => {
                    warn!(channel = %label, event = %e.event, error = %err, "alert delivery failed; giving up on this event");
                    break "failed";
                }
            }
        };
        if result == "ok" {
            info!(channel = %label, event = %e.event, status = ?e.status, "alert delivered");
        }
        metrics
            .alert_deliveries
            .with_label_values(&[&label, result])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, subject: Option<&str>) -> Event {
        let e = Event::new(kind, Severity::Critical, "s".into(), "d".into());
        match subject {
            Some(s) => e.about(s),
            None => e,
        }
    }

    #[test]
    fn a_condition_alerts_once_and_resolves_once() {
        let mut c = Conditions::default();
        let mut sent = Vec::new();
        for on in [false, true, true, true, false, false, true] {
            if let Some(e) = c.set(on, ev("rpo_breached", Some("offsite")), || {
                "ok again".into()
            }) {
                sent.push(e.status);
            }
        }
        assert_eq!(sent, [Status::Firing, Status::Resolved, Status::Firing]);
        assert_eq!(c.firing().len(), 1);
    }

    #[test]
    fn subjects_are_separate_conditions() {
        let mut c = Conditions::default();
        assert!(c.fire(ev("rpo_breached", Some("hot"))).is_some());
        assert!(c.fire(ev("rpo_breached", Some("offsite"))).is_some());
        assert!(c.fire(ev("rpo_breached", Some("hot"))).is_none());
        assert!(c.fire(ev("stream_disconnected", None)).is_some());
        let r = c
            .resolve("rpo_breached", Some("hot"), "back".into())
            .unwrap();
        assert_eq!((r.status, r.summary.as_str()), (Status::Resolved, "back"));
        assert!(c.resolve("rpo_breached", Some("hot"), "x".into()).is_none());
        assert_eq!(c.firing().len(), 2);
    }
}
