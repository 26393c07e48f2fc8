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
    assert_eq!(applied, migration_count());
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
    assert!(
        status.contains(&format!("schema version   {}", migration_count())),
        "{status}"
    );
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
    let out = assert_ok(&pgsession(db.url(), &["revoke", "--all", "--yes"]));
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
    // A malformed command line is clap's: exit status 2, and one line too.
    let o = pgsession(db.url(), &["revoke"]);
    assert_eq!(o.status.code(), Some(2));
    assert_fails(&o, "--all");
}

/// What an application stored, shown by the human form with its control characters escaped.
const EVIL_AGENT: &str = "evil\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m";
const EVIL_AGENT_SHOWN: &str = r"evil\x1b[2J\x1b]0;pwned\x07\u{9b}31m";
const EVIL_USER: &str = "bob\u{1b}[31m";
const EVIL_USER_SHOWN: &str = r"bob\x1b[31m";

/// No ESC, BEL, DEL or C1 character (U+009B is CSI on terminals that read C1 as 8-bit codes).
fn assert_no_raw_controls(out: &[u8]) {
    let text = String::from_utf8(out.to_vec()).expect("UTF-8");
    let raw: Vec<char> = text
        .chars()
        .filter(|&c| c.is_control() && c != '\n')
        .collect();
    assert!(raw.is_empty(), "raw control characters {raw:?} in {text:?}");
    assert!(!out.contains(&0x1b) && !out.contains(&0x07));
    assert!(!out.windows(2).any(|w| w == [0xc2, 0x9b]), "{text:?}");
}

#[tokio::test]
async fn sessions_lists_user_agents_and_user_ids_with_control_characters_escaped() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    let (alice, _) = m
        .create_session_with(
            SessionOptions::new().user("alice").user_agent(EVIL_AGENT),
            [("k", 1)],
        )
        .await
        .unwrap();
    let (bob, _) = m
        .create_session_with(
            SessionOptions::new()
                .user(EVIL_USER)
                .group("acme\u{7f}\u{85}")
                .user_agent(r"C:\agent"),
            [("k", 1)],
        )
        .await
        .unwrap();

    let o = pgsession(db.url(), &["sessions", "--user", "alice"]);
    let table = assert_ok(&o);
    assert_no_raw_controls(&o.stdout);
    assert!(table.contains(&alice.id().to_string()), "{table}");
    assert!(table.contains(EVIL_AGENT_SHOWN), "{table}");
    let o = pgsession(db.url(), &["sessions", "--user", EVIL_USER]);
    let table = assert_ok(&o);
    assert_no_raw_controls(&o.stdout);
    assert!(table.contains(&bob.id().to_string()), "{table}");
    assert!(
        table.contains(r"C:\\agent"),
        "a backslash is doubled: {table}"
    );

    // JSON: the same strings, without a raw control character (DEL and C1 included).
    for (user, agent, group) in [
        ("alice", EVIL_AGENT, None),
        (EVIL_USER, r"C:\agent", Some("acme\u{7f}\u{85}")),
    ] {
        let o = pgsession(db.url(), &["sessions", "--user", user, "--json"]);
        let out = assert_ok(&o);
        assert_no_raw_controls(&o.stdout);
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json[0]["user_agent"], agent, "{out}");
        assert_eq!(json[0]["group_id"].as_str(), group, "{out}");
    }
    let out = assert_ok(&pgsession(
        db.url(),
        &["sessions", "--user", "alice", "--json"],
    ));
    assert!(
        out.contains(r"\u001b[2J") && out.contains(r"\u009b31m"),
        "{out}"
    );

    // The user id echoed by revoke.
    let o = pgsession(db.url(), &["revoke", "--user", EVIL_USER]);
    let out = assert_ok(&o);
    assert_no_raw_controls(&o.stdout);
    assert!(
        out.contains(&format!(
            "revoked 1 session(s) of user \"{EVIL_USER_SHOWN}\""
        )),
        "{out}"
    );
}

#[tokio::test]
async fn errors_echoing_the_command_line_escape_its_control_characters() {
    let o = pgsession("postgres://unused", &["sessions", "--usr\u{1b}[2J\u{9b}"]);
    assert_eq!(o.status.code(), Some(2));
    assert_no_raw_controls(&o.stderr);
    // (clap drops the complete escape sequence; the lone C1 character is left to us.)
    assert_fails(&o, r"unexpected argument '--usr\u{9b}'");
}

#[tokio::test]
async fn watch_shows_user_and_group_ids_with_control_characters_escaped() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    m.create_session_with(
        SessionOptions::new().user(EVIL_USER).group("acme\u{9b}"),
        [("k", 1)],
    )
    .await
    .unwrap();
    m.create_session_with(SessionOptions::new().group("acme\u{9b}"), [("k", 1)])
        .await
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgsession"))
        .arg("watch")
        .env("DATABASE_URL", db.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut out = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match out.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if tx.send(line).is_err() => break,
                Ok(_) => {}
            }
        }
    });
    let mut next = async || {
        let line = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("a line")
            .unwrap();
        assert_no_raw_controls(&line);
        String::from_utf8(line).unwrap()
    };
    let first = next().await;
    assert!(first.contains("listening; cache trusted"), "{first}");

    m.delete_all_user_sessions(EVIL_USER).await.unwrap();
    m.delete_group_sessions("acme\u{9b}").await.unwrap();
    let user_line = format!("UserLoggedOutEverywhere user=\"{EVIL_USER_SHOWN}\"");
    let group_line = r#"GroupDeleted group="acme\u{9b}""#;
    let (mut user_seen, mut group_seen) = (false, false);
    while !(user_seen && group_seen) {
        let line = next().await;
        user_seen |= line.contains(&user_line);
        group_seen |= line.contains(group_line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn revoke_all_deletes_nothing_without_yes() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    let (s, _) = m.create_session("alice", [("k", 1)]).await.unwrap();

    let o = pgsession(db.url(), &["revoke", "--all"]);
    assert_eq!(o.status.code(), Some(2), "a usage error: {o:?}");
    assert_fails(&o, "deletes every session of the application");
    assert_fails(&o, "add --yes");
    assert_eq!(count_rows(&pool(&db).await).await, 1);
    assert_eq!(m.list_user_sessions("alice").await.unwrap()[0].id(), s.id());
    // Nor with --json, which changes only how a success is printed.
    assert_fails(
        &pgsession(db.url(), &["revoke", "--all", "--json"]),
        "add --yes",
    );
    assert_eq!(count_rows(&pool(&db).await).await, 1);

    let out = assert_ok(&pgsession(
        db.url(),
        &["revoke", "--all", "--yes", "--json"],
    ));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["revoked"],
        1
    );
    assert_eq!(count_rows(&pool(&db).await).await, 0);
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
