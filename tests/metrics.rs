//! The `metrics` feature: every documented name is reported through the facade, with its unit,
//! and the values move with what the manager does. One test: the recorder is process-wide.
#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use pgsession::{Config, SigningKey};

/// Counters and gauges by name (summed over labels), histogram samples by name and label.
#[derive(Default)]
struct Seen {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<String, usize>,
    units: HashMap<String, String>,
}

fn take(snapshotter: &Snapshotter, seen: &mut Seen) {
    for (key, unit, _description, value) in snapshotter.snapshot().into_vec() {
        let key: CompositeKey = key;
        let name = key.key().name().to_string();
        if let Some(unit) = unit {
            seen.units.insert(name.clone(), unit.as_str().to_owned());
        }
        match (key.kind(), value) {
            // The debugging recorder hands out what changed since the last snapshot: counters
            // add up, and a gauge reads 0 between two reports.
            (MetricKind::Counter, DebugValue::Counter(v)) => {
                *seen.counters.entry(name).or_default() += v;
            }
            (MetricKind::Gauge, DebugValue::Gauge(v)) => {
                let v = v.into_inner();
                let gauge = seen.gauges.entry(name).or_insert(v);
                if v != 0.0 {
                    *gauge = v;
                }
            }
            (MetricKind::Histogram, DebugValue::Histogram(samples)) => {
                let label = key
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect::<Vec<_>>()
                    .join(",");
                *seen
                    .histograms
                    .entry(format!("{name}{{{label}}}"))
                    .or_default() += samples.len();
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_every_documented_name_and_move_with_the_work() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let db = TestDatabase::create().await;
    let key = SigningKey::generate();
    let m = node(
        &db,
        Config {
            max_sessions_per_user: Some(1),
            signing_keys: vec![key],
            ..config()
        },
    )
    .await;
    let (_, first) = m.create_session("alice", [("k", 1)]).await.unwrap();
    let (mut s, token) = m.create_session("alice", [("k", 2)]).await.unwrap(); // evicts `first`
    assert!(m.get_session(&first).await.unwrap().is_none());
    for _ in 0..5 {
        m.get_session(&token).await.unwrap().unwrap();
    }
    s.set("k", 3).unwrap();
    m.update_session(&mut s).await.unwrap();
    // A token signed with another key.
    let stranger = pgsession::SessionManager::in_memory(Config {
        signing_keys: vec![SigningKey::generate()],
        ..config()
    })
    .await
    .unwrap();
    let (_, forged) = stranger
        .create_session("mallory", [("k", 1)])
        .await
        .unwrap();
    assert!(m.get_session(&forged).await.unwrap().is_none());
    let stats = m.stats();

    let mut seen = Seen::default();
    eventually(Duration::from_secs(5), "the reporter's next tick", || {
        take(&snapshotter, &mut seen);
        let done = seen.counters.get("pgsession_cache_hits_total").copied() >= Some(stats.hits)
            && seen.counters.get("pgsession_cap_evictions_total") == Some(&1)
            && seen.counters.get("pgsession_forged_tokens_total") == Some(&1)
            && seen.gauges.get("pgsession_cache_trusted") == Some(&1.0);
        async move { done }
    })
    .await;

    for name in [
        "pgsession_cache_hits_total",
        "pgsession_cache_misses_total",
        "pgsession_cache_fills_rejected_total",
        "pgsession_invalidations_received_total",
        "pgsession_invalidations_announced_total",
        "pgsession_announce_failures_total",
        "pgsession_listener_reconnects_total",
        "pgsession_resync_evictions_total",
        "pgsession_forged_tokens_total",
        "pgsession_cap_evictions_total",
        "pgsession_expired_deleted_total",
        "pgsession_touches_dropped_total",
    ] {
        assert_eq!(
            seen.units.get(name).map(String::as_str),
            Some("count"),
            "{name}"
        );
    }
    assert_eq!(
        seen.units
            .get("pgsession_cache_distrusted_milliseconds_total")
            .map(String::as_str),
        Some("milliseconds")
    );
    for name in [
        "pgsession_cache_entries",
        "pgsession_pending_touches",
        "pgsession_outbox_backlog",
        "pgsession_cache_trusted",
    ] {
        assert!(seen.gauges.contains_key(name), "gauge {name} reported");
    }
    assert!(seen.counters["pgsession_cache_hits_total"] >= 5);
    assert!(seen.counters["pgsession_cache_misses_total"] >= 1);
    assert!(seen.gauges["pgsession_cache_entries"] >= 1.0);
    assert!(seen.gauges["pgsession_pending_touches"] >= 1.0);
    assert_eq!(
        seen.units
            .get("pgsession_operation_duration_seconds")
            .map(String::as_str),
        Some("seconds")
    );
    for op in ["create", "update", "get"] {
        let key = format!("pgsession_operation_duration_seconds{{operation={op}}}");
        assert!(
            seen.histograms.get(&key).is_some_and(|n| *n >= 1),
            "{key}: {:?}",
            seen.histograms
        );
    }
    assert!(seen.histograms["pgsession_operation_duration_seconds{operation=create}"] >= 2);

    // Values keep moving: more hits show up at the next report.
    let before = seen.counters["pgsession_cache_hits_total"];
    for _ in 0..10 {
        m.get_session(&token).await.unwrap().unwrap();
    }
    eventually(Duration::from_secs(5), "hits reported again", || {
        take(&snapshotter, &mut seen);
        let moved = seen.counters["pgsession_cache_hits_total"] >= before + 10;
        async move { moved }
    })
    .await;
    m.shutdown().await.unwrap();
}
