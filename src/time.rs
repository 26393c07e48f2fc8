//! Timestamps at the precision PostgreSQL stores, so that a value handed out equals what a
//! later read of it returns.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Now, truncated to microseconds.
pub(crate) fn now() -> DateTime<Utc> {
    to_micros(Utc::now())
}

/// `t` truncated to microseconds.
pub(crate) fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

/// A configured duration as a chrono one (configuration bounds durations to 100 years).
pub(crate) fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
