//! A short run of the fault-injecting soak (`examples/soak`, where the verdicts are defined):
//! three nodes under a random workload while every fault mode strikes at random. Guarantees
//! G1-G6 of docs/design.md, judged against the history of acknowledged writes.
//!
//! Runs on a private server of its own (it restarts it), started from the installed binaries.

#[allow(dead_code)] // the command line uses the rest
#[path = "../examples/soak/harness.rs"]
mod harness;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_seconds_of_every_fault_serve_nothing_stale_and_lose_nothing() {
    let report = harness::run(harness::Options {
        duration: Duration::from_secs(20),
        fault_every: Duration::from_secs(1),
        seed: std::env::var("SOAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7),
        ..harness::Options::default()
    })
    .await
    .expect("the soak runs");
    println!("{report}");
    let faults: u64 = report.faults.iter().map(|(_, n)| n).sum();
    assert!(faults >= 10, "faults were injected: {report}");
    assert!(
        report.reads > 1000 && report.updates > 100 && report.logouts > 10,
        "the workload ran: {report}"
    );
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_every_fault_serves_nothing_stale_and_loses_nothing() {
    let report = harness::run(harness::Options {
        duration: Duration::from_secs(10),
        fault_every: Duration::from_secs(1),
        seed: 11,
        through_pgbouncer: true,
        ..harness::Options::default()
    })
    .await
    .expect("the soak runs behind pgbouncer");
    println!("{report}");
    let faults: u64 = report.faults.iter().map(|(_, n)| n).sum();
    assert!(faults >= 5, "faults were injected: {report}");
    assert!(
        report.reads > 500 && report.updates > 50,
        "the workload ran: {report}"
    );
    assert!(report.passed(), "{report}");
}
