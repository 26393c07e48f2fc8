//! One behavioural suite, run against both backends: PostgreSQL (`SessionManager::connect`)
//! and memory (`SessionManager::in_memory`). Every test is written once, in `suite`, and
//! `backend_tests!` instantiates all of them for each backend (as tower-sessions'
//! `route_tests!` does for its stores), so the two cannot drift apart.

mod common;

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use common::{TestDatabase, attrs, config, eventually, small, unknown_token};
use pgsession::{
    Clock, Config, Error, MaxSessionsPolicy, Origin, SessionEvent, SessionEventKind, SessionId,
    SessionManager, SessionOptions, SigningKey,
};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

/// A manager on one backend, and what keeps that backend alive.
pub struct Backend {
    pub manager: SessionManager,
    _db: Option<TestDatabase>,
}

impl std::ops::Deref for Backend {
    type Target = SessionManager;

    fn deref(&self) -> &SessionManager {
        &self.manager
    }
}

/// A PostgreSQL-backed manager on a database of its own.
pub async fn postgres(config: Config) -> Backend {
    start_postgres(config).await.expect("manager starts")
}

/// An in-memory manager.
pub async fn memory(config: Config) -> Backend {
    start_memory(config)
        .await
        .expect("in-memory manager starts")
}

/// `postgres`, or why the manager refused to start.
pub async fn start_postgres(config: Config) -> Result<Backend, Error> {
    let db = TestDatabase::create().await;
    let manager = SessionManager::connect(config, db.url()).await?;
    Ok(Backend {
        manager: common::listening(manager).await,
        _db: Some(db),
    })
}

/// A PostgreSQL-backed manager whose pool goes through Debian's PgBouncer in transaction mode
/// (one bouncer for the whole test binary, in front of the test server), its listener
/// directly: `Config::transaction_pooling`.
pub async fn through_pgbouncer(config: Config) -> Backend {
    start_through_pgbouncer(config)
        .await
        .expect("manager starts behind pgbouncer")
}

/// `through_pgbouncer`, or why the manager refused to start.
pub async fn start_through_pgbouncer(config: Config) -> Result<Backend, Error> {
    static BOUNCER: tokio::sync::OnceCell<common::TempPgBouncer> =
        tokio::sync::OnceCell::const_new();
    let db = TestDatabase::create().await;
    let upstream = common::socket_addr(db.url()).await;
    let bouncer = BOUNCER
        .get_or_init(|| async move {
            tokio::task::spawn_blocking(move || common::TempPgBouncer::start(upstream))
                .await
                .expect("start task")
                .expect("pgbouncer starts (Debian package pgbouncer)")
        })
        .await;
    let config = Config {
        transaction_pooling: true,
        listen_url: Some(db.url().to_owned()),
        ..config
    };
    let manager = SessionManager::connect(config, &bouncer.url(db.name())).await?;
    Ok(Backend {
        manager: common::listening(manager).await,
        _db: Some(db),
    })
}

/// `memory`, or why the manager refused to start.
pub async fn start_memory(config: Config) -> Result<Backend, Error> {
    Ok(Backend {
        manager: SessionManager::in_memory(config).await?,
        _db: None,
    })
}

/// Instantiate every test of `suite` for the backend `$make` builds.
macro_rules! backend_tests {
    ($make:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                crate::suite::$name($make).await;
            }
        )*
    };
}

/// The suite for one backend: `$make` builds a manager, `$start` tries to.
macro_rules! all_backend_tests {
    ($make:path, $start:path) => {
        backend_tests!($make;
            sessions_round_trip_through_create_get_update_delete,
            expired_sessions_are_never_returned_and_are_reported_expired,
            the_per_user_cap_evicts_the_least_recently_used_or_rejects,
            bad_input_is_a_typed_error_and_writes_nothing,
            forged_signed_tokens_open_nothing,
            every_change_is_reported_as_an_event_of_this_node,
            a_lagging_event_receiver_is_told_how_many_it_lost,
            touch_session_records_an_access_without_a_read,
            time_to_live_is_the_sooner_of_absolute_and_idle_expiry,
            count_active_sessions_counts_recent_accesses_only,
            list_sessions_pages_every_session_once_under_concurrent_writes,
            delete_all_sessions_removes_every_session,
            client_info_and_counters_are_recorded,
            update_if_unchanged_conflicts_after_another_write,
            expired_attributes_are_invisible_to_every_read,
            delete_group_sessions_removes_only_that_group,
            remove_attribute_from_user_sessions_changes_only_that_users_sessions,
            get_session_fresh_reads_the_stored_state,
            login_rotates_the_token_and_keeps_the_data,
            shutdown_refuses_further_calls,
            every_call_taking_a_key_refuses_nul_before_writing,
            values_nested_past_the_limit_are_refused_without_overflowing_the_stack,
            numbers_read_back_exactly_as_they_were_set,
            a_session_cannot_grow_past_max_session_size,
            a_tampered_token_opens_nothing_whether_or_not_its_session_is_cached,
            the_token_hashes_to_the_id_and_the_store_keeps_sets_and_removals,
            concurrent_updates_of_different_keys_both_survive,
            an_update_of_a_deleted_session_is_not_found_and_recreates_nothing,
            an_update_without_changes_writes_nothing,
            the_per_user_cap_evicts_by_last_access_not_by_creation,
            the_reject_policy_writes_nothing_and_a_logout_frees_a_place,
            an_absolutely_expired_session_is_never_returned_even_before_cleanup,
            an_idle_session_expires_and_accesses_keep_it_alive,
            set_expires_at_moves_the_end_of_a_session_later_or_earlier,
            oversized_attributes_are_refused_by_this_managers_limit_and_nothing_is_written,
            values_postgres_cannot_store_are_typed_errors_and_nothing_is_written,
            typed_attributes_round_trip_and_mismatches_are_reported,
            reads_only_record_accesses_and_the_flush_never_moves_them_backwards,
            the_background_task_flushes_accesses_every_interval,
            a_batch_worth_of_pending_accesses_is_flushed_early,
            shutdown_writes_pending_accesses_and_every_later_call_fails,
            a_cancelled_shutdown_still_completes_and_later_calls_return,
            cleanup_deletes_sessions_expired_either_way_and_keeps_live_ones,
            cleanup_leaves_sessions_whose_accesses_may_be_unflushed,
            periodic_cleanup_runs_in_the_background,
            a_user_lists_their_devices_and_logs_out_the_others,
            sessions_work_with_the_cache_disabled,
            expiries_postgres_cannot_store_are_refused_and_change_nothing,
            count_user_sessions_counts_that_users_live_sessions_only,
        );
        backend_tests!($start;
            invalid_configuration_is_rejected_with_the_field_named,
        );
    };
}

mod postgres {
    all_backend_tests!(crate::postgres, crate::start_postgres);
}

mod memory {
    all_backend_tests!(crate::memory, crate::start_memory);
}

mod pgbouncer {
    all_backend_tests!(crate::through_pgbouncer, crate::start_through_pgbouncer);
}

/// Wait for the next event (they are sent before the operation returns: no waiting really).
async fn next(events: &mut tokio::sync::broadcast::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("no lag")
}

/// `config` on a manual clock, and that clock. It starts at the real time, which PostgreSQL's
/// statements then take from it, so that both backends see the same times; tests of expiry
/// move it instead of waiting.
fn on_manual_clock(config: Config) -> (Config, Clock) {
    let clock = Clock::manual(Utc::now());
    (
        Config {
            clock: clock.clone(),
            ..config
        },
        clock,
    )
}

/// Minutes and hours, for readable expiry tests.
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

mod suite {
    use super::*;

