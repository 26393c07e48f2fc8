//! Soak: several nodes under a random workload while connections are killed, stalled and
//! refused and the server restarts; judged against the history of acknowledged writes.
//!
//! ```text
//! cargo run --release --example soak -- --seconds 60
//! cargo run --release --example soak -- --seconds 30 --faults kill-announcer,restart
//! ```
//!
//! Options: `--seconds S` (60), `--nodes N` (3), `--tasks T` per node (4), `--sessions N`
//! (60), `--faults LIST` (`all`, `none`, or names separated by commas: kill-listener,
//! kill-announcer, kill-pool, kill-all, kill-random, restart, half-open-listener, stall-pool,
//! refuse), `--every MS` between faults (1500), `--bound MS` of allowed staleness (1000),
//! `--seed N` (1), `--pgbouncer` (pools through Debian's PgBouncer in transaction mode, which
//! adds the fault kill-pooler-servers). Exits with status 1 when any verdict is not zero.
//!
//! Always runs on a private PostgreSQL server of its own (it restarts it), started from the
//! installed server binaries.

mod harness;

use std::time::Duration;

use harness::{Fault, Options};

fn parse_args() -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| -> Result<u64, String> {
            v.parse()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--seconds" => options.duration = Duration::from_secs(number(value()?)?),
            "--nodes" => options.nodes = number(value()?)?.max(1) as usize,
            "--tasks" => options.tasks_per_node = number(value()?)?.max(1) as usize,
            "--sessions" => options.sessions = number(value()?)?.max(3) as usize,
            "--every" => options.fault_every = Duration::from_millis(number(value()?)?),
            "--bound" => options.bound = Duration::from_millis(number(value()?)?),
            "--seed" => options.seed = number(value()?)?,
            "--pgbouncer" => options.through_pgbouncer = true,
            "--faults" => {
                let list = value()?;
                options.faults = match list.as_str() {
                    "all" => Fault::ALL.to_vec(),
                    "none" => Vec::new(),
                    _ => list
                        .split(',')
                        .map(|name| Fault::parse(name).ok_or(format!("unknown fault {name:?}")))
                        .collect::<Result<_, _>>()?,
                };
            }
            "-h" | "--help" => {
                println!(
                    "usage: soak [--seconds S] [--nodes N] [--tasks T] [--sessions N] \
                     [--faults all|none|LIST] [--every MS] [--bound MS] [--seed N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?} (try --help)")),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() {
    // RUST_LOG=pgsession=debug shows what the nodes do about each fault.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    };
    let faults: Vec<&str> = options.faults.iter().map(|f| f.name()).collect();
    println!(
        "soak: {} nodes x {} tasks, {} sessions, {} s, a fault every {} ms from [{}], bound {} ms, seed {}",
        options.nodes,
        options.tasks_per_node,
        options.sessions,
        options.duration.as_secs(),
        options.fault_every.as_millis(),
        faults.join(", "),
        options.bound.as_millis(),
        options.seed
    );
    match harness::run(options).await {
        Ok(report) => {
            print!("{report}");
            if !report.passed() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(2);
        }
    }
}
