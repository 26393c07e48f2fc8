//! The `pgsession` admin command, run as a binary against a real database: every command, its
//! JSON, and every failure as one line with a non-zero exit.
#![cfg(feature = "cli")]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use pgsession::SessionOptions;

fn pgsession(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgsession"))
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure: non-zero exit, nothing on stdout, one line on stderr containing `what`.
fn assert_fails(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure, got {o:?}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("pgsession: error: "), "{err:?}");
    assert!(err.contains(what), "{err:?} should mention {what:?}");
    assert!(o.stdout.is_empty(), "{:?}", stdout(o));
}

fn assert_ok(o: &Output) -> String {
    assert!(o.status.success(), "{o:?}");
    stdout(o)
}

#[tokio::test]
async fn migrate_check_and_schema() {
    let db = TestDatabase::create().await;
    // Nothing there yet: the check fails, and so does every command that needs the schema.
    assert_fails(
        &pgsession(db.url(), &["migrate", "--check"]),
        "lacks migration",
    );
    assert_fails(&pgsession(db.url(), &["status"]), "pgsession migrate");
    let out = assert_ok(&pgsession(db.url(), &["migrate"]));
    assert!(out.contains("public.sessions is up to date"), "{out}");
    let out = assert_ok(&pgsession(db.url(), &["migrate", "--check"]));
    assert!(out.contains("is current"), "{out}");
    // A custom schema and prefix.
    assert_ok(&pgsession(
        db.url(),
        &["migrate", "--schema", "auth", "--prefix", "app_"],
    ));
    let check = pool(&db).await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.app_sessions_migrations")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(applied, 4);
    let sql = assert_ok(&pgsession(db.url(), &["schema", "--schema", "x"]));
    assert!(sql.contains("CREATE TABLE \"x\".\"sessions\""), "{sql}");
    assert!(sql.trim_end().ends_with("COMMIT;"));
}

#[tokio::test]
async fn status_sessions_revoke_cleanup_and_clear_cache() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    let (a, _) = m
        .create_session_with(
            SessionOptions::new()
                .user("alice")
                .ip("192.0.2.1".parse().unwrap())
                .user_agent("Firefox/140"),
            [("k", 1)],
        )
        .await
        .unwrap();
    let (_, alice2) = m.create_session("alice", [("k", 2)]).await.unwrap();
    m.create_anonymous_session([("cart", 1)]).await.unwrap();
    let (bob, _) = m.create_session("bob", [("k", 1)]).await.unwrap();

    let status = assert_ok(&pgsession(db.url(), &["status"]));
    assert!(status.contains("schema version   4"), "{status}");
    assert!(
        status.contains("sessions         4 (4 live, 1 anonymous)"),
        "{status}"
    );
    assert!(status.contains("listening nodes  1"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&assert_ok(&pgsession(db.url(), &["status", "--json"]))).unwrap();
    assert_eq!(json["sessions"], 4);
    assert_eq!(json["listening_nodes"].as_array().unwrap().len(), 1);
    assert!(json["last_cleanup"].is_null());

    let listed = assert_ok(&pgsession(db.url(), &["sessions", "--user", "alice"]));
    assert!(
        listed.contains(&a.id().to_string()) && listed.contains("192.0.2.1"),
        "{listed}"
    );
    assert!(listed.contains("Firefox/140"));
    assert!(
        !listed.contains(&alice2.to_string()),
        "no token is ever printed"
    );
    let json: serde_json::Value = serde_json::from_str(&assert_ok(&pgsession(
        db.url(),
        &["sessions", "--user", "alice", "--json"],
    )))
    .unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    let out = assert_ok(&pgsession(
        db.url(),
        &["revoke", "--session", &bob.id().to_string()],
    ));
    assert!(out.contains("revoked 1 session(s)"), "{out}");
    assert!(m.list_user_sessions("bob").await.unwrap().is_empty());
    assert_fails(
        &pgsession(db.url(), &["revoke", "--session", &bob.id().to_string()]),
        "no session with id",
    );
    assert_fails(
        &pgsession(db.url(), &["revoke", "--session", "nothex"]),
        "32 hexadecimal",
    );
    let out = assert_ok(&pgsession(db.url(), &["revoke", "--user", "alice"]));
    assert!(
        out.contains("revoked 2 session(s) of user \"alice\""),
        "{out}"
    );

    let out = assert_ok(&pgsession(db.url(), &["cleanup", "--json"]));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["deleted"],
        0
    );
    let json: serde_json::Value =
        serde_json::from_str(&assert_ok(&pgsession(db.url(), &["status", "--json"]))).unwrap();
    assert!(json["last_cleanup"].is_string(), "cleanup recorded: {json}");

    assert!(
        m.stats().entries >= 1,
        "the node caches a session the clear must drop"
    );
    assert_ok(&pgsession(db.url(), &["clear-cache"]));
    eventually(Duration::from_secs(5), "the node hears the clear", || {
        let seen = m.stats().entries == 0;
        async move { seen }
    })
    .await;
    let out = assert_ok(&pgsession(db.url(), &["revoke", "--all"]));
    assert!(out.contains("revoked 1 session(s) (all of them)"), "{out}");
    assert_eq!(count_rows(&pool(&db).await).await, 0);
}

#[tokio::test]
async fn every_failure_is_one_line_and_a_non_zero_exit() {
    // A URL that does not parse.
    assert_fails(&pgsession("not a url", &["status"]), "database URL");
    // A server that is not there (port 1 refuses).
    assert_fails(
        &pgsession("postgres://postgres@127.0.0.1:1/postgres", &["status"]),
        "database error",
    );
    assert_fails(
        &pgsession("postgres://postgres@127.0.0.1:1/postgres", &["migrate"]),
        "error",
    );
    // No database configured at all.
    let o = Command::new(env!("CARGO_BIN_EXE_pgsession"))
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_fails(&o, "DATABASE_URL");
    // A bad schema name.
    let db = TestDatabase::create().await;
    assert_fails(
        &pgsession(db.url(), &["status", "--schema", "Bad-Name"]),
        "schema",
    );
    // A malformed command line is clap's: exit status 2.
    let o = pgsession(db.url(), &["revoke"]);
    assert_eq!(o.status.code(), Some(2));
}

#[tokio::test]
async fn watch_prints_other_nodes_events_as_they_happen() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsession"))
        .args(["watch", "--json"])
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("watch starts")
        .unwrap();
    assert!(first.contains("\"trusted\":true"), "{first}");

    let (mut s, _) = m.create_session("alice", [("k", 1)]).await.unwrap();
    s.set("k", 2).unwrap();
    m.update_session(&mut s).await.unwrap();
    m.delete_all_user_sessions("alice").await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event line")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["origin"], "OtherNode");
        kinds.push(v["kind"].as_str().unwrap().to_owned());
        if v["kind"] == "Updated" {
            assert_eq!(v["session_id"], s.id().to_string());
        }
    }
    // Bulk writes notify at their commit, single-session writes just after theirs: the two
    // may arrive either way round.
    kinds.sort();
    assert_eq!(kinds, ["Updated", "UserLoggedOutEverywhere"]);
    child.kill().unwrap();
    child.wait().unwrap();
}
