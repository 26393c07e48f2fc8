//! `pgsession`: operate the sessions of a service from a shell (cargo feature `cli`).
//!
//! ```text
//! DATABASE_URL=postgres://... pgsession status
//! pgsession sessions --user alice --json
//! pgsession revoke --user alice
//! pgsession revoke --all --yes
//! ```
//!
//! Every failure is one line on stderr and exit status 1 (2 for a malformed command line,
//! including `revoke --all` without `--yes`: it deletes every session of the application).
//!
//! # What is printed is what is stored, made visible
//!
//! User agents, user ids, group ids and node names are written by applications and clients,
//! not by the operator, and may hold terminal escape sequences. The human (table, line) form
//! therefore shows every control character (C0 `U+0000`..`U+001F`, DEL `U+007F`, C1
//! `U+0080`..`U+009F`) escaped, as in a Rust string literal: `\xNN` (two lower-case hex
//! digits) below `U+0080`, `\u{NN}` for C1; and a backslash as `\\`, so every backslash printed
//! starts an escape. ESC is `\x1b`, CSI `\u{9b}`, a newline `\x0a`. Error messages are folded
//! onto one line, then escaped the same way. Other characters are printed as they are.
//!
//! `--json` output is JSON: serde_json escapes C0 (`\u001b`); DEL and C1, which it would write
//! raw, are written as `\u007f`..`\u009f`, so the JSON holds the same strings and no string
//! in it holds a raw control character.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use pgsession::sqlx::Connection;
use pgsession::sqlx::postgres::PgPoolOptions;
use pgsession::{Config, Error, Session, SessionEvent, SessionId, SessionManager, Status};
use serde::Serialize;

/// Operate pgsession's sessions: schema, status, revocation, cleanup, live events.
#[derive(Parser)]
#[command(name = "pgsession", version, about)]
struct Cli {
    /// The database (like sqlx-cli, from the environment by default).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,
    /// The schema holding the tables (default `public`).
    #[arg(long, global = true)]
    schema: Option<String>,
    /// The table prefix (default none).
    #[arg(long, global = true, default_value = "")]
    prefix: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations (or, with --check, only check that none is pending).
    Migrate {
        /// Change nothing; fail if the schema is not current.
        #[arg(long)]
        check: bool,
    },
    /// Print the schema as one SQL script (for your own migration tool).
    Schema,
    /// Sessions, activity, outbox backlog, listening nodes, last cleanup.
    Status,
    /// The sessions of a user (ids, never tokens).
    Sessions {
        /// The user.
        #[arg(long)]
        user: String,
    },
    /// Delete sessions: a user's, one, or all (`--all --yes`).
    Revoke(Revoke),
    /// Delete expired sessions and attributes now.
    Cleanup,
    /// Empty every node's cache.
    ClearCache,
    /// Print invalidations and events as they happen, one line each, until Ctrl-C.
    Watch,
}

#[derive(Args)]
struct Revoke {
    #[command(flatten)]
    which: Which,
    /// Confirm --all (deleting every session of the application).
    #[arg(long)]
    yes: bool,
}

/// What `revoke` deletes: exactly one of these.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// Every session of this user ("log out everywhere").
    #[arg(long)]
    user: Option<String>,
    /// One session, by its id (32 hex digits, as `sessions` lists them).
    #[arg(long)]
    session: Option<String>,
    /// Every session of the application: everybody is logged out. Needs --yes.
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version: clap prints them, to stdout, with status 0.
        Err(e) if !e.use_stderr() => e.exit(),
        // A malformed command line: clap's message (plain, without colours) on one line.
        Err(e) => {
            let message = e.render().to_string();
            return fail(message.trim_start().trim_start_matches("error:"), USAGE);
        }
    };
    if let Command::Revoke(Revoke {
        which: Which { all: true, .. },
        yes: false,
    }) = cli.command
    {
        return fail(
            "revoke --all deletes every session of the application (everybody is logged out); \
             add --yes to do it",
            USAGE,
        );
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start: {e}"), FAILED),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message, FAILED),
    }
}

