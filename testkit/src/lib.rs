//! Test support for pgsession.
//!
//! * [`TempPostgres`]: a private, throwaway PostgreSQL server started from the installed
//!   binaries, which never outlives the process that started it.
//! * [`server_url`] and [`TestDatabase`]: a fresh database per test, on `DATABASE_URL` if set or
//!   on one private server per test process otherwise.
//! * [`FaultProxy`]: a TCP proxy that can stall, hold, cut or refuse connections.
//! * [`TempPgBouncer`]: a private, throwaway pgbouncer in transaction pooling mode in front of a
//!   server, whose server connections a test can kill.

mod database;
mod pgbouncer;
mod process;
mod proxy;
mod redis;
mod server;

pub use database::{TestDatabase, server_url};
pub use pgbouncer::TempPgBouncer;
pub use proxy::FaultProxy;
pub use redis::TempRedis;
pub use server::{ServerOptions, TempPostgres};

/// A `postgres://` URL cut into the pieces the helpers below need to swap.
struct UrlParts<'a> {
    /// `scheme://` plus `user[:password]@` when present.
    prefix: &'a str,
    /// `host[:port]`.
    host_port: &'a str,
    /// `/dbname`, possibly empty.
    path: &'a str,
    /// `?params`, possibly empty.
    query: &'a str,
}

fn split_url(url: &str) -> UrlParts<'_> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let auth_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let host_start = url[start..auth_end]
        .rfind('@')
        .map_or(start, |i| start + i + 1);
    let query_start = url[auth_end..]
        .find('?')
        .map_or(url.len(), |i| auth_end + i);
    UrlParts {
        prefix: &url[..host_start],
        host_port: &url[host_start..auth_end],
        path: &url[auth_end..query_start],
        query: &url[query_start..],
    }
}

/// `url` with its database name replaced by `dbname`.
fn with_database(url: &str, dbname: &str) -> String {
    let p = split_url(url);
    format!("{}{}/{dbname}{}", p.prefix, p.host_port, p.query)
}

/// `url` with its host and port replaced by `host_port`.
fn with_host_port(url: &str, host_port: &str) -> String {
    let p = split_url(url);
    format!("{}{host_port}{}{}", p.prefix, p.path, p.query)
}

/// `url` safe to print in a panic message: a `DATABASE_URL` may carry a password.
fn redact(url: &str) -> String {
    let p = split_url(url);
    let scheme_end = url.find("://").map_or(0, |i| i + 3).min(p.prefix.len());
    match p.prefix[scheme_end..].split_once(':') {
        Some((user, _)) => format!(
            "{}{user}:***@{}{}{}",
            &url[..scheme_end],
            p.host_port,
            p.path,
            p.query
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_urls() {
        let url = "postgres://u:pw@db.example:5433/app?sslmode=disable";
        assert_eq!(
            with_database(url, "t1"),
            "postgres://u:pw@db.example:5433/t1?sslmode=disable"
        );
        assert_eq!(
            with_host_port(url, "127.0.0.1:9"),
            "postgres://u:pw@127.0.0.1:9/app?sslmode=disable"
        );
        assert_eq!(
            redact(url),
            "postgres://u:***@db.example:5433/app?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://localhost", "x"),
            "postgres://localhost/x"
        );
        assert_eq!(
            with_host_port("postgresql://u@[::1]:5432", "127.0.0.1:1"),
            "postgresql://u@127.0.0.1:1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
