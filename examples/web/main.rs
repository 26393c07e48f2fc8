//! The demo site: two nodes of one service on two ports of 127.0.0.1, sharing one database.
//! A browser sends the same cookie to both ports, so one browser sees both nodes: count
//! visits, log in on one, see it on the other, log out everywhere.
//!
//! ```text
//! cargo run --features axum,metrics --example web                     # ports 3000 and 3001
//! cargo run --features axum,metrics --example web -- --ports 8080,8081
//! ```
//!
//! Uses `DATABASE_URL` when it is set; otherwise starts a private, throwaway PostgreSQL server
//! from the installed binaries, as the quickstart does. Tokens are signed with
//! `PGSESSION_SIGNING_KEY` (base64, at least 32 bytes) or a key generated at start and shared
//! by both nodes. Logs go to stderr (`RUST_LOG`, default `info`).

mod app;

use std::net::SocketAddr;

use pgsession::{SessionManager, SigningKey};
use pgsession_testkit::TempPostgres;

const USAGE: &str = "usage: web [--ports A,B]   (default 3000,3001)";

fn ports() -> Result<[u16; 2], String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok([3000, 3001]),
        [flag, list] if flag == "--ports" => {
            let parsed: Vec<u16> = list
                .split(',')
                .map(|p| p.trim().parse::<u16>())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("bad port in {list:?}: {e}\n{USAGE}"))?;
            match parsed.as_slice() {
                [a, b] if a != b => Ok([*a, *b]),
                _ => Err(format!("--ports needs two different ports\n{USAGE}")),
            }
        }
        [flag] if flag == "--help" || flag == "-h" => {
            println!("{USAGE}");
            std::process::exit(0);
        }
        _ => Err(USAGE.to_owned()),
    }
}

/// The signing key: `PGSESSION_SIGNING_KEY` (at least 32 bytes, base64url or standard base64,
/// the same for every node of the service) when set, otherwise one generated now for this
/// process's nodes (cookies then stop working when the demo restarts).
fn signing_key() -> Result<SigningKey, String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    match std::env::var("PGSESSION_SIGNING_KEY") {
        Ok(text) if !text.trim().is_empty() => {
            let text = text.trim();
            let bytes = URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .or_else(|_| STANDARD.decode(text))
                .map_err(|e| format!("PGSESSION_SIGNING_KEY is not base64: {e}"))?;
            SigningKey::from_bytes(&bytes).map_err(|e| format!("PGSESSION_SIGNING_KEY: {e}"))
        }
        _ => Ok(SigningKey::generate()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without a subscriber a failing database would show only as 500s, with no cause.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let ports = ports()?;
    let key = signing_key()?;
    let (url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            println!("using DATABASE_URL");
            (url, None)
        }
        _ => {
            let server = TempPostgres::start()?;
            println!("started a private PostgreSQL on port {}", server.port());
            (server.url("postgres"), Some(server))
        }
    };

    let mut nodes = Vec::new();
    let mut servers = tokio::task::JoinSet::new();
    for (name, port) in ["node A", "node B"].into_iter().zip(ports) {
        let manager = SessionManager::connect(app::config(key.clone()), &url).await?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e} (try --ports)"))?;
        let router = app::router(app::Node::new(name, manager.clone(), app::prometheus()));
        println!("{name}: http://127.0.0.1:{port}/");
        servers.spawn(async move { axum::serve(listener, router).await });
        nodes.push(manager);
    }
    println!("Ctrl-C stops both nodes.");

    tokio::select! {
        _ = tokio::signal::ctrl_c() => println!("stopping"),
        Some(ended) = servers.join_next() => println!("a server stopped: {ended:?}"),
    }
    servers.abort_all();
    for node in nodes {
        node.shutdown().await?;
    }
    Ok(())
}
