//! The live RPO of each tier, in seconds: how long ago the server had written the oldest WAL
//! that tier does not yet hold.
//!
//! The daemon samples the server's WAL end (from the stream's messages) once a second; for a
//! tier whose durable position is `d`, the RPO is the age of the first sample beyond `d` (0
//! when the tier holds everything the server has said it wrote). Samples no tier still needs
//! are dropped, so memory stays bounded by the lag, not by uptime.

use std::collections::VecDeque;

use crate::time::Timestamp;
use crate::wal::Lsn;

/// Server WAL ends over time.
#[derive(Debug, Default)]
pub struct LagClock {
    /// `(when the server had reached it, server WAL end)`, both increasing.
    samples: VecDeque<(Timestamp, Lsn)>,
}

/// At most this many samples (a day at one a second), whatever the lag.
const MAX_SAMPLES: usize = 86_400;

impl LagClock {
    /// Records that the server's WAL had reached `end` at `at`.
    pub fn sample(&mut self, at: Timestamp, end: Lsn) {
        if self.samples.back().is_some_and(|&(_, l)| end <= l) {
            return;
        }
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back((at, end));
    }

    /// Seconds between `now` and when the server first had WAL beyond `durable`; 0 when
    /// `durable` covers every sample (or there are none).
    pub fn rpo_seconds(&self, durable: Lsn, now: Timestamp) -> f64 {
        match self.samples.iter().find(|&&(_, l)| l > durable) {
            Some(&(at, _)) => (now.as_millisecond() - at.as_millisecond()).max(0) as f64 / 1000.0,
            None => 0.0,
        }
    }

    /// Forgets what every tier is past (`min_durable`: the least durable position of all),
    /// keeping the newest sample at or before it (the base for the next one).
    pub fn prune(&mut self, min_durable: Lsn) {
        while self.samples.len() > 1 && self.samples[1].1 <= min_durable {
            self.samples.pop_front();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.samples.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn rpo_is_the_age_of_the_oldest_missing_wal() {
        let mut c = LagClock::default();
        assert_eq!(c.rpo_seconds(Lsn(0), at(0)), 0.0);
        c.sample(at(0), Lsn(100));
        c.sample(at(1), Lsn(100)); // no new WAL: not a sample
        c.sample(at(10), Lsn(200));
        c.sample(at(20), Lsn(300));
        assert_eq!(c.len(), 3);
        for (durable, want) in [
            (Lsn(300), 0.0),  // holds everything
            (Lsn(400), 0.0),  // (ahead of a sample)
            (Lsn(250), 10.0), // misses what came at 20 s: written 10 s before now (30 s)
            (Lsn(200), 10.0),
            (Lsn(150), 20.0), // misses what came at 10 s
            (Lsn(50), 30.0),  // misses everything since 0 s
        ] {
            assert_eq!(c.rpo_seconds(durable, at(30)), want, "{durable}");
        }
    }

    #[test]
    fn pruning_keeps_what_a_tier_still_needs() {
        let mut c = LagClock::default();
        for s in 0..10 {
            c.sample(at(s), Lsn(100 * (s as u64 + 1)));
        }
        c.prune(Lsn(550));
        // Samples up to 500 go but the last one (the base); 600 onwards stay.
        assert_eq!(c.len(), 6);
        assert_eq!(c.rpo_seconds(Lsn(550), at(20)), 15.0);
        c.prune(Lsn(5000));
        assert_eq!(c.len(), 1);
        assert_eq!(c.rpo_seconds(Lsn(1000), at(20)), 0.0);
    }
}
