//! Configuration: every knob, its default, and validation.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::model::clock::Clock;
use crate::model::token::SigningKey;
use crate::storage::postgres::names::{self, Names};

/// What [`SessionManager::create_session`](crate::SessionManager::create_session) does when the
/// user already has [`Config::max_sessions_per_user`] live sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaxSessionsPolicy {
    /// Delete the user's least recently used sessions, in the same transaction as the insert,
    /// so that the new one fits. The default: a new login always works.
    #[default]
    EvictOldest,
    /// Refuse the new session with [`Error::MaxSessionsReached`]; nothing is written.
    Reject,
}

/// Configuration of a [`SessionManager`](crate::SessionManager).
///
/// All fields are public; start from [`Config::default()`] and change what you need. The
/// manager validates the whole configuration when it is constructed and returns
/// [`Error::InvalidConfig`] naming the offending field. Limits: every duration greater than
/// zero and at most 100 years; batch sizes and `max_pending_touches` from 1 to 1 000 000;
/// `schema` at most 63 bytes, `table_prefix` at most 24, and together short enough for the
/// notification channel `pgsession.<schema>.<prefix>sessions` to fit 63 bytes.
#[derive(Clone, Debug)]
pub struct Config {
    /// Most live sessions one user may have; `None` means unlimited. Default `Some(5)`.
    pub max_sessions_per_user: Option<usize>,
    /// What happens when a new session would exceed the cap. Default
    /// [`MaxSessionsPolicy::EvictOldest`].
    pub max_sessions_policy: MaxSessionsPolicy,
    /// Largest size of one attribute, in bytes: its compact JSON encoding as an object member,
    /// key included (`"key":value`). Default 16 KiB (16384).
    pub max_attribute_size: usize,
    /// Largest size of a session's attributes together, in bytes, as PostgreSQL's `jsonb`
    /// prints them (`octet_length(attributes::text)`: the compact JSON text with a space after
    /// every `:` and `,`). Checked on the merged result of every create, update and login
    /// (so other writers' keys count), refusing with [`Error::SessionTooLarge`] and writing
    /// nothing; only growth is refused, so a session over a lowered limit can still shrink.
    /// Default 1 MiB (1048576): far above what sessions hold (a login, a cart, flash messages:
    /// kilobytes), yet it bounds what one session costs. A session is copied whole into the
    /// cache of every node that reads it (`cache_capacity` × this is the cache's worst case),
    /// and PostgreSQL rewrites the whole row on every update: 1 MiB costs an update tens of
    /// milliseconds, where 64 MiB took seconds and a gigabyte of the writer's memory.
    pub max_session_size: usize,
    /// Absolute lifetime of a session from its creation. Default 30 days.
    /// [`Session::set_expires_at`](crate::Session::set_expires_at) can move it.
    pub session_ttl: Duration,
    /// A session not accessed for this long is expired; `None` disables inactivity expiry.
    /// Default `Some(48 hours)`. Accesses on other nodes count once they are flushed, within
    /// [`last_access_flush_interval`](Self::last_access_flush_interval), so it must be at least
    /// twice that interval. Cleanup deletes an idle session only after `idle_timeout` plus two
    /// flush intervals (a node may still hold an unflushed access); all nodes should use the
    /// same flush interval.
    pub idle_timeout: Option<Duration>,
    /// How often each node deletes expired sessions from the table. Default 1 hour. The first
    /// run happens at a random point within the first interval so that nodes started together
    /// spread out.
    pub cleanup_interval: Duration,
    /// Whether this node runs the periodic cleanup at all (turn it off when a single job does
    /// it, e.g. a cron calling [`SessionManager::cleanup_expired`](crate::SessionManager)).
    /// Default true.
    pub run_cleanup: bool,
    /// Rows deleted per cleanup statement (each its own short transaction). Default 1000.
    pub cleanup_batch_size: usize,
    /// Sessions held in the in-process cache, exactly (one budget across its shards); 0
    /// disables the cache (every read goes to the database). At most 10 000 000. Default
    /// 10 000.
    pub cache_capacity: usize,
    /// Longest time a cached session is served without re-reading it; bounds how long writes
    /// made outside pgsession (an admin's SQL) can go unseen. `None` = no bound. Default
    /// `Some(5 minutes)`.
    pub cache_max_age: Option<Duration>,
    /// How often recorded accesses are written to `last_accessed_at`. Default 60 seconds.
    pub last_access_flush_interval: Duration,
    /// Most sessions per last-access UPDATE statement; a node with this many pending accesses
    /// flushes early. Default 5000.
    pub last_access_batch_size: usize,
    /// Most accesses held in memory awaiting a flush (about 40 bytes each). When the database is
    /// unreachable for long, accesses beyond this are dropped and counted in
    /// [`Stats::touches_dropped`](crate::Stats). Default 100 000.
    pub max_pending_touches: usize,
    /// PostgreSQL schema holding the tables; `None` means `public`. Lower-case letters, digits
    /// and `_`, not starting with a digit. Default `None`.
    pub schema: Option<String>,
    /// Prefix for table, function and index names (e.g. `"app_"` gives `app_sessions`). Same
    /// character rules as `schema`, at most 24 characters. Default empty.
    pub table_prefix: String,
    /// Apply pending migrations from `migrations/` at start-up, under an advisory lock so that
    /// nodes starting together do not race. When false, the manager only checks that the schema
    /// is current. Default true.
    pub run_migrations: bool,
    /// Connection URL for the connections that must reach the server itself: LISTEN, the
    /// announcer's, the probes that tell whether the server can be reached (and, with
    /// [`transaction_pooling`](Self::transaction_pooling), migrations). Needed when the pool
    /// cannot carry LISTEN (PgBouncer in transaction mode, a hot standby). It must reach the
    /// same database, on the primary: the resynchronisation after a reconnect reads session
    /// versions through it. Several servers may be given, as for the pool's URL
    /// (`postgres://u@h1,h2/db?target_session_attrs=read-write`). `None` uses the pool's
    /// servers. Default `None`.
    pub listen_url: Option<String>,
    /// Whether the pool reaches PostgreSQL through a transaction-mode pooler (PgBouncer with
    /// `pool_mode = transaction`, PgCat, Supavisor, RDS Proxy), where a server connection is
    /// ours for one transaction only. Then every statement runs in a transaction of its own as
    /// an unnamed prepared statement (two more round trips: `BEGIN`, `COMMIT`), nothing is set
    /// on connections at startup (poolers refuse the `options` startup parameter), and
    /// migrations, the listener, the announcer and the probes of the server's reachability use
    /// `listen_url`, which must then reach the server itself (required). With PgBouncer, list
    /// `extra_float_digits` in its `ignore_startup_parameters`. Default false.
    pub transaction_pooling: bool,
    /// When no notification has arrived for this long, the listener sends itself a notification
    /// and waits for it to come back, which proves that notifications are still delivered (a
    /// silently dead, half-open connection would otherwise go unnoticed). A dead connection is
    /// thus noticed within `listener_probe_interval + listener_timeout`. Default 2 seconds.
    pub listener_probe_interval: Duration,
    /// How long a probe, a (re)connection of the listener and the resynchronisation after it may
    /// take before the attempt counts as failed; also how long `connect`/`new` wait for the
    /// listener before starting without a trusted cache. Default 2 seconds.
    pub listener_timeout: Duration,
    /// Longest wait between listener reconnection attempts (the wait starts at 50 ms and doubles).
    /// Reconnection never gives up while the manager runs. Default 5 seconds.
    pub listener_max_backoff: Duration,
    /// How long [`SessionManager::shutdown`](crate::SessionManager::shutdown) waits for the
    /// calls under way, the final flush and the background tasks before aborting them.
    /// Default 10 seconds.
    pub shutdown_timeout: Duration,
    /// Longest wait for a new connection to the server: the first one at start-up (a server
    /// that refuses connections, or cannot be reached, fails `connect` at once with the cause;
    /// one that does not answer, after this) and the probes that find out whether a server
    /// that stopped answering is back. Default 5 seconds.
    pub connect_timeout: Duration,
    /// Keys that sign session tokens; empty by default. The first signs new tokens, every one
    /// verifies, so keys can be rotated (new key first, old key removed once the sessions it
    /// signed have expired). With keys, a token whose signature does not verify opens nothing
    /// on any node, whatever its cache holds, and costs no database read; it is counted in
    /// [`Stats::forged_tokens`](crate::Stats). A cache hit compares the token's tag with the
    /// one verified for that session (16 bytes) instead of recomputing the MAC. All nodes need
    /// the same keys.
    pub signing_keys: Vec<SigningKey>,
    /// Whether tokens made before pgsession hashed them (hyphenated UUIDs, unsigned) open their
    /// sessions whatever the database holds. Default false: they are accepted only while
    /// sessions converted by migration 3 may still be alive (recorded by migration 5: until the
    /// last of them expires), so an upgrade keeps users logged in and the door closes by
    /// itself. Refused ones are counted in [`Stats::forged_tokens`](crate::Stats). Set it for
    /// sessions inserted with such ids by another tool.
    pub accept_legacy_tokens: bool,
    /// Whether creates are announced to the other nodes, so that their
    /// [`subscribe_events`](crate::SessionManager::subscribe_events) receivers see
    /// [`Created`](crate::SessionEventKind::Created) events from everywhere. Off by default:
    /// caches need no word of a new session, and announcing costs each create an outbox row
    /// and a share of a NOTIFY (see BENCHMARKS.md for the measured cost). This node's own
    /// receivers see its creates either way.
    pub announce_creates: bool,
    /// Where expiry decisions read the time: [`Clock::system`] (the default), or a
    /// [`Clock::manual`] that tests move by hand instead of waiting.
    pub clock: Clock,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_sessions_per_user: Some(5),
            max_sessions_policy: MaxSessionsPolicy::EvictOldest,
            max_attribute_size: 16 * 1024,
            max_session_size: 1024 * 1024,
            session_ttl: Duration::from_secs(30 * 86_400),
            idle_timeout: Some(Duration::from_secs(48 * 3600)),
            cleanup_interval: Duration::from_secs(3600),
            run_cleanup: true,
            cleanup_batch_size: 1000,
            cache_capacity: 10_000,
            cache_max_age: Some(Duration::from_secs(300)),
            last_access_flush_interval: Duration::from_secs(60),
            last_access_batch_size: 5000,
            max_pending_touches: 100_000,
            schema: None,
            table_prefix: String::new(),
            run_migrations: true,
            listen_url: None,
            transaction_pooling: false,
            listener_probe_interval: Duration::from_secs(2),
            listener_timeout: Duration::from_secs(2),
            listener_max_backoff: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            signing_keys: Vec::new(),
            accept_legacy_tokens: false,
            announce_creates: false,
            clock: Clock::system(),
        }
    }
}