/// The exit status of a failure.
const FAILED: u8 = 1;
/// The exit status of a malformed command line.
const USAGE: u8 = 2;

fn fail(message: &str, status: u8) -> ExitCode {
    // One line, whatever the error says (newlines and tabs become spaces), and no control
    // character from an echoed input.
    let line: String = message.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("pgsession: error: {}", escaped(&line));
    ExitCode::from(status)
}

/// `text` with every control character (C0, DEL, C1) escaped, `\xNN` below U+0080 and
/// `\u{NN}` above, and every backslash doubled: what the human form prints of any text it did
/// not write itself (see the module documentation).
fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c == '\\' || c.is_control()) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() && c.is_ascii() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `value` as JSON (pretty or on one line) with DEL and C1 escaped too: serde_json escapes
/// only C0. Outside strings JSON is ASCII without DEL, so these characters can only be inside
/// strings, where `\u00NN` means the same character.
fn json<T: Serialize>(value: &T, pretty: bool) -> String {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .unwrap_or_default();
    let raw = |c: char| ('\u{7f}'..='\u{9f}').contains(&c);
    if !text.contains(raw) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if raw(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

impl Cli {
    fn config(&self) -> Config {
        Config {
            schema: self.schema.clone(),
            table_prefix: self.prefix.clone(),
            // An operator's tool changes the schema only when told to (`migrate`).
            run_migrations: false,
            run_cleanup: false,
            cache_capacity: 0,
            listener_timeout: Duration::from_secs(5),
            ..Config::default()
        }
    }

    fn url(&self) -> Result<&str, String> {
        self.database_url
            .as_deref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| "no database: set DATABASE_URL or pass --database-url".to_owned())
    }

    async fn manager(&self, config: Config) -> Result<SessionManager, String> {
        SessionManager::connect(config, self.url()?)
            .await
            .map_err(describe)
    }
}

/// An error as an operator needs it.
fn describe(e: Error) -> String {
    match e {
        Error::Migration(m) => format!("{m} (run `pgsession migrate` first?)"),
        other => other.to_string(),
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = cli.config();
    match &cli.command {
        Command::Schema => {
            let sql = pgsession::schema_sql(&config).map_err(describe)?;
            print!("{sql}");
            Ok(())
        }
        Command::Migrate { check } => {
            let url = cli.url()?;
            // A direct connection first: its error names the cause ("Connection refused"),
            // where the pool would only report its timeout.
            let probe = pgsession::sqlx::postgres::PgConnection::connect(url)
                .await
                .map_err(|e| describe(e.into()))?;
            let _ = probe.close().await;
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await
                .map_err(|e| describe(e.into()))?;
            let outcome = if *check {
                pgsession::check_schema(&config, &pool).await
            } else {
                pgsession::migrate(&config, &pool).await
            };
            pool.close().await;
            outcome.map_err(describe)?;
            let verb = if *check {
                "is current"
            } else {
                "is up to date"
            };
            say(
                &cli,
                &serde_json::json!({ "ok": true, "schema": schema_name(&config) }),
                || format!("the schema {} {verb}", escaped(&schema_name(&config))),
            );
            Ok(())
        }
        Command::Status => {
            let m = cli.manager(config).await?;
            let status = m.status().await.map_err(describe);
            let _ = m.shutdown().await;
            let status = status?;
            say(&cli, &status, || status_table(&status));
            Ok(())
        }
        Command::Sessions { user } => {
            let m = cli.manager(config).await?;
            let sessions = m.list_user_sessions(user.as_str()).await.map_err(describe);
            let _ = m.shutdown().await;
            let rows: Vec<SessionRow> = sessions?.iter().map(SessionRow::from).collect();
            say(&cli, &rows, || sessions_table(&rows));
            Ok(())
        }
        Command::Revoke(revoke) => {
            let m = cli.manager(config).await?;
            let outcome = revoke_with(&m, revoke).await;
            let _ = m.shutdown().await;
            let (n, what) = outcome?;
            say(&cli, &serde_json::json!({ "revoked": n }), || {
                format!("revoked {n} session(s) {what}")
            });
            Ok(())
        }
        Command::Cleanup => {
            let m = cli.manager(config).await?;
            let n = m.cleanup_expired().await.map_err(describe);
            let _ = m.shutdown().await;
            let n = n?;
            say(&cli, &serde_json::json!({ "deleted": n }), || {
                format!("deleted {n} expired session(s)")
            });
            Ok(())
        }
        Command::ClearCache => {
            let m = cli.manager(config).await?;
            let done = m.clear_cache().await.map_err(describe);
            let _ = m.shutdown().await;
            done?;
            say(&cli, &serde_json::json!({ "cleared": true }), || {
                "every node's cache was told to empty".to_owned()
            });
            Ok(())
        }
        Command::Watch => watch(&cli, config).await,
    }
}

async fn revoke_with(m: &SessionManager, revoke: &Revoke) -> Result<(u64, String), String> {
    if let Some(user) = &revoke.which.user {
        let n = m
            .delete_all_user_sessions(user.as_str())
            .await
            .map_err(describe)?;
        return Ok((n, format!("of user \"{}\"", escaped(user))));
    }
    if let Some(id) = &revoke.which.session {
        let id: SessionId = id.parse().map_err(describe)?;
        if !m.delete_session(id).await.map_err(describe)? {
            return Err(format!("no session with id {id}"));
        }
        return Ok((1, format!("with id {id}")));
    }
    let n = m.delete_all_sessions().await.map_err(describe)?;
    Ok((n, "(all of them)".to_owned()))
}

/// Invalidations and events until Ctrl-C: a manager with a cache (so that it listens), no
/// cleanup, printing every event of every node and every change of the cache's trust.
async fn watch(cli: &Cli, config: Config) -> Result<(), String> {
    let m = cli
        .manager(Config {
            cache_capacity: 16,
            ..config
        })
        .await?;
    let mut events = m.subscribe_events();
    let mut trust = m.subscribe_cache_trust();
    m.wait_for_cache().await;
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "{}",
        line(
            cli,
            &Line::Listening {
                trusted: *trust.borrow()
            }
        )
    );
    let _ = out.flush();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            event = events.recv() => match event {
                Ok(event) => { let _ = writeln!(out, "{}", line(cli, &Line::Event(&event))); }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let _ = writeln!(out, "{}", line(cli, &Line::Lagged { lost: n }));
                }
                Err(_) => break,
            },
            changed = trust.changed() => {
                if changed.is_err() { break; }
                let trusted = *trust.borrow();
                let _ = writeln!(out, "{}", line(cli, &Line::Listening { trusted }));
            }
        }
        let _ = out.flush();
    }
    let _ = m.shutdown().await;
    Ok(())
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line<'a> {
    Listening { trusted: bool },
    Lagged { lost: u64 },
    Event(#[serde(serialize_with = "event_json")] &'a SessionEvent),
}

