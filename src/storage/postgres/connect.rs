//! Opening PostgreSQL for a manager: the pool `SessionManager::connect` builds, the servers a
//! URL names (see [`super::hosts`]), the first connection (which reports a server that cannot
//! be reached with its cause), migrations, and the checks a manager makes before it starts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::PgStorage;
use super::hosts::Hosts;
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

/// Where a manager's connections go.
pub(crate) struct Servers {
    pub pool: PgPool,
    /// The servers the pool's URL names (one, for a caller's pool).
    pub pool_hosts: Arc<Hosts>,
    /// Where connections that must reach the server itself go (the listener, the announcer,
    /// probes, migrations behind a pooler): `listen_url`'s servers, or the pool's.
    pub direct: Arc<Hosts>,
    /// Whether pgsession built the pool (and so closes it, and moves it after a failover).
    pub owned: bool,
}

/// The pool `SessionManager::connect` builds for `url` (one server or several, libpq's forms):
/// 10 connections, a 5-second acquire timeout, READ COMMITTED, no ping for connections used in
/// the last 30 s; lazy. With several servers or `target_session_attrs`, a new connection that
/// lands on a server of the wrong kind is dropped, and connections made before the pool moved
/// to another server are not handed out again. Behind a transaction-mode pooler, nothing is
/// set at startup (poolers refuse the `options` parameter) and nothing is prepared by name.
pub(crate) fn servers(url: &str, config: &Config) -> Result<Servers> {
    let pooled = config.transaction_pooling;
    let pool_hosts = Arc::new(Hosts::parse(url, "database URL")?.map(|options| {
        if pooled {
            options.statement_cache_capacity(0)
        } else {
            // The per-user cap needs it (see the create function in migrations/).
            options.options([("default_transaction_isolation", "read committed")])
        }
    }));
    let check = pool_hosts.clone();
    let age = pool_hosts.clone();
    let choosing = pool_hosts.choosing();
    let pool = PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            let check = check.clone();
            Box::pin(async move {
                if choosing {
                    check.check(conn).await?;
                }
                Ok(())
            })
        })
        .before_acquire(move |conn, meta| {
            let age = age.clone();
            Box::pin(async move {
                // Made before the pool moved to another server (a failover): not ours now.
                if choosing && meta.age > age.since_switch() {
                    return Ok(false);
                }
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(pool_hosts.current());
    let direct = match &config.listen_url {
        Some(listen) => Arc::new(Hosts::parse(listen, "listen_url")?),
        None => pool_hosts.clone(),
    };
    Ok(Servers {
        pool,
        pool_hosts,
        direct,
        owned: true,
    })
}

/// The servers of a pool the caller built (one: its options), and of `listen_url`.
pub(crate) fn caller_servers(pool: PgPool, config: &Config) -> Result<Servers> {
    let pool_hosts = Arc::new(Hosts::single((*pool.connect_options()).clone()));
    let direct = match &config.listen_url {
        Some(listen) => Arc::new(Hosts::parse(listen, "listen_url")?),
        None => pool_hosts.clone(),
    };
    Ok(Servers {
        pool,
        pool_hosts,
        direct,
        owned: false,
    })
}

/// Apply (or with `run_migrations` off, check) the migrations. On a pool pgsession built, over
/// one direct connection first, so that a server that cannot be reached is reported at once
/// with its cause ("Connection refused") rather than as the pool's timeout; on a caller's pool,
/// through that pool (its hooks and limit apply), finding out why if it cannot connect. Behind
/// a transaction-mode pooler, over `listen_url`: the server itself.
pub(crate) async fn migrate(servers: &Servers, names: &Names, config: &Config) -> Result<()> {
    if servers.owned || config.transaction_pooling {
        let hosts = if config.transaction_pooling {
            &servers.direct
        } else {
            &servers.pool_hosts
        };
        let mut first = directly(hosts, config.connect_timeout).await?;
        migrate::run(&mut first, names, config.run_migrations).await?;
        let _ = first.close().await;
        return Ok(());
    }
    let mut conn = match servers.pool.acquire().await {
        Ok(conn) => conn,
        Err(sqlx::Error::PoolTimedOut) => {
            directly(&servers.pool_hosts, config.connect_timeout).await?;
            return Err(Error::Database(sqlx::Error::PoolTimedOut));
        }
        Err(e) => return Err(Error::Database(e)),
    };
    migrate::run(&mut conn, names, config.run_migrations).await
}

/// The storage of a manager on `servers`, checked: its connections start transactions in READ
/// COMMITTED (the per-user cap relies on it). With it, until when legacy tokens are accepted
/// (see `Config::accept_legacy_tokens`). `cancel` stops the reachability probes.
pub(crate) async fn storage(
    servers: &Servers,
    names: &Names,
    config: &Config,
    tag: &str,
    cancel: CancellationToken,
) -> Result<(Arc<PgStorage>, Option<DateTime<Utc>>)> {
    let pooled = config.transaction_pooling;
    // Behind a pooler the server itself is what can be gone; the pooler moves its own
    // connections. Otherwise the pool's servers, and the pool follows a failover if it is ours.
    let reach = if pooled {
        Reachability::new(servers.direct.clone(), None, config.connect_timeout, cancel)
    } else {
        let movable = servers.owned.then(|| servers.pool.clone());
        Reachability::new(
            servers.pool_hosts.clone(),
            movable,
            config.connect_timeout,
            cancel,
        )
    };
    let storage = Arc::new(PgStorage::new(
        servers.pool.clone(),
        names,
        tag,
        Arc::new(reach),
        servers.direct.clone(),
        pooled,
    ));
    // Behind a pooler each statement's transaction sets its isolation itself.
    let isolation = if pooled {
        "read committed".to_owned()
    } else {
        storage.default_isolation().await?
    };
    if isolation != "read committed" {
        return Err(Error::InvalidConfig(format!(
            "the pool's connections default to {isolation:?} isolation; pgsession needs \
             \"read committed\" (set default_transaction_isolation on the connections)"
        )));
    }
    let legacy_until = storage.legacy_until().await?;
    Ok((storage, legacy_until))
}

/// Where the LISTEN connection connects (the direct servers), named after the node
/// (`<listener prefix><tag>`) so that `status` can list the nodes listening.
pub(crate) fn listen_hosts(servers: &Servers, names: &Names, tag: &str) -> Hosts {
    let name = format!("{}{}", names.listener_application_prefix(), &tag[2..]);
    servers
        .direct
        .map(|options| options.application_name(&name))
}

/// A connection straight to a server of `hosts` that fits (not through the pool), each
/// attempt within `limit`: its error is the cause, where the pool would only report that it
/// timed out.
pub(crate) async fn directly(hosts: &Hosts, limit: Duration) -> Result<sqlx::PgConnection> {
    match hosts.connect(limit).await {
        Ok((conn, _)) => Ok(conn),
        Err(sqlx::Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
            Err(Error::Database(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to the database timed out after {limit:?}"),
            ))))
        }
        Err(e) => Err(Error::Database(e)),
    }
}