/// Longest table prefix: the longest derived name (`<prefix>sessions_attributes_expire_at_idx`,
/// 33 more characters) must fit PostgreSQL's 63-byte identifiers.
const MAX_PREFIX_LEN: usize = 24;
/// PostgreSQL truncates identifiers and channel names beyond 63 bytes.
const MAX_IDENT_LEN: usize = 63;
/// Largest cache; `LruCache` allocates its index for the full capacity at once.
const MAX_CACHE_CAPACITY: usize = 10_000_000;

impl Config {
    /// Check every field; the error names the first bad one.
    pub(crate) fn validate(&self) -> Result<Names> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.max_sessions_per_user == Some(0) {
            return bad("max_sessions_per_user must be at least 1 (use None for unlimited)".into());
        }
        if self
            .max_sessions_per_user
            .is_some_and(|n| n > i32::MAX as usize)
        {
            return bad("max_sessions_per_user is too large".into());
        }
        if self.max_attribute_size == 0 {
            return bad("max_attribute_size must be at least 1 byte".into());
        }
        // "{}", the empty attributes, must fit; PostgreSQL's octet_length is an i32.
        if self.max_session_size < 2 || self.max_session_size > i32::MAX as usize {
            return bad("max_session_size must be from 2 bytes to 2 GiB".into());
        }
        for (name, d) in [
            ("session_ttl", Some(self.session_ttl)),
            ("idle_timeout", self.idle_timeout),
            ("cleanup_interval", Some(self.cleanup_interval)),
            ("cache_max_age", self.cache_max_age),
            (
                "last_access_flush_interval",
                Some(self.last_access_flush_interval),
            ),
            (
                "listener_probe_interval",
                Some(self.listener_probe_interval),
            ),
            ("listener_timeout", Some(self.listener_timeout)),
            ("listener_max_backoff", Some(self.listener_max_backoff)),
            ("shutdown_timeout", Some(self.shutdown_timeout)),
            ("connect_timeout", Some(self.connect_timeout)),
        ] {
            if let Some(d) = d {
                if d.is_zero() {
                    return bad(format!("{name} must be greater than zero"));
                }
                // chrono durations and timestamps must be able to hold it.
                if d > Duration::from_secs(100 * 365 * 86_400) {
                    return bad(format!("{name} must be at most 100 years"));
                }
            }
        }
        for (name, n) in [
            ("cleanup_batch_size", self.cleanup_batch_size),
            ("last_access_batch_size", self.last_access_batch_size),
            ("max_pending_touches", self.max_pending_touches),
        ] {
            if n == 0 {
                return bad(format!("{name} must be at least 1"));
            }
            if n > 1_000_000 {
                return bad(format!("{name} must be at most 1000000"));
            }
        }

