//! The `[[notify]]` channels: a generic JSON webhook, a Slack-compatible webhook, and email
//! over SMTP (lettre: STARTTLS by default). Each delivery says whether trying again can help.
//!
//! Invariant: no error or log line carries a channel's URL (webhook URLs hold tokens) or an
//! SMTP password; HTTP errors are stripped of their URL before they are shown.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::alerts::{Event, Status};
use crate::config::daemon::{NotifyConfig, Secret, SmtpTls};

/// How long one delivery attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct DeliveryError {
    pub transient: bool,
    pub message: String,
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub enum Channel {
    Webhook {
        client: reqwest::Client,
        url: Secret,
        slack: bool,
    },
    Email {
        transport: Box<AsyncSmtpTransport<Tokio1Executor>>,
        from: Mailbox,
        to: Vec<Mailbox>,
    },
}

impl Channel {
    pub fn build(n: &NotifyConfig) -> Result<Channel, String> {
        match n {
            NotifyConfig::Webhook { url, .. } | NotifyConfig::Slack { url, .. } => {
                let client = reqwest::Client::builder()
                    .timeout(ATTEMPT_TIMEOUT)
                    .user_agent(concat!("archiver/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| e.without_url().to_string())?;
                Ok(Channel::Webhook {
                    client,
                    url: url.clone(),
                    slack: matches!(n, NotifyConfig::Slack { .. }),
                })
            }
            NotifyConfig::Email {
                host,
                port,
                tls,
                from,
                to,
                username,
                ..
            } => {
                let mut b = match tls {
                    SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                        .map_err(|e| e.to_string())?,
                    SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                        .map_err(|e| e.to_string())?,
                    SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
                };
                if let Some(p) = port {
                    b = b.port(*p);
                }
                if let (Some(user), Some(pass)) = (username, n.smtp_password()?) {
                    b = b.credentials(Credentials::new(user.clone(), pass.expose().to_string()));
                }
                let transport = Box::new(b.timeout(Some(ATTEMPT_TIMEOUT)).build());
                let parse = |a: &String| a.parse::<Mailbox>().map_err(|e| format!("{a:?}: {e}"));
                Ok(Channel::Email {
                    transport,
                    from: parse(from)?,
                    to: to.iter().map(parse).collect::<Result<_, _>>()?,
                })
            }
        }
    }

    pub async fn deliver(&self, e: &Event) -> Result<(), DeliveryError> {
        match self {
            Channel::Webhook { client, url, slack } => {
                let body = if *slack {
                    serde_json::json!({ "text": text(e) })
                } else {
                    serde_json::to_value(e).expect("an event serializes")
                };
                let r = client
                    .post(url.expose())
                    .json(&body)
                    .send()
                    .await
                    .map_err(|err| DeliveryError {
                        transient: true,
                        message: err.without_url().to_string(),
                    })?;
                let s = r.status();
                if s.is_success() {
                    return Ok(());
                }
                Err(DeliveryError {
                    transient: s.is_server_error() || s.as_u16() == 429 || s.as_u16() == 408,
                    message: format!("the receiver answered HTTP {s}"),
                })
            }
            Channel::Email {
                transport,
                from,
                to,
            } => {
                let mut m = Message::builder().from(from.clone()).subject(subject(e));
                for t in to {
                    m = m.to(t.clone());
                }
                let m = m.body(text(e)).map_err(|err| DeliveryError {
                    transient: false,
                    message: err.to_string(),
                })?;
                transport
                    .send(m)
                    .await
                    .map(|_| ())
                    .map_err(|err| DeliveryError {
                        transient: !err.is_permanent(),
                        message: format!("SMTP: {err}"),
                    })
            }
        }
    }
}

fn status_word(e: &Event) -> &'static str {
    match e.status {
        Status::Firing => "FIRING",
        Status::Resolved => "RESOLVED",
    }
}

fn subject(e: &Event) -> String {
    let env = e
        .environment
        .as_deref()
        .map(|v| format!(" {v}"))
        .unwrap_or_default();
    format!("[archiver{env}] {}: {}", status_word(e), e.summary)
}

/// The human text of an event (Slack's `text`, the email's body).
pub fn text(e: &Event) -> String {
    let env = e
        .environment
        .as_deref()
        .map(|v| format!("[{v}] "))
        .unwrap_or_default();
    let mut s = format!(
        "{env}{} {:?} {}: {}\n",
        status_word(e),
        e.severity,
        e.event,
        e.summary
    );
    if !e.details.is_empty() {
        s.push_str(&e.details);
        s.push('\n');
    }
    s.push_str(&format!("at {}", e.time));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::alerts::Severity;

    #[test]
    fn texts_name_the_environment_and_status() {
        let mut e = Event::new(
            "backup_failed",
            Severity::Critical,
            "backup failed after 4 attempts".into(),
            "connection refused".into(),
        );
        e.environment = Some("prod".into());
        assert!(subject(&e).starts_with("[archiver prod] FIRING: backup failed"));
        let t = text(&e);
        assert!(
            t.starts_with("[prod] FIRING Critical backup_failed: backup failed"),
            "{t}"
        );
        assert!(t.contains("connection refused"));
    }
}
