//! Applies the versioned SQL in `migrations/` (the single source of truth for the schema).
//!
//! The files are templates: the schema and table prefix are configurable, so names are written
//! as `{{placeholders}}` and replaced with validated identifiers here. Applied versions are
//! recorded with a checksum of the template in `<prefix>sessions_migrations`; an applied
//! migration whose file has since changed is an error, never silently re-run.

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};

use super::names::Names;
use crate::error::{Error, Result};

/// One migration file, embedded at compile time.
struct Migration {
    version: i32,
    name: &'static str,
    template: &'static str,
}

/// Every migration, in order. Add new files here; never edit an applied one.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create_sessions",
        template: include_str!("../../../migrations/0001_create_sessions.sql"),
    },
    Migration {
        version: 2,
        name: "outbox_sequence",
        template: include_str!("../../../migrations/0002_outbox_sequence.sql"),
    },
    Migration {
        version: 3,
        name: "session_tokens",
        template: include_str!("../../../migrations/0003_session_tokens.sql"),
    },
    Migration {
        version: 4,
        name: "activity_groups_client",
        template: include_str!("../../../migrations/0004_activity_groups_client.sql"),
    },
    Migration {
        version: 5,
        name: "session_size_legacy_window",
        template: include_str!("../../../migrations/0005_session_size_legacy_window.sql"),
    },
];

/// Apply pending migrations, or with `apply == false` only check that none is pending.
pub(crate) async fn run(conn: &mut PgConnection, names: &Names, apply: bool) -> Result<()> {
    run_these(conn, names, apply, MIGRATIONS).await
}

/// [`run`] with `migrations` as the complete list (tests bring a database to an earlier
/// version with a prefix of [`MIGRATIONS`]).
async fn run_these(
    conn: &mut PgConnection,
    names: &Names,
    apply: bool,
    migrations: &[Migration],
) -> Result<()> {
    let mut tx = conn.begin().await?;
    // Nodes starting together queue here; the second finds the work done. One bigint key: a
    // different lock space from the two-key per-user locks of the create function.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind((i64::from(names.lock_class) << 32) | 0x6d69_6772)
        .execute(&mut *tx)
        .await?;

    let schema_exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&names.schema_raw)
            .fetch_one(&mut *tx)
            .await?;
    let table_exists: bool = schema_exists
        && sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2)",
        )
        .bind(&names.schema_raw)
        .bind(format!("{}sessions_migrations", names.prefix))
        .fetch_one(&mut *tx)
        .await?;

    let applied: Vec<(i32, String)> = if table_exists {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT version, checksum FROM {} ORDER BY version",
            names.migrations
        )))
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };

    for (version, checksum) in &applied {
        if let Some(m) = migrations.iter().find(|m| m.version == *version)
            && *checksum != checksum_of(m.template)
        {
            return Err(Error::Migration(format!(
                "migration {} ({}) was applied from a different file than the one in this \
                 build of pgsession",
                m.version, m.name
            )));
        }
    }

    let pending: Vec<&Migration> = migrations
        .iter()
        .filter(|m| !applied.iter().any(|(v, _)| *v == m.version))
        .collect();
    if pending.is_empty() {
        tx.commit().await?;
        return Ok(());
    }
    if !apply {
        return Err(Error::Migration(format!(
            "the schema in {} lacks migration(s) {:?} and run_migrations is off",
            names.schema_raw,
            pending.iter().map(|m| m.version).collect::<Vec<_>>()
        )));
    }

    if !schema_exists {
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {}", names.schema)))
            .execute(&mut *tx)
            .await?;
    }
    if !table_exists {
        sqlx::raw_sql(AssertSqlSafe(bookkeeping_table(names)))
            .execute(&mut *tx)
            .await?;
    }
    for m in pending {
        sqlx::raw_sql(AssertSqlSafe(render(m.template, names)))
            .execute(&mut *tx)
            .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (version, name, checksum) VALUES ($1, $2, $3)",
            names.migrations
        )))
        .bind(m.version)
        .bind(m.name)
        .bind(checksum_of(m.template))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The whole schema as one SQL script for `names`: what [`run`] would apply to an empty
