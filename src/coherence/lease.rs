//! Trust in the cache, granted by the listener for a while: a listener that stops hearing
//! anything, or whose task does not get to run, cannot leave the cache trusted for longer
//! than its lease.
//!
//! Every cache hit checks the lease, so it reads the kernel's coarse monotonic clock (a load
//! from the vDSO page, a few nanoseconds, updated every scheduler tick) instead of the precise
//! one (a timestamp-counter read and a conversion, about 25 ns here). The check allows for the
//! coarse clock lagging by up to five ticks, so a lease never lasts longer than granted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub(crate) struct Lease {
    trusted: AtomicBool,
    /// Trust lapses at this instant (nanoseconds on [`monotonic`]) unless renewed.
    until: AtomicU64,
    /// How far behind the true time [`monotonic`] may be (five of its ticks).
    lag: u64,
}

impl Lease {
    /// Not trusted until [`trust`](Self::trust).
    pub(crate) fn new() -> Lease {
        Lease {
            trusted: AtomicBool::new(false),
            until: AtomicU64::new(0),
            // A tick can come late (see `Clock::coarse_now`).
            lag: resolution().saturating_mul(crate::model::clock::STALLED_TICKS as u64),
        }
    }

    pub(crate) fn holds(&self) -> bool {
        self.trusted.load(Ordering::Acquire)
            && monotonic().saturating_add(self.lag) < self.until.load(Ordering::Acquire)
    }

    /// Extend the lease to `lease` from now (never shortening it).
    pub(crate) fn renew(&self, lease: Duration) {
        // The clock may lag: the lease then ends a few ticks early, never late.
        let until = monotonic().saturating_add(u64::try_from(lease.as_nanos()).unwrap_or(u64::MAX));
        self.until.fetch_max(until, Ordering::AcqRel);
    }

    pub(crate) fn trust(&self, lease: Duration) {
        self.renew(lease);
        self.trusted.store(true, Ordering::Release);
    }

    pub(crate) fn distrust(&self) {
        self.trusted.store(false, Ordering::Release);
    }
}

/// Nanoseconds on a monotonic clock that lags the true time by about a tick ([`resolution`]).
#[cfg(target_os = "linux")]
fn monotonic() -> u64 {
    nanos(rustix::time::clock_gettime(
        rustix::time::ClockId::MonotonicCoarse,
    ))
}

#[cfg(target_os = "linux")]
fn resolution() -> u64 {
    nanos(rustix::time::clock_getres(
        rustix::time::ClockId::MonotonicCoarse,
    ))
}

#[cfg(target_os = "linux")]
fn nanos(t: rustix::time::Timespec) -> u64 {
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

#[cfg(not(target_os = "linux"))]
fn monotonic() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(not(target_os = "linux"))]
fn resolution() -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lapses_unless_renewed_and_never_outlasts_its_grant() {
        let lease = Lease::new();
        assert!(!lease.holds(), "not trusted before trust");
        lease.trust(Duration::from_secs(3600));
        assert!(lease.holds());
        lease.distrust();
        assert!(!lease.holds());
        let short = Lease::new();
        short.trust(Duration::ZERO);
        assert!(!short.holds(), "a lease of nothing has lapsed at once");
        // A lease as short as the clock's lag cannot be vouched for either.
        short.trust(Duration::from_nanos(short.lag));
        assert!(!short.holds());
        short.renew(Duration::from_secs(3600));
        assert!(short.holds());
    }

    #[test]
    fn the_coarse_clock_lags_the_precise_one_by_less_than_the_lease_allows() {
        let lag = Lease::new().lag;
        assert!(lag <= 50_000_000, "{lag} ns");
        for _ in 0..100_000 {
            let coarse = monotonic();
            let precise = precise();
            assert!(coarse <= precise, "the coarse clock ran ahead");
            assert!(precise - coarse <= lag, "{} ns behind", precise - coarse);
        }
    }

    #[cfg(target_os = "linux")]
    fn precise() -> u64 {
        nanos(rustix::time::clock_gettime(
            rustix::time::ClockId::Monotonic,
        ))
    }

    #[cfg(not(target_os = "linux"))]
    fn precise() -> u64 {
        monotonic()
    }
}
