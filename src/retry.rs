//! The one retry helper: exponential backoff with full jitter, for errors classified transient.

use std::future::Future;
use std::time::{Duration, Instant};

/// Errors that know whether retrying can help.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_delay: Duration,
    /// Give up once this much time has passed since the first failure.
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            give_up_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `n` (0-based): uniform in `[0, min(max, initial * 2^n)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let cap = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        Duration::from_nanos(fastrand::u64(0..=cap.as_nanos() as u64))
    }
}

/// Runs `op` until it succeeds, fails permanently, or the policy gives up.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, what: &str, mut op: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && start.elapsed() < policy.give_up_after => {
                let d = policy.delay(attempt);
                tracing::warn!(error = %e, attempt = attempt + 1, delay_ms = d.as_millis() as u64, "{what} failed; retrying");
                tokio::time::sleep(d).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// An error and its sources, as "outer: inner: …" (what operators read in a catalog record).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(bool);
    impl Transient for E {
        fn is_transient(&self) -> bool {
            self.0
        }
    }
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "E({})", self.0)
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            give_up_after: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let mut n = 0;
        let r: Result<u32, E> = retry(&fast(), "op", || {
            n += 1;
            let v = n;
            async move {
                if v < 3 {
                    Err(E(true))
                } else {
                    Ok(v)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
    }

    #[tokio::test]
    async fn permanent_fails_at_once() {
        let mut n = 0;
        let r: Result<(), E> = retry(&fast(), "op", || {
            n += 1;
            async { Err(E(false)) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n, 1);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            give_up_after: Duration::ZERO,
        };
        for a in 0..40 {
            let d = p.delay(a);
            assert!(d <= Duration::from_secs(1));
            assert!(d <= Duration::from_millis(100) * 2u32.pow(a.min(10)));
        }
    }
}
