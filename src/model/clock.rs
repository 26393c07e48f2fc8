//! Time as the library reads it: [`Clock`], the system's by default or one a test moves by
//! hand, always at the precision PostgreSQL stores (microseconds), so that a value handed out
//! equals what a later read of it returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Where a manager reads the time: the system clock ([`Clock::system`], the default), or a
/// clock moved by hand ([`Clock::manual`]) so that tests of expiry need not wait. Every
/// expiry decision of a manager (absolute and idle expiry, attribute expiry, cleanup, counts
/// of activity) and of the sessions it hands out reads this clock; timeouts of connections and
/// tasks do not. Clones share one time.
///
/// ```
/// use pgsession::{Clock, Config};
///
/// let clock = Clock::manual("2030-01-01T00:00:00Z".parse().unwrap());
/// let config = Config { clock: clock.clone(), ..Config::default() };
/// clock.advance(std::time::Duration::from_secs(3600));
/// assert_eq!(clock.now().to_rfc3339(), "2030-01-01T01:00:00+00:00");
/// ```
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that shows `start` until [`advance`](Self::advance)d or [`set`](Self::set).
    pub fn manual(start: DateTime<Utc>) -> Clock {
        Clock(Some(Arc::new(AtomicI64::new(start.timestamp_micros()))))
    }

    /// Now, to the microsecond.
    pub fn now(&self) -> DateTime<Utc> {
        match &self.0 {
            // One conversion to a date, at microsecond precision (Utc::now() then truncating
            // made two; this is on every cache hit).
            None => {
                let since = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
                DateTime::from_timestamp(secs, since.subsec_micros() * 1000).unwrap_or_default()
            }
            Some(micros) => {
                DateTime::from_timestamp_micros(micros.load(Ordering::Acquire)).unwrap_or_default()
            }
        }
    }

    /// Now as the kernel's coarse clock reads it, and the latest the true time may be (five
    /// scheduler ticks later, 20 ms here; the same on a manual clock). Reading it costs a load
    /// from the vDSO page instead of a timestamp-counter read and its conversion (about 35 ns
    /// here), so the cache-hit path reads it and decides expiry at the latest time: a session
    /// is never served past its expiry, and one within the margin of it takes the exact path.
    pub(crate) fn coarse_now(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        match &self.0 {
            None => coarse::now(),
            Some(_) => {
                let now = self.now();
                (now, now)
            }
        }
    }

    /// Move a manual clock forward by `by`.
    ///
    /// # Panics
    ///
    /// On the system clock, which only time moves.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.manual_time().fetch_add(micros, Ordering::AcqRel);
    }

    /// Set a manual clock to `at`.
    ///
    /// # Panics
    ///
    /// On the system clock.
    pub fn set(&self, at: DateTime<Utc>) {
        self.manual_time()
            .store(at.timestamp_micros(), Ordering::Release);
    }

    fn manual_time(&self) -> &AtomicI64 {
        self.0
            .as_deref()
            .expect("only a Clock::manual can be moved by hand")
    }
}

#[cfg(target_os = "linux")]
mod coarse {
    use chrono::{DateTime, Utc};
    use rustix::time::{ClockId, clock_getres, clock_gettime};
    use std::sync::OnceLock;

    /// A reading and the dates made of it.
    type Tick = (i64, i64, DateTime<Utc>, DateTime<Utc>);

    thread_local! {
        // The coarse clock moves once a tick: each thread converts a reading to dates once.
        static LAST: std::cell::Cell<Option<Tick>> = const { std::cell::Cell::new(None) };
    }

    pub(super) fn now() -> (DateTime<Utc>, DateTime<Utc>) {
        static LAG: OnceLock<chrono::Duration> = OnceLock::new();
        let t = clock_gettime(ClockId::RealtimeCoarse);
        if let Some((sec, nsec, now, latest)) = LAST.get()
            && (sec, nsec) == (t.tv_sec, t.tv_nsec)
        {
            return (now, latest);
        }
        let lag = *LAG.get_or_init(|| {
            // The clock moves once a tick (its resolution), but the CPU keeping time can stall
            // its update (a virtual machine's exit, interrupt latency: a microsecond past one
            // tick was measured here); Linux has another CPU take over after five stalled
            // ticks (`MAX_STALLED_JIFFIES`), so five ticks is the margin.
            let res = clock_getres(ClockId::RealtimeCoarse);
            (chrono::Duration::seconds(res.tv_sec) + chrono::Duration::nanoseconds(res.tv_nsec))
                * super::STALLED_TICKS
                + chrono::Duration::microseconds(1)
        });
        let micros = u32::try_from(t.tv_nsec / 1000).unwrap_or(0);
        match DateTime::from_timestamp(t.tv_sec, micros * 1000)
            .and_then(|now| Some((now, now.checked_add_signed(lag)?)))
        {
            Some((now, latest)) => {
                LAST.set(Some((t.tv_sec, t.tv_nsec, now, latest)));
                (now, latest)
            }
            None => {
                let now = super::Clock::system().now();
                (now, now)
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod coarse {
    use chrono::{DateTime, Utc};

    pub(super) fn now() -> (DateTime<Utc>, DateTime<Utc>) {
        let now = super::Clock::system().now();
        (now, now)
    }
}

/// How many ticks the coarse clocks may fall behind (see `coarse::now`).
pub(crate) const STALLED_TICKS: i32 = 5;

/// `t` truncated to microseconds.
pub(crate) fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// A configured duration as a chrono one (configuration bounds durations to 100 years).
pub(crate) fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_reads_now_to_the_microsecond() {
        let before = to_micros(Utc::now());
        let now = Clock::system().now();
        let after = Utc::now();
        assert!(before <= now && now <= after, "{before} {now} {after}");
        assert_eq!(now.timestamp_subsec_nanos() % 1000, 0);
        assert_eq!(to_micros(now), now);
    }

    #[test]
    fn the_coarse_clock_is_behind_the_true_time_by_at_most_its_lag() {
        let clock = Clock::system();
        for _ in 0..100_000 {
            let (coarse, latest) = clock.coarse_now();
            let precise = clock.now();
            assert!(latest - coarse <= chrono::Duration::milliseconds(51));
            assert!(coarse <= precise, "{coarse} ahead of {precise}");
            assert!(precise <= latest, "{precise} past {latest}");
            assert_eq!(to_micros(coarse), coarse);
        }
        let manual = Clock::manual(Utc::now());
        assert_eq!(manual.coarse_now(), (manual.now(), manual.now()));
    }
}