/// database, bookkeeping rows included, in one transaction.
pub(crate) fn script(names: &Names) -> String {
    let mut sql = format!(
        "BEGIN;\nCREATE SCHEMA IF NOT EXISTS {schema};\n{table};\n",
        schema = names.schema,
        table = bookkeeping_table(names),
    );
    for m in MIGRATIONS {
        sql.push_str(&format!("\n-- migration {} ({})\n", m.version, m.name));
        sql.push_str(&render(m.template, names));
        sql.push_str(&format!(
            "\nINSERT INTO {} (version, name, checksum) VALUES ({}, '{}', '{}');\n",
            names.migrations,
            m.version,
            m.name,
            checksum_of(m.template)
        ));
    }
    sql.push_str("COMMIT;\n");
    sql
}

fn bookkeeping_table(names: &Names) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)",
        names.migrations
    )
}

/// The template with names (and the chunk size of deletion messages) filled in.
fn render(template: &str, names: &Names) -> String {
    let ids = super::sql::IDS_PER_MESSAGE.to_string();
    names.render(template, &[("ids_per_message", &ids)])
}

/// FNV-1a 64 of the template, hex: detects edits to applied files (not a security measure).
fn checksum_of(template: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in template.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn rendered_migrations_have_no_placeholders_left() {
        let names = Config {
            schema: Some("auth".into()),
            table_prefix: "app_".into(),
            ..Config::default()
        }
        .validate()
        .unwrap();
        for m in MIGRATIONS {
            let sql = render(m.template, &names);
            assert!(!sql.contains("{{"), "placeholder left in {}", m.name);
            assert!(
                sql.contains("\"auth\".\"app_sessions"),
                "{} ignores the names",
                m.name
            );
        }
    }

    #[tokio::test]
    async fn upgrading_from_version_1_numbers_the_outbox_above_every_number_handed_out() {
        let db = pgsession_testkit::TestDatabase::create().await;
        let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
        let names = Config::default().validate().unwrap();
        let mut conn = pool.acquire().await.unwrap();
        run_these(&mut conn, &names, true, &MIGRATIONS[..1])
            .await
            .unwrap();
        // Writers that are not the owner, here everyone.
        sqlx::query(AssertSqlSafe(format!(
            "GRANT INSERT, DELETE ON {} TO PUBLIC",
            names.outbox
        )))
        .execute(&pool)
        .await
        .unwrap();
        let insert = format!(
            "INSERT INTO {} (payload) VALUES ('p') RETURNING seq",
            names.outbox
        );
        let mut last = 0i64;
        for _ in 0..3 {
            last = sqlx::query_scalar(AssertSqlSafe(insert.clone()))
                .fetch_one(&pool)
                .await
                .unwrap();
        }
        // The highest number is already retired, as a node may have done; the node that
        // announced it might still hold it.
        sqlx::query(AssertSqlSafe(format!(
            "DELETE FROM {} WHERE seq = $1",
            names.outbox
        )))
        .bind(last)
        .execute(&pool)
        .await
        .unwrap();
        assert!(matches!(
            run(&mut conn, &names, false).await,
            Err(Error::Migration(msg)) if msg.contains("[2, 3, 4, 5]")
        ));

        run(&mut conn, &names, true).await.unwrap();
        let next: i64 = sqlx::query_scalar(AssertSqlSafe(insert))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(next > last, "number {next} reused after {last}");
        let (identity, owned): (String, bool) = sqlx::query_as(
            "SELECT c.is_identity, EXISTS (SELECT 1 FROM pg_depend d \
                 WHERE d.objid = 'public.sessions_outbox_seq'::regclass AND d.deptype = 'a') \
             FROM information_schema.columns c \
             WHERE c.table_name = 'sessions_outbox' AND c.column_name = 'seq'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(identity, "NO");
        assert!(owned, "the sequence would outlive its table");
        let public_usage: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM aclexplode( \
                 (SELECT relacl FROM pg_class WHERE oid = 'public.sessions_outbox_seq'::regclass)) \
                 WHERE grantee = 0 AND privilege_type = 'USAGE')",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(public_usage, "writers lost the right to number outbox rows");
        run(&mut conn, &names, false).await.unwrap();
        drop(conn);
        pool.close().await;
    }

    #[test]
    fn versions_count_up_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
    }
}
