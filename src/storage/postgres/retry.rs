//! Running a statement on a kept connection, and again when repeating it is harmless.

/// Run `$query.$method(conn)` on a kept or pooled connection (see [`super::connections`]),
/// keeping the connection for the next statement when the statement completed.
///
/// Behind a transaction-mode pooler (`Config::transaction_pooling`) a server connection is
/// only ours for one transaction: the statement runs as an unnamed prepared statement inside a
/// transaction of its own (sqlx describes and executes it in two round trips, which the pooler
/// would otherwise send to two different servers), isolation set by the transaction itself.
macro_rules! on_conn {
    ($store:expr, $query:expr, $method:ident) => {{
        let mut conn = $store.conns.acquire().await?;
        let result = if $store.transaction_pooling {
            async {
                use sqlx::Connection as _;
                let mut tx = (&mut **conn)
                    .begin_with($crate::storage::postgres::sql::BEGIN)
                    .await?;
                let out = $query.persistent(false).$method(&mut *tx).await?;
                tx.commit().await?;
                Ok(out)
            }
            .await
        } else {
            $query.$method(&mut **conn).await
        };
        conn.keep_if(&result);
        result
    }};
}
pub(crate) use on_conn;

/// Most attempts of a statement that may safely run again. A kept connection is not checked
/// before use the way the pool checks one on checkout, and after a database restart or a mass
/// `pg_terminate_backend` every idle connection is dead, the pool's included: each of them
/// fails at once, so a few attempts reach a live one.
const MOST_ATTEMPTS: usize = 12;

/// Run `statement` again (up to [`MOST_ATTEMPTS`] times) while its connection is lost or
/// PostgreSQL rolled it back to break a deadlock or a serialization conflict. Only for
/// statements that give the same outcome when run twice: reads, deletes, bulk writes. For
/// other writes, whether a lost one committed is unknown, so they report the failure instead.
/// `statement` is told which attempt it is (0 first).
pub(crate) async fn again_if_lost_or_rolled_back<T, F, Fut>(statement: F) -> Result<T, sqlx::Error>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match statement(attempt).await {
            Err(e)
                if attempt + 1 < MOST_ATTEMPTS
                    && (crate::error::is_connection_lost(&e) || is_rolled_back(&e)) =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Run `statement` again (up to [`MOST_ATTEMPTS`] times) while PostgreSQL rolls it back to
/// break a deadlock or a serialization conflict: for writes whose failure proves nothing was
/// written only in that case.
pub(crate) async fn again_if_rolled_back<T, F, Fut>(statement: F) -> Result<T, sqlx::Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match statement().await {
            Err(e) if attempt + 1 < MOST_ATTEMPTS && is_rolled_back(&e) => attempt += 1,
            other => return other,
        }
    }
}

/// Whether PostgreSQL rolled the transaction back whole to break a deadlock (40P01) or a
/// serialization conflict (40001): nothing of it was written, and it may simply run again.
fn is_rolled_back(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}
