//! One behavioural suite, run against both backends: PostgreSQL (`SessionManager::connect`)
//! and memory (`SessionManager::in_memory`). Every test is written once, in `suite`, and
//! `backend_tests!` instantiates all of them for each backend (as tower-sessions'
//! `route_tests!` does for its stores), so the two cannot drift apart.

mod common;

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use common::{TestDatabase, config};
use pgsession::{
    Config, Error, MaxSessionsPolicy, Origin, SessionEvent, SessionEventKind, SessionManager,
    SessionOptions, SigningKey,
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
    let db = TestDatabase::create().await;
    let manager = common::node(&db, config).await;
    Backend {
        manager,
        _db: Some(db),
    }
}

/// An in-memory manager.
pub async fn memory(config: Config) -> Backend {
    Backend {
        manager: SessionManager::in_memory(config)
            .await
            .expect("in-memory manager starts"),
        _db: None,
    }
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

macro_rules! all_backend_tests {
    ($make:path) => {
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
        );
    };
}

mod postgres {
    all_backend_tests!(crate::postgres);
}

mod memory {
    all_backend_tests!(crate::memory);
}

/// Wait for the next event (they are sent before the operation returns: no waiting really).
async fn next(events: &mut tokio::sync::broadcast::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("no lag")
}

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
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", [("k", 1)]).await.unwrap();
        let mut events = m.subscribe_events();
        s.set_expires_at(Utc::now() - chrono::Duration::seconds(1))
            .unwrap();
        m.update_session(&mut s).await.unwrap();
        assert_eq!(next(&mut events).await.kind, SessionEventKind::Updated);
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
        let m = make(config()).await;
        let (s, _) = m.create_session("alice", [("k", 1)]).await.unwrap();
        let before = s.last_accessed_at();
        tokio::time::sleep(Duration::from_millis(5)).await; // a later access time
        m.touch_session(s.id()).unwrap();
        m.flush_last_access().await.unwrap();
        let listed = &m.list_user_sessions("alice").await.unwrap()[0];
        assert!(
            listed.last_accessed_at() > before,
            "the access was recorded"
        );
        assert_eq!(listed.reads(), 0, "a keep-alive is not a read");
    }

    pub async fn time_to_live_is_the_sooner_of_absolute_and_idle_expiry<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(Config {
            idle_timeout: Some(Duration::from_secs(7200)),
            session_ttl: Duration::from_secs(86_400),
            ..config()
        })
        .await;
        let (mut s, _) = m.create_session("alice", [("k", 1)]).await.unwrap();
        let ttl = s.time_to_live();
        assert!(
            ttl <= Duration::from_secs(7200) && ttl > Duration::from_secs(7190),
            "{ttl:?}"
        );
        s.set_expires_at(Utc::now() + chrono::Duration::seconds(600))
            .unwrap();
        m.update_session(&mut s).await.unwrap();
        let ttl = s.time_to_live();
        assert!(
            ttl <= Duration::from_secs(600) && ttl > Duration::from_secs(590),
            "{ttl:?}"
        );
    }

    pub async fn count_active_sessions_counts_recent_accesses_only<F, Fut>(make: F)
    where
        F: Fn(Config) -> Fut,
        Fut: Future<Output = Backend>,
    {
        let m = make(config()).await;
        for _ in 0..3 {
            m.create_session("alice", [("k", 1)]).await.unwrap();
        }
        // The subject is time passing: the first three become "not recent".
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mid = std::time::Instant::now();
        let (mut gone, _) = m.create_session("bob", [("k", 1)]).await.unwrap();
        m.create_session("carol", [("k", 1)]).await.unwrap();
        assert_eq!(
            m.count_active_sessions(Duration::from_secs(3600))
                .await
                .unwrap(),
            5
        );
        // A window reaching back to just before the last two, however long they took.
        let window = mid.elapsed() + Duration::from_millis(50);
        assert!(
            window < Duration::from_millis(350),
            "the machine stalled for {window:?}"
        );
        assert_eq!(m.count_active_sessions(window).await.unwrap(), 2);
        gone.set_expires_at(Utc::now() - chrono::Duration::seconds(1))
            .unwrap();
        m.update_session(&mut gone).await.unwrap();
        assert_eq!(
            m.count_active_sessions(Duration::from_secs(3600))
                .await
                .unwrap(),
            4,
            "expired sessions are not active"
        );
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
        let m = make(config()).await;
        let (mut s, token) = m.create_session("alice", [("keep", 1)]).await.unwrap();
        let soon = Utc::now() + chrono::Duration::milliseconds(1500);
        s.set_with_expiry("otp", "123456", soon).unwrap();
        s.set_with_expiry("later", true, Utc::now() + chrono::Duration::hours(1))
            .unwrap();
        m.update_session(&mut s).await.unwrap();
        let read = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(
            read.get_as::<String>("otp").unwrap().as_deref(),
            Some("123456")
        );
        assert!(read.attribute_expires_at("otp").is_some());
        // The subject is time passing.
        let left = (soon - Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(left + Duration::from_millis(50)).await;
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
        let listed = &m.list_user_sessions("alice").await.unwrap()[0];
        assert!(!listed.attributes().contains_key("otp"));
        // Setting it again without an expiry makes it permanent.
        let mut s = again;
        s.set("later", false).unwrap();
        m.update_session(&mut s).await.unwrap();
        let s = m.get_session(&token).await.unwrap().unwrap();
        assert_eq!(s.attribute_expires_at("later"), None);
        m.cleanup_expired().await.unwrap();
        assert!(
            m.get_session(&token)
                .await
                .unwrap()
                .unwrap()
                .get("keep")
                .is_some()
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
}