    pub async fn sessions_round_trip_through_create_get_update_delete<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (created, token) = m
            .create_session("alice", [("theme", "dark")])
            .await
            .unwrap();
        let mut s = m.get_session(&token).await.unwrap().expect("found");
        assert_eq!(s.id(), created.id());
        assert_eq!(s.user_id().unwrap().as_str(), "alice");
        assert_eq!(
            s.get_as::<String>("theme").unwrap().as_deref(),
            Some("dark")
        );
        s.set("theme", "light").unwrap();
        s.set("n", 7).unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!(s.version(), 2);
        let again = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(again.get("theme"), Some(&json!("light")));
        assert_eq!(again.get("n"), Some(&json!(7)));
        // Deltas merge: a stale copy changing another key keeps both changes.
        let mut stale = created.clone();
        stale.set("other", true).unwrap();
        m.update_session(&mut stale).await.unwrap();
        assert_eq!(stale.get("theme"), Some(&json!("light")));
        assert!(m.delete_session(s.id()).await.unwrap());
        assert!(!m.delete_session(s.id()).await.unwrap());
        assert!(m.get_session(&token).await.unwrap().is_none());
        let mut gone = again;
        gone.set("x", 1).unwrap();
        assert!(matches!(
            m.update_session(&mut gone).await,
            Err(Error::NotFound)
        ));
    }

    pub async fn expired_sessions_are_never_returned_and_are_reported_expired<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        let mut events = m.subscribe_events();
        s.set_expires_at(clock.now() + chrono::Duration::minutes(1))
            .unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!(next(&mut events).await.kind, SessionEventKind::Updated);
        clock.advance(MINUTE - Duration::from_micros(1));
        assert!(
            m.get_session(&token).await.unwrap().is_some(),
            "a microsecond to live"
        );
        assert_eq!(m.cleanup_expired().await.unwrap(), 0);
        // At its expiry instant it is over.
        clock.advance(Duration::from_micros(1));
        assert!(m.get_session(&token).await.unwrap().is_none());
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.session_id, e.origin),
            (SessionEventKind::Expired, Some(s.id()), Origin::ThisNode)
        );
        assert!(m.list_user_sessions("alice").await.unwrap().is_empty());
        // Cleanup deletes it, and reports it too.
        assert_eq!(m.cleanup_expired().await.unwrap(), 1);
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.session_id),
            (SessionEventKind::Expired, Some(s.id()))
        );
        assert_eq!(e.user_id.unwrap().as_str(), "alice");
        assert_eq!(m.cleanup_expired().await.unwrap(), 0);
    }

    pub async fn the_per_user_cap_evicts_the_least_recently_used_or_rejects<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            max_sessions_per_user: Some(2),
            ..config()
        })
        .await;
        let (first, t1) = m.create_session("alice", [("n", 1)]).await.unwrap();
        let (_, _t2) = m.create_session("alice", [("n", 2)]).await.unwrap();
        let mut events = m.subscribe_events();
        let (_, t3) = m.create_session("alice", [("n", 3)]).await.unwrap();
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.session_id),
            (SessionEventKind::Deleted, Some(first.id()))
        );
        assert_eq!(next(&mut events).await.kind, SessionEventKind::Created);
        assert!(
            m.get_session(&t1).await.unwrap().is_none(),
            "oldest evicted"
        );
        assert!(m.get_session(&t3).await.unwrap().is_some());
        assert_eq!(m.list_user_sessions("alice").await.unwrap().len(), 2);
        // Anonymous sessions count against no cap.
        for _ in 0..3 {
            m.create_anonymous_session([("cart", 1)]).await.unwrap();
        }
        assert_eq!(m.list_user_sessions("alice").await.unwrap().len(), 2);

        let strict = make(Config {
            max_sessions_per_user: Some(1),
            max_sessions_policy: MaxSessionsPolicy::Reject,
            ..config()
        })
        .await;
        strict.create_session("bob", [("n", 1)]).await.unwrap();
        assert!(matches!(
            strict.create_session("bob", [("n", 2)]).await,
            Err(Error::MaxSessionsReached)
        ));
        assert_eq!(strict.list_user_sessions("bob").await.unwrap().len(), 1);
    }

    pub async fn bad_input_is_a_typed_error_and_writes_nothing<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            max_attribute_size: 64,
            ..config()
        })
        .await;
        let big = "x".repeat(100);
        assert!(matches!(
            m.create_session("alice", [("big", big.as_str())]).await,
            Err(Error::AttributeTooLarge { .. })
        ));
        assert!(matches!(
            m.create_session("", [("k", 1)]).await,
            Err(Error::InvalidUserId(_))
        ));
        assert!(matches!(
            m.create_session_with(SessionOptions::new().user("alice").group(""), [("k", 1)])
                .await,
            Err(Error::InvalidGroupId(_))
        ));
        assert!(matches!(
            m.delete_group_sessions("a\0b").await,
            Err(Error::InvalidGroupId(_))
        ));
        assert!(m.list_user_sessions("alice").await.unwrap().is_empty());
        let (mut s, _) = m.create_session("alice", [("k", 1)]).await.unwrap();
        assert!(matches!(
            s.set("big", &big),
            Err(Error::AttributeTooLarge { .. })
        ));
        assert!(matches!(
            s.set_with_expiry("k", 2, chrono::DateTime::<Utc>::MAX_UTC),
            Err(Error::InvalidExpiry { .. })
        ));
        assert!(
            !s.is_modified(),
            "a refused set leaves the session unchanged"
        );
    }

    pub async fn forged_signed_tokens_open_nothing<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let key = SigningKey::generate();
        let m = make(Config {
            signing_keys: vec![key],
            ..config()
        })
        .await;
        let (_, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        assert!(m.get_session(&token).await.unwrap().is_some());
        // Same secret, another key's signature.
        let other = make(Config {
            signing_keys: vec![SigningKey::generate()],
            ..config()
        })
        .await;
        let (_, foreign) = other.create_session("alice", [("k", 1)]).await.unwrap();
        assert!(m.get_session(&foreign).await.unwrap().is_none());
        assert_eq!(m.stats().forged_tokens, 1);
    }

    pub async fn every_change_is_reported_as_an_event_of_this_node<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        use SessionEventKind::*;
        let m = make(config()).await;
        let mut events = m.subscribe_events();
        let (mut s, _) = m
            .create_session_with(
                SessionOptions::new().user("alice").group("acme"),
                [("k", 1)],
            )
            .await
            .unwrap();
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.session_id, e.version, e.origin),
            (Created, Some(s.id()), Some(1), Origin::ThisNode)
        );
        assert_eq!(e.user_id.unwrap().as_str(), "alice");

        s.set("k", 2).unwrap();
        m.update_session(&mut s).await.unwrap();
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.session_id, e.version),
            (Updated, Some(s.id()), Some(2))
        );

        let old = s.id();
        m.rotate_session(&mut s).await.unwrap();
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.session_id, e.previous_id, e.version),
            (Rotated, Some(s.id()), Some(old), Some(3))
        );

        m.delete_session(s.id()).await.unwrap();
        let e = next(&mut events).await;
        assert_eq!((e.kind, e.session_id), (Deleted, Some(s.id())));

        m.create_session("alice", [("k", 1)]).await.unwrap();
        assert_eq!(next(&mut events).await.kind, Created);
        m.delete_all_user_sessions("alice").await.unwrap();
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.user_id.unwrap().as_str()),
            (UserLoggedOutEverywhere, "alice")
        );

        m.create_session_with(SessionOptions::new().group("acme"), [("k", 1)])
            .await
            .unwrap();
        assert_eq!(next(&mut events).await.kind, Created);
        m.delete_group_sessions("acme").await.unwrap();
        let e = next(&mut events).await;
        assert_eq!(
            (e.kind, e.group_id.as_deref()),
            (GroupDeleted, Some("acme"))
        );

        m.delete_all_sessions().await.unwrap();
        assert_eq!(next(&mut events).await.kind, AllDeleted);
        assert!(events.try_recv().is_err(), "nothing else was reported");
    }

    pub async fn a_lagging_event_receiver_is_told_how_many_it_lost<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let mut slow = m.subscribe_events();
        let extra = 10;
        for _ in 0..pgsession::EVENT_BUFFER + extra {
            m.create_anonymous_session([("k", 1)]).await.unwrap();
        }
        match slow.recv().await {
            Err(RecvError::Lagged(n)) => assert_eq!(n, extra as u64),
            other => panic!("expected a lag report, got {other:?}"),
        }
        // It goes on with the events it still has.
        assert_eq!(slow.recv().await.unwrap().kind, SessionEventKind::Created);
    }

    pub async fn touch_session_records_an_access_without_a_read<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let (s, _) = m.create_session("alice", [("k", 1)]).await.unwrap();
        assert_eq!(s.last_accessed_at(), clock.now());
        clock.advance(10 * MINUTE);
        m.touch_session(s.id()).unwrap();
        assert_eq!(m.count_active_sessions(MINUTE).await.unwrap(), 0);
        assert_eq!(m.flush_last_access().await.unwrap(), 1);
        assert_eq!(m.count_active_sessions(MINUTE).await.unwrap(), 1);
        let listed = &m.list_user_sessions("alice").await.unwrap()[0];
        assert_eq!(
            listed.last_accessed_at(),
            clock.now(),
            "the access was recorded at its time"
        );
        assert_eq!(listed.reads(), 0, "a keep-alive is not a read");
    }

    pub async fn time_to_live_is_the_sooner_of_absolute_and_idle_expiry<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            idle_timeout: Some(2 * HOUR),
            session_ttl: 24 * HOUR,
            ..config()
        });
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        assert_eq!(s.time_to_live(), 2 * HOUR, "idle expiry comes first");
        // A held copy counts down; a read is an access and starts the idle time again.
        clock.advance(40 * MINUTE);
        assert_eq!(s.time_to_live(), 80 * MINUTE);
        let read = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(read.time_to_live(), 2 * HOUR);
        s.set_expires_at(clock.now() + chrono::Duration::minutes(10))
            .unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!(s.time_to_live(), 10 * MINUTE, "absolute expiry comes first");
        clock.advance(4 * MINUTE);
        assert_eq!(s.time_to_live(), 6 * MINUTE);
        clock.advance(6 * MINUTE);
        assert_eq!(s.time_to_live(), Duration::ZERO, "zero once expired");
        clock.advance(HOUR);
        assert_eq!(s.time_to_live(), Duration::ZERO);
    }

    pub async fn count_active_sessions_counts_recent_accesses_only<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let mut alice = Vec::new();
        for _ in 0..3 {
            alice.push(m.create_session("alice", [("k", 1)]).await.unwrap().1);
        }
        clock.advance(10 * MINUTE);
        let (mut gone, _) = m.create_session("bob", [("k", 1)]).await.unwrap();
        m.create_session("carol", [("k", 1)]).await.unwrap();
        assert_eq!(m.count_active_sessions(HOUR).await.unwrap(), 5);
        assert_eq!(m.count_active_sessions(11 * MINUTE).await.unwrap(), 5);
        assert_eq!(m.count_active_sessions(9 * MINUTE).await.unwrap(), 2);
        assert_eq!(m.count_active_sessions(MINUTE).await.unwrap(), 2);
        gone.set_expires_at(clock.now() + chrono::Duration::minutes(1))
            .unwrap();
        m.update_session(&mut gone).await.unwrap();
        clock.advance(2 * MINUTE);
        assert_eq!(
            m.count_active_sessions(HOUR).await.unwrap(),
            4,
            "expired sessions are not active"
        );
        assert_eq!(m.count_active_sessions(5 * MINUTE).await.unwrap(), 1);
        // A stored access makes a session recent again.
        m.get_session(&alice[0]).await.unwrap().unwrap();
        m.flush_last_access().await.unwrap();
        assert_eq!(m.count_active_sessions(5 * MINUTE).await.unwrap(), 2);
        assert_eq!(m.count_active_sessions(HOUR).await.unwrap(), 4);
    }

    pub async fn list_sessions_pages_every_session_once_under_concurrent_writes<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            max_sessions_per_user: None,
            ..config()
        })
        .await;
        let mut ids = std::collections::BTreeSet::new();
        for i in 0..25 {
            let (s, _) = m.create_session(format!("u{i}"), [("k", i)]).await.unwrap();
            ids.insert(s.id());
        }
        let mut seen = Vec::new();
        let mut after = None;
        let mut created = 0;
        loop {
            let page = m.list_sessions(after, 10).await.unwrap();
            assert!(page.len() <= 10);
            let Some(last) = page.last() else { break };
            after = Some(last.id());
            seen.extend(page.iter().map(|s| s.id()));
            // Writes between pages: a new session each time.
            m.create_anonymous_session([("k", 0)]).await.unwrap();
            created += 1;
        }
        let seen_set: std::collections::BTreeSet<_> = seen.iter().copied().collect();
        assert_eq!(seen.len(), seen_set.len(), "no session twice");
        assert!(
            ids.is_subset(&seen_set),
            "every session that existed throughout"
        );
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in id order");
        let total = m.list_sessions(None, 10_000).await.unwrap().len();
        assert_eq!(total, 25 + created);
    }

    pub async fn delete_all_sessions_removes_every_session<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let mut tokens = Vec::new();
        for i in 0..5 {
            tokens.push(
                m.create_session(format!("u{i}"), [("k", i)])
                    .await
                    .unwrap()
                    .1,
            );
        }
        tokens.push(m.create_anonymous_session([("cart", 1)]).await.unwrap().1);
        for t in &tokens {
            assert!(m.get_session(t).await.unwrap().is_some()); // cached
        }
        assert_eq!(m.delete_all_sessions().await.unwrap(), 6);
        for t in &tokens {
            assert!(m.get_session(t).await.unwrap().is_none());
        }
        assert!(m.list_sessions(None, 100).await.unwrap().is_empty());
        assert_eq!(m.delete_all_sessions().await.unwrap(), 0);
    }

    pub async fn client_info_and_counters_are_recorded<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let ip: std::net::IpAddr = "2001:db8::7".parse().unwrap();
        let (_, token) = m
            .create_session_with(
                SessionOptions::new()
                    .user("alice")
                    .ip(ip)
                    .user_agent("Firefox/140"),
                [("k", 1)],
            )
            .await
            .unwrap();
        for _ in 0..3 {
            m.get_session(&token).await.unwrap().unwrap();
        }
        let mut s = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(s.reads(), 4, "this node's reads, this one included");
        for i in 0..2 {
            s.set("k", i).unwrap();
            m.update_session(&mut s).await.unwrap();
        }
        assert_eq!(s.writes(), 2);
        m.flush_last_access().await.unwrap();
        let listed = &m.list_user_sessions("alice").await.unwrap()[0];
        assert_eq!(
            (listed.ip(), listed.user_agent()),
            (Some(ip), Some("Firefox/140"))
        );
        assert_eq!((listed.reads(), listed.writes()), (4, 2));
        m.get_session(&token).await.unwrap().unwrap();
        m.flush_last_access().await.unwrap();
        assert_eq!(m.list_user_sessions("alice").await.unwrap()[0].reads(), 5);
    }

    pub async fn update_if_unchanged_conflicts_after_another_write<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (_, token) = m.create_session("alice", [("credits", 10)]).await.unwrap();
        let mut a = m.get_session(&token).await.unwrap().unwrap();
        let mut b = m.get_session(&token).await.unwrap().unwrap();
        a.set("credits", 9).unwrap();
        m.update_session_if_unchanged(&mut a).await.unwrap();
        b.set("credits", 8).unwrap();
        match m.update_session_if_unchanged(&mut b).await {
            Err(Error::Conflict { current_version }) => assert_eq!(current_version, 2),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert!(b.is_modified(), "the refused copy keeps its changes");
        let stored = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(
            stored.get("credits"),
            Some(&json!(9)),
            "nothing was written"
        );
        // Re-read and retry: it goes through.
        let mut b = stored;
        b.set("credits", 8).unwrap();
        m.update_session_if_unchanged(&mut b).await.unwrap();
        assert_eq!(b.version(), 3);
        // A deleted session is not found, not a conflict.
        m.delete_session(b.id()).await.unwrap();
        b.set("credits", 7).unwrap();
        assert!(matches!(
            m.update_session_if_unchanged(&mut b).await,
            Err(Error::NotFound)
        ));
    }

    pub async fn expired_attributes_are_invisible_to_every_read<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", [("keep", 1)]).await.unwrap();
        let soon = clock.now() + chrono::Duration::minutes(5);
        s.set_with_expiry("otp", "123456", soon).unwrap();
        s.set_with_expiry("later", true, clock.now() + chrono::Duration::hours(1))
            .unwrap();
        m.update_session(&mut s).await.unwrap();
        let read = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(
            read.get_as::<String>("otp").unwrap().as_deref(),
            Some("123456")
        );
        assert_eq!(read.attribute_expires_at("otp"), Some(soon));
        clock.advance(5 * MINUTE - Duration::from_secs(1));
        assert_eq!(read.get("otp"), Some(&json!("123456")), "a second left");
        clock.advance(Duration::from_secs(2));
        assert_eq!(
            read.get("otp"),
            None,
            "a held copy hides it once it expires"
        );
        let again = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(again.get("otp"), None);
        assert!(!again.attributes().contains_key("otp"));
        assert_eq!(again.get("later"), Some(&json!(true)));
        assert_eq!(again.get("keep"), Some(&json!(1)));
        let fresh = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert!(!fresh.attributes().contains_key("otp"));
        let listed = &m.list_user_sessions("alice").await.unwrap()[0];
        assert!(!listed.attributes().contains_key("otp"));
        let paged = &m.list_sessions(None, 10).await.unwrap()[0];
        assert!(!paged.attributes().contains_key("otp"));
        // Setting it again without an expiry makes it permanent.
        let mut s = again;
        s.set("later", false).unwrap();
        m.update_session(&mut s).await.unwrap();
        let s = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(s.attribute_expires_at("later"), None);
        clock.advance(2 * HOUR);
        m.cleanup_expired().await.unwrap();
        let s = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(
            (s.get("keep"), s.get("later"), s.get("otp")),
            (Some(&json!(1)), Some(&json!(false)), None)
        );
    }

    pub async fn delete_group_sessions_removes_only_that_group<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            max_sessions_per_user: None,
            ..config()
        })
        .await;
        let mut acme = Vec::new();
        for i in 0..3 {
            let options = SessionOptions::new().user(format!("u{i}")).group("acme");
            let (s, t) = m.create_session_with(options, [("k", i)]).await.unwrap();
            assert_eq!(s.group_id(), Some("acme"));
            m.get_session(&t).await.unwrap().unwrap(); // cached
            acme.push(t);
        }
        let options = SessionOptions::new().user("u0").group("globex");
        let (_, other) = m.create_session_with(options, [("k", 1)]).await.unwrap();
        let (_, none) = m.create_session("u0", [("k", 1)]).await.unwrap();
        assert_eq!(m.delete_group_sessions("acme").await.unwrap(), 3);
        for t in &acme {
            assert!(m.get_session(t).await.unwrap().is_none());
        }
        assert!(m.get_session(&other).await.unwrap().is_some());
        assert!(m.get_session(&none).await.unwrap().is_some());
        assert_eq!(m.delete_group_sessions("acme").await.unwrap(), 0);
    }

    pub async fn remove_attribute_from_user_sessions_changes_only_that_users_sessions<F, Fut>(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (_, a1) = m
            .create_session("alice", [("role", "admin"), ("theme", "dark")])
            .await
            .unwrap();
        let (_, a2) = m
            .create_session("alice", [("role", "admin")])
            .await
            .unwrap();
        let (_, a3) = m
            .create_session("alice", [("theme", "dark")])
            .await
            .unwrap();
        let (_, b) = m.create_session("bob", [("role", "admin")]).await.unwrap();
        for t in [&a1, &a2, &a3, &b] {
            m.get_session(t).await.unwrap().unwrap(); // cached
        }
        assert_eq!(
            m.remove_attribute_from_user_sessions("alice", "role")
                .await
                .unwrap(),
            2
        );
        let s1 = m.get_session(&a1).await.unwrap().unwrap();
        assert_eq!(
            (s1.get("role"), s1.get("theme")),
            (None, Some(&json!("dark")))
        );
        assert_eq!(s1.version(), 2);
        assert_eq!(m.get_session(&a2).await.unwrap().unwrap().get("role"), None);
        assert_eq!(
            m.get_session(&a3).await.unwrap().unwrap().version(),
            1,
            "untouched"
        );
        assert_eq!(
            m.get_session(&b).await.unwrap().unwrap().get("role"),
            Some(&json!("admin"))
        );
    }

    pub async fn get_session_fresh_reads_the_stored_state<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        s.set("k", 2).unwrap();
        m.update_session(&mut s).await.unwrap();
        let fresh = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!((fresh.get("k"), fresh.version()), (Some(&json!(2)), 2));
        m.delete_session(s.id()).await.unwrap();
        assert!(m.get_session_fresh(&token).await.unwrap().is_none());
    }

    pub async fn login_rotates_the_token_and_keeps_the_data<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, visitor) = m
            .create_anonymous_session([("cart", vec![1, 2])])
            .await
            .unwrap();
        let token = m.log_in(&mut s, "alice").await.unwrap();
        assert!(
            m.get_session(&visitor).await.unwrap().is_none(),
            "old token dead"
        );
        let s = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(s.user_id().unwrap().as_str(), "alice");
        assert_eq!(s.get_as::<Vec<i32>>("cart").unwrap(), Some(vec![1, 2]));
        assert_eq!(s.version(), 2);
    }

    pub async fn shutdown_refuses_further_calls<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        m.get_session(&token).await.unwrap();
        m.shutdown().await.unwrap();
        assert!(matches!(m.get_session(&token).await, Err(Error::ShutDown)));
        assert!(matches!(m.touch_session(s.id()), Err(Error::ShutDown)));
        assert!(matches!(
            m.delete_all_sessions().await,
            Err(Error::ShutDown)
        ));
    }

    pub async fn every_call_taking_a_key_refuses_nul_before_writing<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        let bad = "a\0b";
        assert!(matches!(
            m.remove_attribute_from_user_sessions("alice", bad).await,
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(matches!(s.set(bad, 1), Err(Error::InvalidAttribute { .. })));
        assert!(matches!(
            m.create_session("alice", [(bad, 1)]).await,
            Err(Error::InvalidAttribute { .. })
        ));
        s.remove(bad);
        assert!(matches!(
            m.update_session(&mut s).await,
            Err(Error::InvalidAttribute { .. })
        ));
        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(stored.version(), 1, "nothing written");
        assert_eq!(m.list_user_sessions("alice").await.unwrap().len(), 1);
    }

    pub async fn values_nested_past_the_limit_are_refused_without_overflowing_the_stack<F, Fut>(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        // Built in code (a parser would refuse it): far deeper than any stack can recurse.
        let deep = || {
            let mut v = json!(1);
            for _ in 0..20_000 {
                v = serde_json::Value::Array(vec![v]);
            }
            v
        };
        assert!(matches!(
            m.create_session("alice", [("deep", deep())]).await,
            Err(Error::InvalidAttribute { .. })
        ));
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        assert!(matches!(
            s.set("deep", deep()),
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(!s.is_modified());
        let stored = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(stored.get("deep"), None);
    }

    pub async fn numbers_read_back_exactly_as_they_were_set<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        s.set("max", f64::MAX).unwrap();
        s.set("tiny", 5e-324).unwrap();
        s.set("big_int", u64::MAX).unwrap();
        s.set("min_int", i64::MIN).unwrap();
        s.set("e16", 1e16).unwrap();
        s.set("neg_e16", -1e16).unwrap();
        s.set("huge", 1.5e300).unwrap();
        s.set("f32", 0.1f32).unwrap();
        s.set("neg_zero", -0.0).unwrap();
        s.set("list", vec![0.1, 1e-7, 123.456]).unwrap();
        m.update_session(&mut s).await.unwrap();
        let written = s.attributes().clone();
        // What this node hands out (its cache), what the database gives back, and every
        // listing agree, value for value and character for character.
        let cached = m.get_session(&token).await.unwrap().unwrap();
        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        let listed = m.list_user_sessions("alice").await.unwrap();
        let paged = m.list_sessions(None, 10).await.unwrap();
        for copy in [
            cached.attributes(),
            stored.attributes(),
            listed[0].attributes(),
            paged[0].attributes(),
        ] {
            assert_eq!(copy, &written);
            assert_eq!(
                serde_json::to_string(copy).unwrap(),
                serde_json::to_string(&written).unwrap()
            );
        }
        assert_eq!(stored.get_as::<f64>("max").unwrap(), Some(f64::MAX));
        assert_eq!(stored.get_as::<f64>("tiny").unwrap(), Some(5e-324));
        assert_eq!(stored.get_as::<u64>("big_int").unwrap(), Some(u64::MAX));
        assert_eq!(stored.get_as::<f64>("huge").unwrap(), Some(1.5e300));
        assert_eq!(stored.get_as::<f64>("e16").unwrap(), Some(1e16));
    }

    pub async fn a_session_cannot_grow_past_max_session_size<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        // Attributes are measured as jsonb prints them: {"a": "xx…"} is 9 + the string.
        let m = make(Config {
            max_session_size: 1000,
            ..config()
        })
        .await;
        let text = |n: usize| "x".repeat(n);
        match m.create_session("alice", [("a", text(992))]).await {
            Err(Error::SessionTooLarge { size, limit }) => {
                assert_eq!((size, limit), (1001, 1000));
            }
            other => panic!("{other:?}"),
        }
        assert!(m.list_user_sessions("alice").await.unwrap().is_empty());
        let (mut one, token) = m.create_session("alice", [("a", text(600))]).await.unwrap();
        let mut other = one.clone();
        // Each change fits on its own; merged with the other's, it would not.
        other.set("b", text(300)).unwrap();
        m.update_session(&mut other).await.unwrap();
        one.set("c", text(300)).unwrap();
        assert!(matches!(
            m.update_session(&mut one).await,
            Err(Error::SessionTooLarge { limit: 1000, .. })
        ));
        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(stored.get("c"), None, "nothing written");
        assert_eq!(stored.version(), 2);
        // Shrinking is always allowed, and so is a login carrying changes that fit.
        let mut shrink = stored.clone();
        shrink.remove("b");
        shrink.set("a", text(10)).unwrap();
        m.update_session(&mut shrink).await.unwrap();
        let mut login = shrink.clone();
        login.set("d", text(2000)).unwrap();
        assert!(matches!(
            m.log_in(&mut login, "bob").await,
            Err(Error::SessionTooLarge { .. })
        ));
        let mut login = shrink.clone();
        login.set("d", text(100)).unwrap();
        m.log_in(&mut login, "bob").await.unwrap();
    }

    pub async fn a_tampered_token_opens_nothing_whether_or_not_its_session_is_cached<F, Fut>(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            signing_keys: vec![SigningKey::generate()],
            ..config()
        })
        .await;
        // The last character carries the tag's last 6 bits: every other one is a forgery.
        let tampered = |token: &pgsession::SessionToken| -> Vec<pgsession::SessionToken> {
            let text = token.to_string();
            let (head, last) = text.split_at(text.len() - 1);
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
                .chars()
                .filter(|c| c.to_string() != last)
                .map(|c| format!("{head}{c}").parse().unwrap())
                .collect()
        };
        let (_, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        assert!(m.get_session(&token).await.unwrap().is_some(), "cached now");
        let forged = tampered(&token);
        for t in &forged {
            assert!(m.get_session(t).await.unwrap().is_none());
        }
        assert_eq!(m.stats().forged_tokens, forged.len() as u64);
        assert!(m.get_session(&token).await.unwrap().is_some());
        // A session cached by an update (no token involved: the cache is emptied first, so the
        // update's install is the only copy) asks as much of a token.
        let (_, other) = m.create_session("bob", [("k", 1)]).await.unwrap();
        m.clear_cache().await.unwrap();
        let mut listed = m.list_user_sessions("bob").await.unwrap().remove(0);
        listed.set("k", 2).unwrap();
        m.update_session(&mut listed).await.unwrap();
        for t in tampered(&other) {
            assert!(m.get_session(&t).await.unwrap().is_none());
        }
        assert!(m.get_session(&other).await.unwrap().is_some());
    }

    pub async fn the_token_hashes_to_the_id_and_the_store_keeps_sets_and_removals<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        assert_eq!(token.id(), s.id(), "the id is the token's hash");
        assert_ne!(token.to_string(), s.id().to_string());
        assert_eq!(
            (s.user_id().map(|u| u.as_str()), s.version()),
            (Some("alice"), 1)
        );
        assert_eq!(s.get("role"), Some(&json!("admin")));
        assert_eq!(s.created_at(), clock.now());
        assert_eq!(
            s.expires_at(),
            clock.now() + chrono::Duration::days(30),
            "the default lifetime"
        );

        let got = m
            .get_session(&token)
            .await
            .unwrap()
            .expect("session exists");
        assert_eq!(got.attributes(), s.attributes());
        assert_eq!(got.created_at(), s.created_at());

        s.set("theme", "light").unwrap();
        s.remove("role");
        m.update_session(&mut s).await.unwrap();
        assert_eq!(s.version(), 2);
        assert!(!s.is_modified());

        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(stored.version(), 2);
        assert_eq!(stored.get("theme"), Some(&json!("light")));
        assert_eq!(stored.get("role"), None);
        assert_eq!(stored.attributes(), s.attributes());

        assert!(m.delete_session(s.id()).await.unwrap());
        assert!(!m.delete_session(s.id()).await.unwrap());
        assert!(m.get_session(&token).await.unwrap().is_none());
        assert!(m.get_session_fresh(&token).await.unwrap().is_none());
        assert!(m.get_session(&unknown_token()).await.unwrap().is_none());
    }

    pub async fn concurrent_updates_of_different_keys_both_survive<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (_, token) = m.create_session("alice", small()).await.unwrap();
        // Two requests load the same session, each changes its own key.
        let mut one = m.get_session(&token).await.unwrap().unwrap();
        let mut two = m.get_session(&token).await.unwrap().unwrap();
        one.set("cart", json!([1, 2])).unwrap();
        two.set("theme", "light").unwrap();
        two.remove("role");
        let (r1, r2) = tokio::join!(m.update_session(&mut one), m.update_session(&mut two));
        r1.unwrap();
        r2.unwrap();

        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(stored.version(), 3);
        assert_eq!(stored.get("cart"), Some(&json!([1, 2])));
        assert_eq!(stored.get("theme"), Some(&json!("light")));
        assert_eq!(stored.get("role"), None);
        // The value returned by the later update already includes the other writer's change.
        let later = if one.version() == 3 { &one } else { &two };
        assert_eq!(later.version(), 3);
        assert_eq!(later.attributes(), stored.attributes());
    }

    pub async fn an_update_of_a_deleted_session_is_not_found_and_recreates_nothing<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        let mut read = m.get_session(&token).await.unwrap().unwrap();
        assert!(m.delete_session(s.id()).await.unwrap());

        s.set("theme", "light").unwrap();
        assert!(matches!(
            m.update_session(&mut s).await,
            Err(Error::NotFound)
        ));
        read.set_expires_at(Utc::now() + chrono::Duration::days(1))
            .unwrap();
        assert!(matches!(
            m.update_session(&mut read).await,
            Err(Error::NotFound)
        ));
        assert!(matches!(
            m.log_in(&mut read, "bob").await,
            Err(Error::NotFound)
        ));
        assert!(m.get_session(&token).await.unwrap().is_none());
        assert!(m.get_session_fresh(&token).await.unwrap().is_none());
        assert!(m.list_user_sessions("alice").await.unwrap().is_empty());
        assert!(m.list_user_sessions("bob").await.unwrap().is_empty());
        assert_eq!(m.status().await.unwrap().sessions, 0, "nothing recreated");
    }

    pub async fn an_update_without_changes_writes_nothing<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        let mut events = m.subscribe_events();
        clock.advance(MINUTE);
        m.update_session(&mut s).await.unwrap();
        m.update_session_if_unchanged(&mut s).await.unwrap();
        assert_eq!(s.version(), 1);
        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(
            (stored.version(), stored.writes(), stored.updated_at()),
            (1, 0, s.created_at())
        );
        assert!(events.try_recv().is_err(), "no write reported");
    }

    pub async fn the_per_user_cap_evicts_by_last_access_not_by_creation<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            max_sessions_per_user: Some(3),
            ..config()
        });
        let m = make(config).await;
        let create = async |user: &str| {
            clock.advance(MINUTE);
            m.create_session(user, small()).await.unwrap()
        };
        let (first, first_t) = create("alice").await;
        let (_second, second_t) = create("alice").await;
        let (third, _) = create("alice").await;
        let (_, bob) = create("bob").await;
        // Use the first session again: the second becomes the least recently used.
        clock.advance(MINUTE);
        m.get_session(&first_t).await.unwrap().unwrap();
        m.flush_last_access().await.unwrap();

        let (fourth, _) = create("alice").await;
        let live: std::collections::HashSet<SessionId> = m
            .list_user_sessions("alice")
            .await
            .unwrap()
            .iter()
            .map(|s| s.id())
            .collect();
        assert_eq!(
            live,
            std::collections::HashSet::from([first.id(), third.id(), fourth.id()])
        );
        assert!(m.get_session(&second_t).await.unwrap().is_none());
        assert_eq!(m.stats().cap_evictions, 1);
        // Other users are untouched.
        assert!(m.get_session(&bob).await.unwrap().is_some());
        assert_eq!(m.count_user_sessions("bob").await.unwrap(), 1);
    }

    pub async fn the_reject_policy_writes_nothing_and_a_logout_frees_a_place<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            max_sessions_per_user: Some(2),
            max_sessions_policy: MaxSessionsPolicy::Reject,
            ..config()
        })
        .await;
        let mut events = m.subscribe_events();
        let (first, first_t) = m.create_session("alice", small()).await.unwrap();
        let (second, _) = m.create_session("alice", small()).await.unwrap();
        assert!(matches!(
            m.create_session("alice", small()).await,
            Err(Error::MaxSessionsReached)
        ));
        assert_eq!(m.status().await.unwrap().sessions, 2);
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 2);
        assert!(
            m.get_session(&first_t).await.unwrap().is_some(),
            "none evicted"
        );
        assert_eq!(m.stats().cap_evictions, 0);
        for s in [&first, &second] {
            let e = next(&mut events).await;
            assert_eq!(
                (e.kind, e.session_id),
                (SessionEventKind::Created, Some(s.id()))
            );
        }
        assert!(events.try_recv().is_err(), "the refusal reports nothing");
        // Logging out frees a place.
        m.delete_session(second.id()).await.unwrap();
        m.create_session("alice", small()).await.unwrap();
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 2);
    }

    pub async fn an_absolutely_expired_session_is_never_returned_even_before_cleanup<F, Fut>(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            session_ttl: HOUR,
            ..config()
        });
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        assert!(m.get_session(&token).await.unwrap().is_some(), "cached");
        clock.advance(HOUR - Duration::from_secs(1));
        assert!(
            m.get_session(&token).await.unwrap().is_some(),
            "a second left"
        );
        clock.advance(Duration::from_secs(2));
        assert!(
            m.get_session(&token).await.unwrap().is_none(),
            "served from a cache"
        );
        assert!(
            m.get_session_fresh(&token).await.unwrap().is_none(),
            "served from the store"
        );
        assert!(m.list_user_sessions("alice").await.unwrap().is_empty());
        assert!(m.list_sessions(None, 10).await.unwrap().is_empty());
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 0);
        let status = m.status().await.unwrap();
        assert_eq!(
            (status.sessions, status.live),
            (1, 0),
            "stored until cleanup"
        );
        s.set("k", 1).unwrap();
        assert!(matches!(
            m.update_session(&mut s).await,
            Err(Error::NotFound)
        ));
        assert_eq!(m.cleanup_expired().await.unwrap(), 1);
    }

    pub async fn an_idle_session_expires_and_accesses_keep_it_alive<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        // Flushed every hour (common::config), idle after two.
        let (config, clock) = on_manual_clock(Config {
            idle_timeout: Some(2 * HOUR),
            ..config()
        });
        let m = make(config).await;
        let (_, used) = m.create_session("alice", small()).await.unwrap();
        let (_, unused) = m.create_session("bob", small()).await.unwrap();
        // Read one session every 30 minutes for 5 hours (past the idle timeout).
        for _ in 0..10 {
            clock.advance(30 * MINUTE);
            assert!(m.get_session(&used).await.unwrap().is_some());
        }
        assert!(m.get_session(&unused).await.unwrap().is_none());
        // The accesses are in the store once flushed: by the stored time alone, `used` is idle
        // even for the cap (5 hours is past the timeout and two flush intervals).
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 0);
        assert_eq!(m.flush_last_access().await.unwrap(), 1);
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 1);
        assert_eq!(m.count_user_sessions("bob").await.unwrap(), 0);
        assert!(m.get_session_fresh(&used).await.unwrap().is_some());
        // A session read just inside the timeout lives; just outside, it does not.
        clock.advance(2 * HOUR - Duration::from_secs(1));
        assert!(m.get_session(&used).await.unwrap().is_some());
        clock.advance(2 * HOUR);
        assert!(m.get_session(&used).await.unwrap().is_none());
    }

    pub async fn set_expires_at_moves_the_end_of_a_session_later_or_earlier<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            session_ttl: HOUR,
            ..config()
        });
        let m = make(config).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        let (_, short) = m.create_session("bob", small()).await.unwrap();
        let (mut shorter, shorter_t) = m.create_session("carol", small()).await.unwrap();
        let later = clock.now() + chrono::Duration::hours(2);
        s.set_expires_at(later).unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!((s.version(), s.expires_at()), (2, later));
        shorter
            .set_expires_at(clock.now() + chrono::Duration::minutes(10))
            .unwrap();
        m.update_session(&mut shorter).await.unwrap();
        clock.advance(11 * MINUTE);
        assert!(m.get_session(&shorter_t).await.unwrap().is_none());
        assert!(m.get_session(&short).await.unwrap().is_some());
        clock.advance(HOUR);
        assert!(m.get_session(&short).await.unwrap().is_none());
        let extended = m.get_session(&token).await.unwrap().expect("extended");
        assert_eq!(extended.expires_at(), later);
        assert_eq!(
            m.get_session_fresh(&token)
                .await
                .unwrap()
                .unwrap()
                .expires_at(),
            later
        );
    }

    pub async fn oversized_attributes_are_refused_by_this_managers_limit_and_nothing_is_written<
        F,
        Fut,
    >(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            max_attribute_size: 64,
            ..config()
        })
        .await;
        let big = json!("x".repeat(100));
        let err = m
            .create_session("alice", attrs(&[("ok", json!(1)), ("big", big.clone())]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::AttributeTooLarge { key, size: 108, limit: 64 } if key == "big"),
            "{err:?}"
        );
        assert_eq!(m.status().await.unwrap().sessions, 0);

        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        assert!(matches!(
            s.set("big", &big),
            Err(Error::AttributeTooLarge { .. })
        ));
        // A value accepted under a larger limit elsewhere is checked again by this manager,
        // before it asks its store (where that session is not).
        let lenient = make(Config {
            max_attribute_size: 1024,
            ..config()
        })
        .await;
        let (mut from_lenient, _) = lenient.create_session("alice", small()).await.unwrap();
        from_lenient.set("big", &big).unwrap();
        assert!(matches!(
            m.update_session(&mut from_lenient).await,
            Err(Error::AttributeTooLarge { .. })
        ));
        assert_eq!(
            m.get_session_fresh(&token)
                .await
                .unwrap()
                .unwrap()
                .version(),
            1
        );
        s.set("fine", "yes").unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!(s.version(), 2);
    }

    pub async fn values_postgres_cannot_store_are_typed_errors_and_nothing_is_written<F, Fut>(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        for bad in [
            attrs(&[("k", json!("nul \u{0} inside"))]),
            attrs(&[("k", json!({"nested": ["a", "b\u{0}"]}))]),
            attrs(&[("k", json!({"key\u{0}": 1}))]),
            attrs(&[("k\u{0}", json!(1))]),
        ] {
            let err = m.create_session("alice", bad).await.unwrap_err();
            assert!(matches!(err, Error::InvalidAttribute { .. }), "{err:?}");
        }
        let mut deep = json!(0);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        assert!(matches!(
            m.create_session("alice", attrs(&[("deep", deep)])).await,
            Err(Error::InvalidAttribute { .. })
        ));
        assert_eq!(m.status().await.unwrap().sessions, 0);

        // Values that do not serialize to JSON are refused by `set`.
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        let not_json = std::collections::HashMap::from([((1, 2), 3)]);
        assert!(matches!(
            s.set("map", not_json),
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(matches!(
            s.set("k", "nul \u{0} inside"),
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(!s.is_modified());
        assert_eq!(
            m.get_session_fresh(&token)
                .await
                .unwrap()
                .unwrap()
                .attributes(),
            s.attributes()
        );
    }

    pub async fn typed_attributes_round_trip_and_mismatches_are_reported<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Cart {
            items: Vec<u32>,
            coupon: Option<String>,
        }
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        let cart = Cart {
            items: vec![3, 4],
            coupon: None,
        };
        s.set("cart", &cart).unwrap();
        m.update_session(&mut s).await.unwrap();
        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!(
            stored.get("cart"),
            Some(&json!({"items": [3, 4], "coupon": null}))
        );
        assert_eq!(stored.get_as::<Cart>("cart").unwrap(), Some(cart));
        assert_eq!(stored.get_as::<Cart>("absent").unwrap(), None);
        assert!(matches!(
            stored.get_as::<Cart>("role"),
            Err(Error::AttributeType { key, .. }) if key == "role"
        ));
    }

    pub async fn reads_only_record_accesses_and_the_flush_never_moves_them_backwards<F, Fut>(
        make: F,
    ) where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            max_sessions_per_user: None,
            ..config()
        });
        let m = make(config).await;
        let start = clock.now();
        let mut tokens = Vec::new();
        for i in 0..25 {
            tokens.push(m.create_session(format!("u{i}"), small()).await.unwrap().1);
        }
        // A session whose stored access is in the future (recorded by a node whose clock is
        // ahead, say) must not be moved back by an older access.
        let future = start + chrono::Duration::hours(2);
        clock.set(future);
        m.touch_session(tokens[0].id()).unwrap();
        assert_eq!(m.flush_last_access().await.unwrap(), 1);
        let read_at = start + chrono::Duration::hours(1);
        clock.set(read_at);

        for t in &tokens {
            m.get_session(t).await.unwrap().unwrap();
            m.get_session(t).await.unwrap().unwrap();
        }
        assert_eq!(m.stats().pending_touches, 25);
        // Reads did not write: in the store, only the future access is recent.
        assert_eq!(m.count_active_sessions(30 * MINUTE).await.unwrap(), 1);

        // Every session read is written (its read count moves), the one in the future included.
        assert_eq!(m.flush_last_access().await.unwrap(), 25);
        assert_eq!(m.stats().pending_touches, 0);
        assert_eq!(m.count_active_sessions(30 * MINUTE).await.unwrap(), 25);
        let listed = m.list_sessions(None, 100).await.unwrap();
        assert_eq!(listed.len(), 25);
        for s in &listed {
            assert_eq!(s.reads(), 2, "two reads each, counted by the flush");
            let expected = if s.id() == tokens[0].id() {
                future
            } else {
                read_at
            };
            assert_eq!(s.last_accessed_at(), expected);
        }
    }

    pub async fn the_background_task_flushes_accesses_every_interval<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            last_access_flush_interval: Duration::from_millis(100),
            ..config()
        });
        let m = make(config).await;
        let (s, token) = m.create_session("alice", small()).await.unwrap();
        clock.advance(HOUR);
        let read = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(read.last_accessed_at(), clock.now());
        assert!(read.last_accessed_at() > s.last_accessed_at());
        // In the store as soon as the flush commits, a moment before the task counts it:
        // wait for both.
        eventually(
            Duration::from_secs(5),
            "access flushed by the task",
            || async {
                m.count_active_sessions(MINUTE).await.unwrap() == 1 && m.stats().flushes >= 1
            },
        )
        .await;
        assert_eq!(m.list_user_sessions("alice").await.unwrap()[0].reads(), 1);
    }

    pub async fn a_batch_worth_of_pending_accesses_is_flushed_early<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            last_access_batch_size: 10,
            max_sessions_per_user: None,
            ..config()
        });
        let m = make(config).await;
        let mut tokens = Vec::new();
        for i in 0..25 {
            tokens.push(m.create_session(format!("u{i}"), small()).await.unwrap().1);
        }
        clock.advance(HOUR);
        for t in &tokens {
            m.get_session(t).await.unwrap().unwrap();
        }
        // The flush interval is an hour of real time: only early flushes, each when a batch's
        // worth is pending, can write these; less than a batch is left.
        eventually(Duration::from_secs(5), "early flushes", || async {
            m.stats().pending_touches < 10
        })
        .await;
        // What left the buffer is stored once the flush carrying it commits.
        eventually(Duration::from_secs(5), "early flushes stored", || async {
            m.count_active_sessions(MINUTE).await.unwrap() >= 16
        })
        .await;
        assert!(m.stats().flushes >= 1);
    }

    pub async fn shutdown_writes_pending_accesses_and_every_later_call_fails<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(m.stats().pending_touches, 1);
        let flushes = m.stats().flushes;

        let clone = m.manager.clone();
        m.shutdown().await.unwrap();
        assert_eq!(m.stats().pending_touches, 0, "the final flush wrote it");
        assert_eq!(m.stats().flushes, flushes + 1);

        assert!(matches!(
            clone.get_session(&token).await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.get_session_fresh(&token).await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.create_session("bob", small()).await,
            Err(Error::ShutDown)
        ));
        s.set("k", 1).unwrap();
        assert!(matches!(
            clone.update_session(&mut s).await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.delete_session(s.id()).await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.list_user_sessions("alice").await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.count_user_sessions("alice").await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.flush_last_access().await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(
            clone.cleanup_expired().await,
            Err(Error::ShutDown)
        ));
        assert!(matches!(clone.status().await, Err(Error::ShutDown)));
        // Idempotent.
        clone.shutdown().await.unwrap();
        m.shutdown().await.unwrap();
    }

    pub async fn a_cancelled_shutdown_still_completes_and_later_calls_return<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (_, token) = m.create_session("alice", small()).await.unwrap();
        m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(m.stats().pending_touches, 1);
        // Dropped at its first suspension point.
        let _ = tokio::time::timeout(Duration::ZERO, m.shutdown()).await;
        tokio::time::timeout(Duration::from_secs(10), m.shutdown())
            .await
            .expect("a second shutdown returns")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), m.wait_for_cache())
            .await
            .expect("wait_for_cache returns after shutdown");
        assert_eq!(m.stats().pending_touches, 0, "the final flush ran");
        assert!(matches!(m.get_session(&token).await, Err(Error::ShutDown)));
    }

    pub async fn cleanup_deletes_sessions_expired_either_way_and_keeps_live_ones<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            cleanup_batch_size: 100,
            max_sessions_per_user: None,
            idle_timeout: Some(HOUR),
            last_access_flush_interval: MINUTE,
            ..config()
        });
        let m = make(config).await;
        let mut keep = Vec::new();
        let mut idle = Vec::new();
        for i in 0..250 {
            let (mut s, token) = m.create_session(format!("u{i}"), small()).await.unwrap();
            if i % 50 == 1 {
                keep.push(token);
            } else if i % 2 == 0 {
                // Absolutely expired first.
                s.set_expires_at(clock.now() + chrono::Duration::minutes(10))
                    .unwrap();
                m.update_session(&mut s).await.unwrap();
            } else {
                idle.push(token);
            }
        }
        clock.advance(170 * MINUTE);
        for t in &keep {
            m.touch_session(t.id()).unwrap();
        }
        m.flush_last_access().await.unwrap();
        // Three hours in: idle past the timeout and two flush intervals, or past their expiry.
        clock.advance(10 * MINUTE);
        let mut events = m.subscribe_events();
        assert_eq!(m.cleanup_expired().await.unwrap(), 250 - keep.len() as u64);
        let mut reported = 0;
        while let Ok(e) = events.try_recv() {
            assert_eq!(e.kind, SessionEventKind::Expired);
            reported += 1;
        }
        assert_eq!(reported, 250 - keep.len());
        assert_eq!(m.status().await.unwrap().sessions, keep.len() as u64);
        for t in &keep {
            assert!(m.get_session(t).await.unwrap().is_some());
        }
        for t in &idle {
            assert!(m.get_session_fresh(t).await.unwrap().is_none());
        }
        assert_eq!(m.cleanup_expired().await.unwrap(), 0);
    }

    pub async fn cleanup_leaves_sessions_whose_accesses_may_be_unflushed<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            idle_timeout: Some(HOUR),
            last_access_flush_interval: MINUTE,
            ..config()
        });
        let m = make(config).await;
        let (_, token) = m.create_session("alice", small()).await.unwrap();
        // Idle by the stored time, but within two flush intervals of the timeout: another node
        // may hold a newer access, so cleanup must not delete it yet (nor the cap forget it).
        clock.advance(HOUR + Duration::from_secs(1));
        assert!(m.get_session(&token).await.unwrap().is_none(), "idle");
        assert_eq!(m.cleanup_expired().await.unwrap(), 0);
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 1);
        assert_eq!(m.status().await.unwrap().sessions, 1);
        clock.advance(2 * MINUTE);
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 0);
        assert_eq!(m.cleanup_expired().await.unwrap(), 1);
        assert_eq!(m.status().await.unwrap().sessions, 0);
    }

    pub async fn periodic_cleanup_runs_in_the_background<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(Config {
            run_cleanup: true,
            cleanup_interval: Duration::from_millis(100),
            session_ttl: HOUR,
            ..config()
        });
        let m = make(config).await;
        m.create_session("alice", small()).await.unwrap();
        clock.advance(HOUR);
        let (_, live) = m.create_session("bob", small()).await.unwrap();
        eventually(
            Duration::from_secs(5),
            "expired session deleted",
            || async { m.status().await.unwrap().sessions == 1 },
        )
        .await;
        // The counter moves once the pass that deleted it has finished.
        eventually(Duration::from_secs(5), "counted", || async {
            m.stats().cleanup_deleted == 1
        })
        .await;
        assert!(m.get_session(&live).await.unwrap().is_some());
        assert!(m.status().await.unwrap().last_cleanup.is_some());
    }

    pub async fn a_user_lists_their_devices_and_logs_out_the_others<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let (config, clock) = on_manual_clock(config());
        let m = make(config).await;
        let create = async |user: &str| {
            clock.advance(MINUTE);
            m.create_session(user, small()).await.unwrap()
        };
        let (phone, phone_t) = create("alice").await;
        let (laptop, laptop_t) = create("alice").await;
        let (tablet, tablet_t) = create("alice").await;
        let (_, bob) = create("bob").await;
        clock.advance(MINUTE);
        m.get_session(&phone_t).await.unwrap().unwrap();

        let listed: Vec<SessionId> = m
            .list_user_sessions("alice")
            .await
            .unwrap()
            .iter()
            .map(|s| s.id())
            .collect();
        assert_eq!(
            listed,
            vec![phone.id(), tablet.id(), laptop.id()],
            "most recently used first"
        );

        assert_eq!(
            m.delete_other_user_sessions("alice", laptop.id())
                .await
                .unwrap(),
            2
        );
        assert!(m.get_session(&laptop_t).await.unwrap().is_some());
        assert!(m.get_session(&phone_t).await.unwrap().is_none());
        assert!(m.get_session(&tablet_t).await.unwrap().is_none());
        assert!(
            m.get_session(&bob).await.unwrap().is_some(),
            "other users keep theirs"
        );
        assert_eq!(m.delete_all_user_sessions("alice").await.unwrap(), 1);
        assert!(m.list_user_sessions("alice").await.unwrap().is_empty());
        assert!(m.get_session(&laptop_t).await.unwrap().is_none());
        assert_eq!(m.count_user_sessions("bob").await.unwrap(), 1);
    }

    pub async fn invalid_configuration_is_rejected_with_the_field_named<F, Fut>(start: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Result<Backend, Error>>,
    {
        for (config, field) in [
            (
                Config {
                    schema: Some("Robert'); DROP TABLE x;--".into()),
                    ..config()
                },
                "schema",
            ),
            (
                Config {
                    table_prefix: "bad-prefix".into(),
                    ..config()
                },
                "table_prefix",
            ),
            (
                Config {
                    session_ttl: Duration::ZERO,
                    ..config()
                },
                "session_ttl",
            ),
            (
                Config {
                    idle_timeout: Some(HOUR),
                    last_access_flush_interval: HOUR,
                    ..config()
                },
                "idle_timeout",
            ),
            (
                Config {
                    max_sessions_per_user: Some(0),
                    ..config()
                },
                "max_sessions_per_user",
            ),
            (
                Config {
                    cleanup_batch_size: 0,
                    ..config()
                },
                "cleanup_batch_size",
            ),
        ] {
            match start(config).await {
                Err(Error::InvalidConfig(msg)) => assert!(msg.contains(field), "{msg}"),
                Err(e) => panic!("{field}: unexpected {e:?}"),
                Ok(_) => panic!("{field}: accepted"),
            }
        }
        // The same rules leave a valid configuration alone.
        let m = start(config()).await.expect("a valid configuration starts");
        assert!(m.create_session("alice", small()).await.is_ok());
    }

    pub async fn sessions_work_with_the_cache_disabled<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            cache_capacity: 0,
            ..config()
        })
        .await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        s.set("k", 1).unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!(m.get_session(&token).await.unwrap().unwrap().version(), 2);
        let again = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!((again.version(), again.get("k")), (2, Some(&json!(1))));
        m.delete_session(s.id()).await.unwrap();
        assert!(m.get_session(&token).await.unwrap().is_none());
        let stats = m.stats();
        assert_eq!((stats.hits, stats.entries, stats.capacity), (0, 0, 0));
        assert!(!m.cache_trusted());
        assert!(!*m.subscribe_cache_trust().borrow());
        tokio::time::timeout(Duration::from_secs(1), m.wait_for_cache())
            .await
            .expect("wait_for_cache returns at once without a cache");
    }

    pub async fn expiries_postgres_cannot_store_are_refused_and_change_nothing<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", small()).await.unwrap();
        s.remove("bad\u{0}key");
        assert!(matches!(
            m.update_session(&mut s).await,
            Err(Error::InvalidAttribute { .. })
        ));
        let mut s = m.get_session(&token).await.unwrap().unwrap();
        let before = s.expires_at();
        for at in [
            chrono::DateTime::<Utc>::MIN_UTC,
            chrono::DateTime::<Utc>::MAX_UTC,
            "1969-12-31T23:59:59Z".parse().unwrap(),
            chrono::NaiveDate::from_ymd_opt(10_000, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc(),
        ] {
            assert!(
                matches!(s.set_expires_at(at), Err(Error::InvalidExpiry { .. })),
                "{at}"
            );
            assert!(
                matches!(
                    s.set_with_expiry("otp", 1, at),
                    Err(Error::InvalidExpiry { .. })
                ),
                "{at}"
            );
        }
        assert_eq!(s.expires_at(), before);
        assert_eq!(s.get("otp"), None);
        assert!(!s.is_modified());
        m.update_session(&mut s).await.unwrap();
        let stored = m.get_session_fresh(&token).await.unwrap().unwrap();
        assert_eq!((stored.version(), stored.expires_at()), (1, before));
    }

    pub async fn count_user_sessions_counts_that_users_live_sessions_only<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        // Flushed every hour (common::config), idle after two: the cap and this count drop a
        // session whose stored access is over four hours old.
        let (config, clock) = on_manual_clock(Config {
            idle_timeout: Some(2 * HOUR),
            max_sessions_per_user: None,
            ..config()
        });
        let m = make(config).await;
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 0);
        let (_, idle) = m.create_session("alice", small()).await.unwrap();
        clock.advance(3 * HOUR);
        let (_, a1) = m.create_session("alice", small()).await.unwrap();
        let (a2, _) = m.create_session("alice", small()).await.unwrap();
        let (mut short, _) = m.create_session("alice", small()).await.unwrap();
        m.create_session("bob", small()).await.unwrap();
        m.create_anonymous_session(small()).await.unwrap();
        assert!(
            m.get_session(&idle).await.unwrap().is_none(),
            "idle for reads"
        );
        assert_eq!(
            m.count_user_sessions("alice").await.unwrap(),
            4,
            "idle by its stored access, but another node may hold a later one"
        );
        clock.advance(HOUR + Duration::from_secs(1));
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 3);
        short
            .set_expires_at(clock.now() + chrono::Duration::minutes(1))
            .unwrap();
        m.update_session(&mut short).await.unwrap();
        assert_eq!(m.count_user_sessions("alice").await.unwrap(), 3);
        clock.advance(MINUTE);
        assert_eq!(
            m.count_user_sessions("alice").await.unwrap(),
            2,
            "an expired session does not count"
        );
        assert!(m.delete_session(a2.id()).await.unwrap());
        assert_eq!(
            m.count_user_sessions("alice").await.unwrap(),
            1,
            "a deleted session does not count"
        );
        assert!(m.get_session(&a1).await.unwrap().is_some());
        assert_eq!(m.count_user_sessions("bob").await.unwrap(), 1);
        assert_eq!(m.count_user_sessions("carol").await.unwrap(), 0);
        for bad in ["", "a\u{0}b"] {
            assert!(matches!(
                m.count_user_sessions(bad).await,
                Err(Error::InvalidUserId(_))
            ));
        }
    }
}
