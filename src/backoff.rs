//! The one retry schedule of the background tasks: a few immediate attempts (a dead connection
//! fails at once and the next attempt takes a fresh one), then pauses doubling up to a ceiling.

use std::time::Duration;

/// Pauses before successive retries.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    immediate: u32,
    first: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// `immediate` retries without a pause, then `first`, doubling up to `max`.
    pub(crate) fn new(immediate: u32, first: Duration, max: Duration) -> Backoff {
        Backoff {
            immediate,
            first: first.min(max),
            max,
            failures: 0,
        }
    }

    /// The pause before the next attempt, after one more failure.
    pub(crate) fn next_pause(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if self.failures <= self.immediate {
            return Duration::ZERO;
        }
        let doublings = (self.failures - self.immediate - 1).min(30);
        self.first
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Start again from the first pause (after a success).
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_retries_then_doubling_to_the_ceiling() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(2, ms(50), ms(300));
        let pauses: Vec<Duration> = (0..7).map(|_| b.next_pause()).collect();
        assert_eq!(
            pauses,
            [ms(0), ms(0), ms(50), ms(100), ms(200), ms(300), ms(300)]
        );
        b.reset();
        assert_eq!(b.next_pause(), ms(0));
        let mut b = Backoff::new(0, ms(50), ms(10));
        assert_eq!(b.next_pause(), ms(10), "never above the ceiling");
    }
}
