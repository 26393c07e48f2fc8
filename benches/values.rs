//! The cost of checking attribute values on the write path (`Session::set`, which encodes a
//! value once in the form PostgreSQL gives back) and of reading numbers back exactly (what
//! serde_json's `float_roundtrip` adds to decoding a stored session).
//!
//! ```text
//! cargo bench --bench values
//! ```
//!
//! No database: `Session::set` does no I/O, and decoding is serde_json's alone.

use std::hint::black_box;
use std::time::Instant;

use pgsession::{Config, SessionManager};
use serde_json::{Value, json};

/// Nanoseconds per call of `f`, median of 7 rounds of `n` calls.
fn per_call(n: u32, mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..7)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..n {
                f();
            }
            started.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[3]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let manager = runtime
        .block_on(SessionManager::in_memory(Config::default()))
        .unwrap();
    let (session, _) = runtime
        .block_on(manager.create_session("bench", [("k", 1)]))
        .unwrap();

    let floats: Vec<f64> = (1..=100).map(|i| f64::from(i) * 1.000_000_1e-3).collect();
    let cases: Vec<(&str, Value)> = vec![
        ("an integer", json!(42)),
        ("a 100-byte string", json!("x".repeat(100))),
        ("a float", json!(std::f64::consts::PI)),
        (
            "a small object",
            json!({"user": "alice", "roles": ["admin", "ops"], "n": 7, "ok": true}),
        ),
        ("100 floats", json!(floats)),
        ("a 4 KiB string", json!("y".repeat(4096))),
    ];
    println!("Session::set, ns per call (median of 7 rounds)");
    for (name, value) in &cases {
        let mut s = session.clone();
        let ns = per_call(20_000, || {
            s.set("k", black_box(value)).unwrap();
        });
        println!("  {name:<18} {ns:>9.0} ns");
    }

    // What reading a stored session's attributes costs, as PostgreSQL prints them (floats in
    // plain notation), with this build's serde_json features.
    let stored = json!({"floats": floats, "big": 1.5e300, "tiny": 5e-324}).to_string();
    let plain = stored
        .replace("1.5e300", &format!("15{}", "0".repeat(299)))
        .replace("5e-324", &format!("0.{}5", "0".repeat(323)));
    let ns = per_call(5_000, || {
        black_box(serde_json::from_str::<Value>(black_box(&plain)).ok());
    });
    println!(
        "decoding {} bytes of stored attributes holding 102 floats: {ns:.0} ns",
        plain.len()
    );
}