fn event_json<S: serde::Serializer>(e: &&SessionEvent, s: S) -> Result<S::Ok, S::Error> {
    serde_json::json!({
        "kind": format!("{:?}", e.kind),
        "origin": format!("{:?}", e.origin),
        "session_id": e.session_id.map(|id| id.to_string()),
        "previous_id": e.previous_id.map(|id| id.to_string()),
        "user_id": e.user_id.as_ref().map(|u| u.to_string()),
        "group_id": e.group_id,
        "version": e.version,
    })
    .serialize(s)
}

fn line(cli: &Cli, l: &Line<'_>) -> String {
    if cli.json {
        return json(l, false);
    }
    let now = chrono::Utc::now().format("%H:%M:%S%.3f");
    match l {
        Line::Listening { trusted: true } => format!("{now} listening; cache trusted"),
        Line::Listening { trusted: false } => format!("{now} listener down; cache distrusted"),
        Line::Lagged { lost } => format!("{now} lagged: {lost} event(s) lost"),
        Line::Event(e) => {
            let mut text = format!("{now} {:?}", e.kind);
            if let Some(id) = e.session_id {
                text.push_str(&format!(" session={id}"));
            }
            if let Some(id) = e.previous_id {
                text.push_str(&format!(" previous={id}"));
            }
            if let Some(user) = &e.user_id {
                text.push_str(&format!(" user=\"{}\"", escaped(&user.to_string())));
            }
            if let Some(group) = &e.group_id {
                text.push_str(&format!(" group=\"{}\"", escaped(group)));
            }
            if let Some(v) = e.version {
                text.push_str(&format!(" version={v}"));
            }
            text
        }
    }
}

