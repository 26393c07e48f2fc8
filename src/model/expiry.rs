//! The one expiry policy: when a session expires absolutely and by inactivity, and which
//! cutoffs reads, writes, the per-user cap, cleanup and status apply (the reasoning is in
//! `docs/design.md`, "Expiry").

use chrono::{DateTime, Utc};

use crate::config::Config;
use crate::model::clock::chrono_duration;
use crate::model::record::Record;

/// Absolute lifetime, inactivity timeout, and the grace that allows for accesses other nodes
/// have recorded but not yet flushed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExpiryPolicy {
    /// `Config::session_ttl`.
    pub ttl: chrono::Duration,
    /// `Config::idle_timeout`.
    pub idle: Option<chrono::Duration>,
    /// Two flush intervals: how late another node's access may reach the database.
    pub grace: chrono::Duration,
}

impl ExpiryPolicy {
    pub(crate) fn new(config: &Config) -> ExpiryPolicy {
        ExpiryPolicy {
            ttl: chrono_duration(config.session_ttl),
            idle: config.idle_timeout.map(chrono_duration),
            grace: chrono_duration(config.last_access_flush_interval * 2),
        }
    }

    /// The absolute expiry of a session created at `now`.
    pub(crate) fn expires_at(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + self.ttl
    }

    /// A session whose last access (this node's included) is at or before this is idle at
    /// `now`: what a read or a write of it checks.
    pub(crate) fn idle_cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.idle.map(|idle| now - idle)
    }

    /// A session whose *stored* last access is at or before this is idle however late other
    /// nodes flush theirs: what cleanup deletes, and what no longer counts against the cap.
    pub(crate) fn settled_cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.idle.map(|idle| now - idle - self.grace)
    }

    /// Whether `record` is expired at `now`, by its own timestamps.
    pub(crate) fn is_expired(&self, record: &Record, now: DateTime<Utc>) -> bool {
        record.is_expired(now, self.idle)
    }
}