        if self.cache_capacity > MAX_CACHE_CAPACITY {
            return bad(format!(
                "cache_capacity must be at most {MAX_CACHE_CAPACITY} (the cache index is allocated up front)"
            ));
        }
        if let Some(idle) = self.idle_timeout
            && idle < self.last_access_flush_interval * 2
        {
            return bad(format!(
                "idle_timeout ({idle:?}) must be at least twice last_access_flush_interval \
                 ({:?}): accesses reach other nodes only when flushed",
                self.last_access_flush_interval
            ));
        }

        if self.transaction_pooling && self.listen_url.is_none() {
            return bad(
                "transaction_pooling needs listen_url: LISTEN, the announcer and migrations \
                 need a connection to the server itself, not through the pooler"
                    .into(),
            );
        }
        let schema = self.schema.as_deref().unwrap_or("public");
        check_identifier("schema", schema, MAX_IDENT_LEN)?;
        if !self.table_prefix.is_empty() {
            check_identifier("table_prefix", &self.table_prefix, MAX_PREFIX_LEN)?;
        }
        let prefix = self.table_prefix.as_str();
        let channel = names::channel(schema, prefix);
        if channel.len() > MAX_IDENT_LEN {
            return bad(format!(
                "schema and table_prefix together are too long: the notification channel \
                 {channel:?} must fit {MAX_IDENT_LEN} bytes"
            ));
        }
        Ok(Names::new(schema, prefix))
    }
}

