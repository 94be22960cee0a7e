//! Progress of long work (a backup, later a restore): a bar with bytes done / total, rate and
//! ETA when stderr is a terminal and logs are human-readable; otherwise an `info` log line every
//! few seconds with the same figures. Never both, and never on a non-terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

/// Set by the command layer when logs are JSON (a bar would corrupt a machine-read stream).
static PLAIN_ONLY: AtomicBool = AtomicBool::new(false);

/// Never draw bars in this process (JSON logs).
pub fn disable_bars() {
    PLAIN_ONLY.store(true, Ordering::Relaxed);
}

const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    /// `what` names the work in log lines (`"backup"`).
    pub fn new(what: &'static str) -> Progress {
        let tty = std::io::stderr().is_terminal() && !PLAIN_ONLY.load(Ordering::Relaxed);
        let bar = tty.then(|| {
            // Hidden until the total is known (an empty bar would be drawn full).
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(what);
            b
        });
        Progress {
            what,
            bar,
            total: 0,
            done: 0,
            started: Instant::now(),
            last_log: Instant::now(),
        }
    }

    /// The expected total, in bytes (0: unknown).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_draw_target(ProgressDrawTarget::stderr());
        }
    }

    /// Bytes done so far.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        if let Some(b) = &self.bar {
            // The server's estimate can fall short of what it finally sends.
            if done > self.total {
                self.total = done;
                b.set_length(done);
            }
            b.set_position(done);
            return;
        }
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            let rate = done as f64 / secs;
            let pct = if self.total > 0 {
                done as f64 * 100.0 / self.total as f64
            } else {
                0.0
            };
            let eta = if self.total > done && rate > 0.0 {
                format!("{:.0}s", (self.total - done) as f64 / rate)
            } else {
                "-".into()
            };
            info!(
                done_bytes = done,
                total_bytes = self.total,
                percent = format!("{pct:.1}"),
                rate_mb_s = format!("{:.1}", rate / 1e6),
                eta = %eta,
                "{} progress",
                self.what
            );
        }
    }

    /// Removes the bar (the work is over, or failed).
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
