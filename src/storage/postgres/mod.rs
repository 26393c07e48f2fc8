//! Sessions in PostgreSQL: [`PgStorage`], the [`Storage`](super::Storage) over one pool (its
//! operations in `operations.rs`), the statements (`sql.rs`, all SQL in one place), row
//! decoding, retries, the connections kept between statements, the server's reachability, and
//! the migrations that create the schema (whose single source is `migrations/`).
//!
//! This layer only stores: every write returns the announcement its statement committed, and
//! the coherence layer (`crate::coherence`) makes other nodes hear it.

pub(crate) mod connect;
pub(crate) mod connections;
pub(crate) mod hosts;
pub(crate) mod migrate;
pub(crate) mod names;
mod operations;
pub(crate) mod reachability;
mod retry;
mod rows;
pub(crate) mod sql;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgConnection, PgExecutor, PgPool, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use self::connections::Connections;
use self::hosts::Hosts;
use self::names::Names;
use self::reachability::Reachability;
use self::retry::on_conn;
use self::sql::Sql;
use crate::error::Result;
use crate::model::record::Record;

/// Sessions in PostgreSQL: a pool, the connections kept from it, the rendered statements.
pub(crate) struct PgStorage {
    pool: PgPool,
    /// Connections kept between statements (every statement but the resynchronisation's).
    conns: Connections,
    sql: Sql,
    /// Rows left out of listings because they could not be decoded.
    unreadable: AtomicU64,
    /// What the application names of this table's listeners start with (for `status`).
    listener_prefix: String,
    /// The pool goes through a transaction-mode pooler (`Config::transaction_pooling`).
    transaction_pooling: bool,
    /// Where connections that must reach the server itself connect (`listen_url`'s servers, or
    /// the pool's): the announcer's.
    direct: Arc<Hosts>,
}

impl PgStorage {
    /// Storage on `pool` for the tables of `names`; `tag` ends every invalidation this node
    /// sends (see `crate::coherence::protocol`), and `reach` tells when the server is gone.
    pub(crate) fn new(
        pool: PgPool,
        names: &Names,
        tag: &str,
        reach: Arc<Reachability>,
        direct: Arc<Hosts>,
        transaction_pooling: bool,
    ) -> Self {
        PgStorage {
            transaction_pooling,
            direct,
            conns: Connections::new(pool.clone()).with_reachability(reach),
            sql: Sql::new(names, tag),
            unreadable: AtomicU64::new(0),
            listener_prefix: names.listener_application_prefix(),
            pool,
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The servers a connection to the server itself goes to, not through a pooler.
    pub(crate) fn direct_hosts(&self) -> &Arc<Hosts> {
        &self.direct
    }

    /// The kept connections (see [`connections`]).
    pub(crate) fn connections(&self) -> &Connections {
        &self.conns
    }

    /// The rows that decode; the others are skipped, logged and counted: a value written by
    /// hand that PostgreSQL stores but cannot be read back (a number beyond `f64`) must not fail
    /// a whole listing.
    fn readable(&self, rows: &[PgRow]) -> Vec<Record> {
        rows.iter()
            .filter_map(|row| match rows::record(row) {
                Ok(record) => Some(record),
                Err(error) => {
                    self.unreadable.fetch_add(1, Ordering::Relaxed);
                    let id: Option<Uuid> = row.try_get("id").ok();
                    tracing::warn!(
                        session.id = %id.map(|id| id.simple().to_string()).unwrap_or_default(),
                        %error,
                        "pgsession: a stored session cannot be read and was left out of a listing"
                    );
                    None
                }
            })
            .collect()
    }

    // What only the coherence layer needs of PostgreSQL: announcing, resynchronising, clears.

    /// Send queued invalidations (`messages`, each under 8000 bytes), on `conn` (the
    /// announcer's own connection) or, without one, on a pooled connection.
    pub(crate) async fn announce(
        &self,
        conn: Option<&mut PgConnection>,
        messages: &[String],
    ) -> Result<()> {
        let query = sqlx::query(AssertSqlSafe(self.sql.announce.clone())).bind(messages);
        self.execute_on(conn, query).await
    }

    /// Delete outbox rows that have been announced, like [`announce`](Self::announce).
    pub(crate) async fn retire(&self, conn: Option<&mut PgConnection>, seqs: &[i64]) -> Result<()> {
        let query = sqlx::query(AssertSqlSafe(self.sql.retire.clone())).bind(seqs);
        self.execute_on(conn, query).await
    }

    /// Run `query` on `conn`, or on a pooled connection without one.
    async fn execute_on(
        &self,
        conn: Option<&mut PgConnection>,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<()> {
        match conn {
            Some(conn) => query.execute(conn).await?,
            None => on_conn!(self, query, execute)?,
        };
        Ok(())
    }

    /// Announce outbox rows older than `grace`; returns how many.
    pub(crate) async fn sweep_outbox(&self, grace: std::time::Duration) -> Result<u64> {
        let (swept, _messages): (i64, i64) = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.sweep.clone())).bind(grace.as_secs_f64()),
            fetch_one
        )?;
        Ok(swept as u64)
    }

    /// Current versions of the given sessions (absent ones are missing from the result).
    ///
    /// Resynchronisation runs this and [`cache_epoch`](Self::cache_epoch) on the listener's
    /// own connection: while the cache is distrusted every read goes to the database, and the
    /// pool may have no connection to spare.
    pub(crate) async fn versions<'e>(
        &self,
        conn: impl PgExecutor<'e>,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, i64)>> {
        Ok(sqlx::query_as(AssertSqlSafe(self.sql.versions.clone()))
            .bind(ids)
            .fetch_all(conn)
            .await?)
    }

    /// The number of cache clears so far, and when the server started (microseconds since
    /// 1970), which tells one server incarnation from another.
    pub(crate) async fn cache_epoch<'e>(&self, conn: impl PgExecutor<'e>) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(AssertSqlSafe(self.sql.epoch.clone()))
            .fetch_one(conn)
            .await?)
    }

    /// Tell every node to empty its cache; returns the new cache epoch.
    pub(crate) async fn broadcast_clear(&self) -> Result<i64> {
        let (epoch, _): (i64, Option<String>) = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.clear.clone())),
            fetch_one
        )?;
        Ok(epoch)
    }

    /// Delete every session; how many, and the new cache epoch (a clear as well, so that a
    /// node that misses the message empties its cache when it reconnects).
    pub(crate) async fn delete_all_sessions(&self) -> Result<(u64, i64)> {
        let (n, epoch, _): (i64, i64, Option<String>) =
            retry::again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query_as(AssertSqlSafe(self.sql.delete_all.clone())),
                    fetch_one
                )
            })
            .await?;
        Ok((n as u64, epoch))
    }

    // What the manager checks once, at start-up.

    /// Until when sessions converted by migration 3 (opened by legacy tokens) may be alive.
    pub(crate) async fn legacy_until(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(on_conn!(
            self,
            sqlx::query_scalar(AssertSqlSafe(self.sql.legacy_until.clone())),
            fetch_one
        )?)
    }

    /// The isolation level the pool's connections start transactions with.
    pub(crate) async fn default_isolation(&self) -> Result<String> {
        Ok(on_conn!(
            self,
            sqlx::query_scalar(sql::DEFAULT_ISOLATION),
            fetch_one
        )?)
    }
}