/// Accept only names that need no escaping anywhere: `[a-z_][a-z0-9_]*`.
fn check_identifier(field: &str, value: &str, max_len: usize) -> Result<()> {
    let mut chars = value.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok_first || !ok_rest {
        return Err(Error::InvalidConfig(format!(
            "{field} {value:?} is not a valid identifier: use lower-case ASCII letters, digits \
             and '_', not starting with a digit"
        )));
    }
    if value.len() > max_len {
        return Err(Error::InvalidConfig(format!(
            "{field} {value:?} is longer than {max_len} characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid_and_names_are_quoted() {
        let names = Config::default().validate().unwrap();
        assert_eq!(names.sessions, "\"public\".\"sessions\"");
        assert_eq!(names.channel, "pgsession.public.sessions");
    }

    #[test]
    fn identifiers_that_would_need_escaping_are_rejected() {
        for bad in [
            "Public",
            "a-b",
            "1abc",
            "x\"; drop table y; --",
            "",
            "sch ema",
        ] {
            let config = Config {
                schema: Some(bad.into()),
                ..Config::default()
            };
            assert!(
                matches!(config.validate(), Err(Error::InvalidConfig(_))),
                "{bad:?} accepted"
            );
        }
        let config = Config {
            table_prefix: "a".repeat(25),
            ..Config::default()
        };
        assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn zero_durations_and_sizes_are_rejected() {
        let cases = [
            Config {
                session_ttl: Duration::ZERO,
                ..Config::default()
            },
            Config {
                idle_timeout: Some(Duration::ZERO),
                ..Config::default()
            },
            Config {
                max_sessions_per_user: Some(0),
                ..Config::default()
            },
            Config {
                last_access_batch_size: 0,
                ..Config::default()
            },
            Config {
                max_attribute_size: 0,
                ..Config::default()
            },
            Config {
                cache_capacity: usize::MAX / 2,
                ..Config::default()
            },
            Config {
                idle_timeout: Some(Duration::from_secs(60)),
                last_access_flush_interval: Duration::from_secs(60),
                ..Config::default()
            },
        ];
        for config in cases {
            assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))));
        }
    }
}
