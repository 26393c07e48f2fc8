//! The one error type of the crate.

/// Everything that can go wrong in pgsession.
///
/// Variants are stable and meant to be matched on: input errors (`AttributeTooLarge`,
/// `SessionTooLarge`, `InvalidAttribute`, `AttributeType`, `InvalidConfig`, `InvalidToken`, `InvalidSessionId`,
/// `InvalidUserId`) are the caller's to fix and nothing was
/// written when they are returned; `NotFound` and `MaxSessionsReached` are outcomes a web handler
/// maps to a response; `Database` is infrastructure (see [`Error::is_transient`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// One attribute's JSON encoding is larger than [`Config::max_attribute_size`](crate::Config).
    #[error("attribute {key:?} is {size} bytes as JSON, over the limit of {limit} bytes")]
    AttributeTooLarge {
        /// The attribute's key.
        key: String,
        /// Size of the attribute's JSON encoding, in bytes.
        size: usize,
        /// The configured limit, in bytes.
        limit: usize,
    },

    /// A create or update would make the session's attributes larger than
    /// [`Config::max_session_size`](crate::Config::max_session_size): measured on the merged
    /// result, so other writers' keys count. Nothing was written.
    #[error("the session's attributes would be {size} bytes, over the limit of {limit} bytes")]
    SessionTooLarge {
        /// Size the attributes would have had, in bytes (see `Config::max_session_size`).
        size: usize,
        /// The configured limit, in bytes.
        limit: usize,
    },

    /// An attribute PostgreSQL's `jsonb` cannot store (a `\u0000` in a string or key), one that
    /// could not be read back (nested too deeply), or a value that failed to serialize.
    #[error("attribute {key:?} is invalid: {reason}")]
    InvalidAttribute {
        /// The attribute's key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },

    /// [`Session::get_as`](crate::Session::get_as) found the attribute but it does not
    /// deserialize into the requested type.
    #[error("attribute {key:?} does not have the requested type: {source}")]
    AttributeType {
        /// The attribute's key.
        key: String,
        /// The deserialization error.
        #[source]
        source: serde_json::Error,
    },

    /// [`Session::set_expires_at`](crate::Session::set_expires_at) was given an instant outside
    /// the years 1970 to 9999.
    #[error("expiry {expires_at} is out of range (years 1970 to 9999)")]
    InvalidExpiry {
        /// The rejected instant.
        expires_at: chrono::DateTime<chrono::Utc>,
    },

    /// Text that is not a session token (for [`SessionToken`](crate::SessionToken)'s
    /// `FromStr`). [`SessionManager::get_session`](crate::SessionManager::get_session) never
    /// returns it: a bad token there is simply no session.
    #[error("invalid session token: {0}")]
    InvalidToken(String),

    /// Text that is not a session id (for [`SessionId`](crate::SessionId)'s `FromStr`).
    #[error("invalid session id: {0}")]
    InvalidSessionId(String),

    /// A user id that cannot be stored: empty, longer than 256 bytes, or containing NUL.
    #[error("{0}")]
    InvalidUserId(String),

    /// A group id that cannot be stored: empty, longer than 256 bytes, or containing NUL.
    #[error("{0}")]
    InvalidGroupId(String),

    /// The session does not exist (any more): deleted, expired, or never created. Updates of a
    /// deleted session return this; they never recreate it.
    #[error("session not found or expired")]
    NotFound,

    /// [`SessionManager::update_session_if_unchanged`](crate::SessionManager::update_session_if_unchanged):
    /// another write committed since the session was read. Nothing was written; re-read the
    /// session (now at `current_version`) and decide again.
    #[error("the session changed since it was read (now at version {current_version})")]
    Conflict {
        /// The session's version in the database now.
        current_version: i64,
    },

    /// A session with the id the caller chose exists already (stores whose callers pick ids,
    /// such as the tower-sessions store, pick another). Nothing was written.
    #[error("a session with this id exists already")]
    AlreadyExists,

    /// The user already has `max_sessions_per_user` live sessions and the policy is
    /// [`MaxSessionsPolicy::Reject`](crate::MaxSessionsPolicy::Reject).
    #[error("the user already has the maximum number of sessions")]
    MaxSessionsReached,

    /// The configuration is unusable; the message says which field and why.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The database schema is not what this version of pgsession expects (a migration recorded
    /// in the database differs from the one shipped, or migrations are off and the schema is
    /// missing).
    #[error("schema migration problem: {0}")]
    Migration(String),

    /// [`SessionManager::shutdown`](crate::SessionManager::shutdown) has been called (or the
    /// pool given to [`SessionManager::new`](crate::SessionManager::new) was closed).
    #[error("the session manager has been shut down")]
    ShutDown,

    /// An operation did not finish in time (for example background tasks at shutdown).
    #[error("timed out: {0}")]
    Timeout(String),

    /// The database failed or could not be reached. The message includes the cause (for
    /// example "Connection refused").
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for Error {
    /// A closed pool means this manager is shutting down (or its owner closed the pool it was
    /// given): [`Error::ShutDown`], never a database failure.
    fn from(e: sqlx::Error) -> Error {
        match e {
            sqlx::Error::PoolClosed => Error::ShutDown,
            e => Error::Database(e),
        }
    }
}

impl Error {
    /// True for failures that may succeed when retried later: lost connections, pool timeouts,
    /// a database that is restarting, serialization failures and deadlocks.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database(e) => is_transient_db(e),
            _ => false,
        }
    }
}

/// Whether a database error is about the connection or a retryable conflict rather than about
/// the statement itself.
pub(crate) fn is_transient_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception, 57P: operator intervention (shutdown, terminate),
            // 40001/40P01: serialization failure / deadlock, 53: insufficient resources,
            // 25006: a write on a server that became read-only (a failover under way).
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
                || code == "25006"
        }),
        _ => false,
    }
}

/// Whether the error means the connection itself is gone, so the same idempotent read may be
/// retried once on another connection.
pub(crate) fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        // Refused before anything was sent: the server is known to be gone.
        e if crate::storage::postgres::reachability::is_unreachable(e) => false,
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => {
            // FATAL and PANIC end the session whatever the code.
            let fatal = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|pg| {
                    matches!(
                        pg.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                });
            fatal
                || db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
        }
        _ => false,
    }
}

/// Whether the statement ran on a server that does not take writes any more (SQLSTATE 25006:
/// a primary demoted, or a connection made to a standby): the connection is on the wrong
/// server, and connections should move.
pub(crate) fn is_wrong_server(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("25006"))
}

/// Whether a failed write certainly did not commit: it never got a connection, or the database
/// rejected the statement itself (the transaction was rolled back). Anything else, a lost
/// connection above all, leaves the outcome unknown.
pub(crate) fn proves_nothing_written(e: &sqlx::Error) -> bool {
    match e {
        e if crate::storage::postgres::reachability::is_unreachable(e) => true,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(_) => !is_connection_lost(e),
        _ => false,
    }
}

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
