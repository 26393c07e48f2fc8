//! Reporting through the [`metrics`](https://docs.rs/metrics) facade (cargo feature
//! `metrics`): the application installs an exporter (Prometheus, StatsD, ...); pgsession only
//! reports. Counters and gauges are copied from the manager's own counters
//! ([`SessionManager::stats`](crate::SessionManager::stats)) once a second by a background
//! task, so the cache-hit path pays nothing for them; histograms are recorded where the time
//! is measured. With several managers in one process, counters add up and gauges show the
//! last manager to report.
//!
//! | name | kind | unit | what |
//! |---|---|---|---|
//! | `pgsession_cache_hits_total` | counter | reads | `get_session` answered from the cache |
//! | `pgsession_cache_misses_total` | counter | reads | `get_session` that read the database |
//! | `pgsession_cache_fills_rejected_total` | counter | fills | cache fills refused (an invalidation raced the read) |
//! | `pgsession_invalidations_received_total` | counter | invalidations | invalidations applied by the listener |
//! | `pgsession_invalidations_announced_total` | counter | invalidations | this node's invalidations announced |
//! | `pgsession_announce_failures_total` | counter | attempts | announcements that failed (retried) |
//! | `pgsession_listener_reconnects_total` | counter | reconnects | listener connections lost and re-established |
//! | `pgsession_resync_evictions_total` | counter | sessions | entries evicted by resynchronisation |
//! | `pgsession_forged_tokens_total` | counter | tokens | tokens refused because their signature failed |
//! | `pgsession_cap_evictions_total` | counter | sessions | sessions deleted by the per-user cap |
//! | `pgsession_expired_deleted_total` | counter | sessions | expired sessions deleted by cleanup |
//! | `pgsession_touches_dropped_total` | counter | accesses | accesses dropped (buffer full) |
//! | `pgsession_cache_distrusted_milliseconds_total` | counter | milliseconds | time the cache was distrusted, so every read went to the database |
//! | `pgsession_cache_entries` | gauge | sessions | sessions cached now |
//! | `pgsession_pending_touches` | gauge | accesses | accesses waiting for the flush |
//! | `pgsession_outbox_backlog` | gauge | invalidations | invalidations queued for announcement |
//! | `pgsession_cache_trusted` | gauge | 0 or 1 | whether the cache is served |
//! | `pgsession_operation_duration_seconds` | histogram, label `operation` | seconds | each public operation that does I/O (cache hits excluded: they take well under a microsecond) |
//! | `pgsession_resync_duration_seconds` | histogram | seconds | resynchronisations after a reconnect |

use std::sync::Once;
use std::time::{Duration, Instant};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use tokio_util::sync::CancellationToken;

use crate::Stats;

/// How often counters and gauges are reported.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// The counters: name, unit, description, and how to read it from [`Stats`].
type Reading = fn(&Stats) -> u64;
const COUNTERS: &[(&str, Unit, &str, Reading)] = &[
    (
        "pgsession_cache_hits_total",
        Unit::Count,
        "get_session calls answered from the cache",
        |s| s.hits,
    ),
    (
        "pgsession_cache_misses_total",
        Unit::Count,
        "get_session calls that read the database",
        |s| s.misses,
    ),
    (
        "pgsession_cache_fills_rejected_total",
        Unit::Count,
        "cache fills refused because an invalidation raced the read",
        |s| s.fills_rejected,
    ),
    (
        "pgsession_invalidations_received_total",
        Unit::Count,
        "invalidations applied by the listener",
        |s| s.invalidations,
    ),
    (
        "pgsession_invalidations_announced_total",
        Unit::Count,
        "this node's invalidations announced to the others",
        |s| s.invalidations_announced,
    ),
    (
        "pgsession_announce_failures_total",
        Unit::Count,
        "announcements that failed and were retried",
        |s| s.announce_failures,
    ),
    (
        "pgsession_listener_reconnects_total",
        Unit::Count,
        "listener connections lost and re-established",
        |s| s.reconnects,
    ),
    (
        "pgsession_resync_evictions_total",
        Unit::Count,
        "cache entries evicted by resynchronisation",
        |s| s.resync_evictions,
    ),
    (
        "pgsession_forged_tokens_total",
        Unit::Count,
        "tokens refused because their signature did not verify",
        |s| s.forged_tokens,
    ),
    (
        "pgsession_cap_evictions_total",
        Unit::Count,
        "sessions deleted to keep a user under the per-user cap",
        |s| s.cap_evictions,
    ),
    (
        "pgsession_expired_deleted_total",
        Unit::Count,
        "expired sessions deleted by cleanup",
        |s| s.cleanup_deleted,
    ),
    (
        "pgsession_touches_dropped_total",
        Unit::Count,
        "accesses dropped because the buffer was full",
        |s| s.touches_dropped,
    ),
    (
        "pgsession_cache_distrusted_milliseconds_total",
        Unit::Milliseconds,
        "time the cache was distrusted (reads went to the database)",
        |s| u64::try_from(s.degraded_time.as_millis()).unwrap_or(u64::MAX),
    ),
];

fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (name, unit, what, _) in COUNTERS {
            describe_counter!(*name, *unit, *what);
        }
        describe_gauge!(
            "pgsession_cache_entries",
            Unit::Count,
            "sessions cached now"
        );
        describe_gauge!(
            "pgsession_pending_touches",
            Unit::Count,
            "accesses waiting for the last-access flush"
        );
        describe_gauge!(
            "pgsession_outbox_backlog",
            Unit::Count,
            "invalidations queued for announcement"
        );
        describe_gauge!(
            "pgsession_cache_trusted",
            "1 while the cache is served, 0 while it is distrusted"
        );
        describe_histogram!(
            "pgsession_operation_duration_seconds",
            Unit::Seconds,
            "duration of each public operation that does I/O, by operation"
        );
        describe_histogram!(
            "pgsession_resync_duration_seconds",
            Unit::Seconds,
            "duration of the resynchronisation after a listener reconnects"
        );
    });
}

/// Report the manager's counters every [`EVERY`] until `cancel` or until the manager is gone
/// (`stats` returns `None`).
pub(crate) async fn publish(
    stats: impl Fn() -> Option<Stats>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    describe();
    let mut last = Stats::default();
    loop {
        let Some(now) = stats() else { return Ok(()) };
        for (name, _, _, reading) in COUNTERS {
            // Zero increments too: every counter exists from the first report on.
            counter!(*name).increment(reading(&now).saturating_sub(reading(&last)));
        }
        gauge!("pgsession_cache_entries").set(now.entries as f64);
        gauge!("pgsession_pending_touches").set(now.pending_touches as f64);
        gauge!("pgsession_outbox_backlog").set(now.outbox_backlog as f64);
        gauge!("pgsession_cache_trusted").set(if now.cache_trusted { 1.0 } else { 0.0 });
        last = now;
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// Times one operation; records its duration when dropped.
pub(crate) struct Timer {
    operation: &'static str,
    started: Instant,
}

impl Timer {
    pub(crate) fn start(operation: &'static str) -> Timer {
        Timer {
            operation,
            started: Instant::now(),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        metrics::histogram!("pgsession_operation_duration_seconds", "operation" => self.operation)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// Record a resynchronisation's duration.
pub(crate) fn resync_took(d: Duration) {
    metrics::histogram!("pgsession_resync_duration_seconds").record(d.as_secs_f64());
}