fn say<T: Serialize>(cli: &Cli, value: &T, human: impl FnOnce() -> String) {
    if cli.json {
        println!("{}", json(value, true));
    } else {
        println!("{}", human());
    }
}

fn schema_name(config: &Config) -> String {
    format!(
        "{}.{}sessions",
        config.schema.as_deref().unwrap_or("public"),
        config.table_prefix
    )
}

#[derive(Serialize)]
struct SessionRow {
    id: String,
    created_at: String,
    last_accessed_at: String,
    expires_at: String,
    ip: Option<String>,
    user_agent: Option<String>,
    group_id: Option<String>,
    reads: u64,
    writes: u64,
}

impl From<&Session> for SessionRow {
    fn from(s: &Session) -> SessionRow {
        let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
        SessionRow {
            id: s.id().to_string(),
            created_at: time(s.created_at()),
            last_accessed_at: time(s.last_accessed_at()),
            expires_at: time(s.expires_at()),
            ip: s.ip().map(|ip| ip.to_string()),
            user_agent: s.user_agent().map(str::to_owned),
            group_id: s.group_id().map(str::to_owned),
            reads: s.reads(),
            writes: s.writes(),
        }
    }
}

/// Columns padded to their widest cell, every cell [`escaped`].
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escaped(cell).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let format_row = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![format_row(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| format_row(r.clone())));
    out.join("\n")
}

fn sessions_table(rows: &[SessionRow]) -> String {
    if rows.is_empty() {
        return "no live sessions".to_owned();
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.last_accessed_at.clone(),
                r.expires_at.clone(),
                r.ip.clone().unwrap_or_else(|| "-".into()),
                r.reads.to_string(),
                r.writes.to_string(),
                r.user_agent.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "LAST ACCESS (UTC)",
            "EXPIRES (UTC)",
            "IP",
            "READS",
            "WRITES",
            "USER AGENT",
        ],
        &cells,
    )
}

fn status_table(s: &Status) -> String {
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map_or("never".to_owned(), |t| {
            t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
        })
    };
    let mut lines = vec![
        format!(
            "schema version   {}",
            s.schema_version.map_or("-".into(), |v| v.to_string())
        ),
        format!(
            "sessions         {} ({} live, {} anonymous)",
            s.sessions, s.live, s.anonymous
        ),
        format!("active (5 min)   {}", s.active_last_5_minutes),
        format!(
            "outbox backlog   {} (oldest: {})",
            s.outbox_backlog,
            time(s.outbox_oldest)
        ),
        format!("last cleanup     {}", time(s.last_cleanup)),
        format!("listening nodes  {}", s.listening_nodes.len()),
    ];
    for node in &s.listening_nodes {
        lines.push(format!(
            "  pid {:<7} {:<22} since {}  {}",
            node.pid,
            escaped(node.client_addr.as_deref().unwrap_or("local socket")),
            time(node.connected_since),
            escaped(&node.application_name)
        ));
    }
    lines.join("\n")
}
