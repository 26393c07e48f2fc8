//! Opening PostgreSQL for a manager: the pool `SessionManager::connect` builds, the first
//! connection (which reports a server that cannot be reached with its cause), migrations, and
//! the checks a manager makes before it starts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::PgStorage;
use super::migrate;
use super::names::Names;
use super::reachability::Reachability;
use crate::config::Config;
use crate::error::{Error, Result};

/// Connections of the pool built by `SessionManager::connect`.
const POOL_SIZE: u32 = 10;
/// A pooled connection idle this long is pinged before use (one extra round trip); fresher ones
/// are used directly, saving a round trip on every query.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);

/// The pool `SessionManager::connect` builds for `url`: 10 connections, a 5-second acquire
/// timeout, READ COMMITTED, no ping for connections used in the last 30 s. Connects lazily.
pub(crate) fn pool(url: &str) -> Result<PgPool> {
    let options: PgConnectOptions = url
        .parse::<PgConnectOptions>()
        .map_err(|e| Error::InvalidConfig(format!("database URL: {e}")))?
        // The per-user cap needs it (see the create function in migrations/).
        .options([("default_transaction_isolation", "read committed")]);
    Ok(PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options))
}

/// Apply (or with `run_migrations` off, check) the migrations. On a pool pgsession built, over
/// one direct connection first, so that a server that cannot be reached is reported at once
/// with its cause ("Connection refused") rather than as the pool's timeout; on a caller's pool,
/// through that pool (its hooks and limit apply), finding out why if it cannot connect.
pub(crate) async fn migrate(
    pool: &PgPool,
    names: &Names,
    config: &Config,
    owns_pool: bool,
) -> Result<()> {
    if owns_pool {
        let mut first = directly(&pool.connect_options(), config.connect_timeout).await?;
        migrate::run(&mut first, names, config.run_migrations).await?;
        let _ = first.close().await;
        return Ok(());
    }
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(sqlx::Error::PoolTimedOut) => {
            directly(&pool.connect_options(), config.connect_timeout).await?;
            return Err(Error::Database(sqlx::Error::PoolTimedOut));
        }
        Err(e) => return Err(Error::Database(e)),
    };
    migrate::run(&mut conn, names, config.run_migrations).await
}

/// The storage of a manager on `pool`, checked: its connections start transactions in READ
/// COMMITTED (the per-user cap relies on it). With it, until when legacy tokens are accepted
/// (see `Config::accept_legacy_tokens`). `cancel` stops the reachability probes.
pub(crate) async fn storage(
    pool: PgPool,
    names: &Names,
    config: &Config,
    tag: &str,
    cancel: CancellationToken,
) -> Result<(Arc<PgStorage>, Option<DateTime<Utc>>)> {
    let reach = Arc::new(Reachability::new(
        (*pool.connect_options()).clone(),
        config.connect_timeout,
        cancel,
    ));
    let storage = Arc::new(PgStorage::new(pool, names, tag, reach));
    let isolation = storage.default_isolation().await?;
    if isolation != "read committed" {
        return Err(Error::InvalidConfig(format!(
            "the pool's connections default to {isolation:?} isolation; pgsession needs \
             \"read committed\" (set default_transaction_isolation on the connections)"
        )));
    }
    let legacy_until = storage.legacy_until().await?;
    Ok((storage, legacy_until))
}

/// Where the LISTEN connection connects: `listen_url`, or the pool's own options; named after
/// the node (`<listener prefix><tag>`) so that `status` can list the nodes listening.
pub(crate) fn listen_options(
    config: &Config,
    pool: &PgPool,
    names: &Names,
    tag: &str,
) -> Result<PgConnectOptions> {
    let options = match &config.listen_url {
        Some(url) => url
            .parse::<PgConnectOptions>()
            .map_err(|e| Error::InvalidConfig(format!("listen_url: {e}")))?,
        None => (*pool.connect_options()).clone(),
    };
    Ok(options.application_name(&format!(
        "{}{}",
        names.listener_application_prefix(),
        &tag[2..]
    )))
}

/// A connection straight to the server (not through the pool), within `limit`: its error is
/// the cause, where the pool would only report that it timed out.
pub(crate) async fn directly(options: &PgConnectOptions, limit: Duration) -> Result<PgConnection> {
    match tokio::time::timeout(limit, PgConnection::connect_with(options)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(Error::Database(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting to the database timed out after {limit:?}"),
        )))),
    }
}
