//! Several servers behind one URL, as libpq takes them: `postgres://u@h1:5432,h2:5432/db` or
//! `host=h1,h2 port=5432,5432 dbname=db`, with `target_session_attrs` saying which server a
//! connection must land on (a primary that fails over to a promoted replica is given this
//! way). sqlx parses one host only; [`Hosts`] holds one set of connect options per host and
//! finds, like libpq, the first that answers and fits. The pool, the listener and the announcer
//! all connect through it, so after a failover each finds the new primary by itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};

use crate::error::{Error, Result};

/// `target_session_attrs`: what a server must be for a connection to stay on it (libpq's
/// values, all supported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SessionAttrs {
    /// Any server that answers (the default).
    #[default]
    Any,
    /// One that accepts writes (`transaction_read_only` off).
    ReadWrite,
    /// One that does not (`transaction_read_only` on).
    ReadOnly,
    /// One that is not in recovery.
    Primary,
    /// One in recovery (a hot standby).
    Standby,
    /// A standby if any answers, else any server.
    PreferStandby,
}

impl SessionAttrs {
    fn parse(text: &str) -> Result<SessionAttrs> {
        Ok(match text {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "target_session_attrs {other:?}: expected any, read-write, read-only, \
                     primary, standby or prefer-standby"
                )));
            }
        })
    }
}

/// The servers of one URL and the one connections go to now.
#[derive(Debug)]
pub(crate) struct Hosts {
    list: Vec<PgConnectOptions>,
    attrs: SessionAttrs,
    /// Index of the server connections go to now.
    current: AtomicUsize,
    /// When `current` last changed.
    switched: Mutex<Instant>,
}

impl Hosts {
    /// The servers of `url` (either form), for the purpose `what` names in errors.
    pub(crate) fn parse(url: &str, what: &str) -> Result<Hosts> {
        let (list, attrs) = if url.contains("://") {
            parse_uri(url)
        } else if url.contains('=') {
            parse_key_values(url)
        } else {
            Err(format!(
                "{url:?} is neither a postgres:// URL nor key=value settings"
            ))
        }
        .map_err(|e| Error::InvalidConfig(format!("{what}: {e}")))?;
        Ok(Hosts::new(list, attrs))
    }

    /// One server, any kind.
    pub(crate) fn single(options: PgConnectOptions) -> Hosts {
        Hosts::new(vec![options], SessionAttrs::Any)
    }

    fn new(list: Vec<PgConnectOptions>, attrs: SessionAttrs) -> Hosts {
        Hosts {
            list,
            attrs,
            current: AtomicUsize::new(0),
            switched: Mutex::new(Instant::now()),
        }
    }

    /// Every server's options changed by `change` (an application name, say).
    pub(crate) fn map(&self, change: impl Fn(PgConnectOptions) -> PgConnectOptions) -> Hosts {
        Hosts {
            list: self.list.iter().cloned().map(change).collect(),
            attrs: self.attrs,
            current: AtomicUsize::new(self.current.load(Ordering::Acquire)),
            switched: Mutex::new(Instant::now()),
        }
    }

    /// Whether there is anything to choose: several servers, or a kind of server to insist on.
    pub(crate) fn choosing(&self) -> bool {
        self.list.len() > 1 || self.attrs != SessionAttrs::Any
    }

    /// The options of the server connections go to now.
    pub(crate) fn current(&self) -> PgConnectOptions {
        self.list[self.current.load(Ordering::Acquire) % self.list.len()].clone()
    }

    /// How long since connections last moved to another server.
    pub(crate) fn since_switch(&self) -> Duration {
        self.switched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    fn switch_to(&self, index: usize) -> bool {
        let before = self.current.swap(index, Ordering::AcqRel);
        if before != index {
            *self.switched.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        before != index
    }

    /// A direct connection to a server that fits, trying them as libpq does (the current one
    /// first, then the others in order), each within `timeout`; connections go to it from now
    /// on. Returns it and whether that moved them to another server. The error names every
    /// server tried and why it was passed over.
    pub(crate) async fn connect(
        &self,
        timeout: Duration,
    ) -> std::result::Result<(PgConnection, bool), sqlx::Error> {
        let n = self.list.len();
        let first = self.current.load(Ordering::Acquire) % n;
        let mut reasons = Vec::new();
        let mut timed_out = 0;
        let mut any_server = None;
        for step in 0..n {
            let index = (first + step) % n;
            let options = &self.list[index];
            let mut conn =
                match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        if n == 1 {
                            return Err(e);
                        }
                        reasons.push(format!("{}: {e}", describe(options)));
                        continue;
                    }
                    Err(_) => {
                        timed_out += 1;
                        reasons.push(format!(
                            "{}: timed out after {timeout:?}",
                            describe(options)
                        ));
                        continue;
                    }
                };
            match self.fits(&mut conn).await {
                Ok(Fit::Yes) => return Ok((conn, self.switch_to(index))),
                Ok(Fit::IfNothingBetter) if any_server.is_none() => {
                    any_server = Some(index);
                    let _ = conn.close().await;
                }
                Ok(_) => {
                    reasons.push(format!("{}: not {:?}", describe(options), self.attrs));
                    let _ = conn.close().await;
                }
                Err(e) => reasons.push(format!("{}: {e}", describe(options))),
            }
        }
        if let Some(index) = any_server {
            let conn = PgConnection::connect_with(&self.list[index]).await?;
            return Ok((conn, self.switch_to(index)));
        }
        // Only slow servers: slow, not gone (see `reachability`).
        let kind = if timed_out == n {
            std::io::ErrorKind::TimedOut
        } else {
            std::io::ErrorKind::ConnectionRefused
        };
        let message = if n == 1 {
            reasons.join("; ")
        } else {
            format!("no server fits: {}", reasons.join("; "))
        };
        Err(sqlx::Error::Io(std::io::Error::new(kind, message)))
    }

    /// Whether a connection the pool just opened fits: `Err` (which makes the pool drop it and
    /// try again) when it does not.
    pub(crate) async fn check(
        &self,
        conn: &mut PgConnection,
    ) -> std::result::Result<(), sqlx::Error> {
        match self.fits(conn).await? {
            Fit::Yes | Fit::IfNothingBetter => Ok(()),
            Fit::No => Err(sqlx::Error::Configuration(
                format!("the server is not {:?} (target_session_attrs)", self.attrs).into(),
            )),
        }
    }

    async fn fits(&self, conn: &mut PgConnection) -> std::result::Result<Fit, sqlx::Error> {
        if self.attrs == SessionAttrs::Any {
            return Ok(Fit::Yes);
        }
        let (read_only, in_recovery): (String, bool) =
            sqlx::query_as("SELECT current_setting('transaction_read_only'), pg_is_in_recovery()")
                .persistent(false)
                .fetch_one(&mut *conn)
                .await?;
        let read_only = read_only == "on";
        let yes = match self.attrs {
            SessionAttrs::Any => true,
            SessionAttrs::ReadWrite => !read_only,
            SessionAttrs::ReadOnly => read_only,
            SessionAttrs::Primary => !in_recovery,
            SessionAttrs::Standby => in_recovery,
            SessionAttrs::PreferStandby if in_recovery => true,
            SessionAttrs::PreferStandby => return Ok(Fit::IfNothingBetter),
        };
        Ok(if yes { Fit::Yes } else { Fit::No })
    }
}

enum Fit {
    Yes,
    No,
    /// Only if no server fits better (`prefer-standby` on a primary).
    IfNothingBetter,
}

/// `host:port` of a server's options, for messages.
fn describe(options: &PgConnectOptions) -> String {
    format!("{}:{}", options.get_host(), options.get_port())
}

/// `scheme://[userinfo@]host[:port][,host[:port]...][/db][?params]`: one URL per host, parsed
/// by sqlx, `target_session_attrs` taken out.
fn parse_uri(url: &str) -> std::result::Result<(Vec<PgConnectOptions>, SessionAttrs), String> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| start + i);
    let authority = &url[start..end];
    let (userinfo, hostlist) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let (path, query) = match url[end..].find('?') {
        Some(q) => (&url[end..end + q], &url[end + q + 1..]),
        None => (&url[end..], ""),
    };
    let mut attrs = SessionAttrs::Any;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => {
                attrs = SessionAttrs::parse(value).map_err(|e| e.to_string())?;
            }
            _ => kept.push(pair),
        }
    }
    let query = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    let scheme = &url[..start];
    let mut list = Vec::new();
    for host in split_hosts(hostlist) {
        let one = format!("{scheme}{userinfo}{host}{path}{query}");
        list.push(
            one.parse::<PgConnectOptions>()
                .map_err(|e| format!("{}: {e}", host))?,
        );
    }
    if list.is_empty() {
        return Err("no host".into());
    }
    Ok((list, attrs))
}

/// Hosts separated by commas, brackets of IPv6 addresses respected.
fn split_hosts(list: &str) -> Vec<&str> {
    let mut hosts = Vec::new();
    let (mut depth, mut from) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                hosts.push(&list[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    hosts.push(&list[from..]);
    hosts
}

/// libpq's key=value form (values optionally in single quotes, `\'` and `\\` escaped): the
/// settings pgsession needs; any other is refused rather than silently dropped.
fn parse_key_values(
    text: &str,
) -> std::result::Result<(Vec<PgConnectOptions>, SessionAttrs), String> {
    let pairs = key_values(text)?;
    let mut base = PgConnectOptions::new_without_pgpass();
    let (mut hosts, mut ports) = (vec!["localhost".to_owned()], Vec::new());
    let mut attrs = SessionAttrs::Any;
    for (key, value) in pairs {
        match key.as_str() {
            "host" => hosts = value.split(',').map(str::to_owned).collect(),
            "port" => {
                ports = value
                    .split(',')
                    .map(|p| p.parse::<u16>().map_err(|_| format!("port {p:?}")))
                    .collect::<std::result::Result<_, _>>()?;
            }
            "dbname" => base = base.database(&value),
            "user" => base = base.username(&value),
            "password" => base = base.password(&value),
            "application_name" => base = base.application_name(&value),
            "sslmode" => {
                base = base.ssl_mode(
                    value
                        .parse::<PgSslMode>()
                        .map_err(|e| format!("sslmode: {e}"))?,
                );
            }
            "target_session_attrs" => {
                attrs = SessionAttrs::parse(&value).map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unsupported setting {other:?}")),
        }
    }
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(format!("{} hosts but {} ports", hosts.len(), ports.len()));
    }
    let list = hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            base.clone().host(host).port(port)
        })
        .collect();
    Ok((list, attrs))
}

fn key_values(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("{key:?} has no value"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("{key:?}: unterminated quote")),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())));
        }
        out.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_with_several_hosts_gives_one_server_each() {
        let hosts = Hosts::parse(
            "postgres://u:p@h1:5433,[::1]:5434,h3/app?sslmode=disable&target_session_attrs=read-write",
            "url",
        )
        .unwrap();
        assert_eq!(hosts.attrs, SessionAttrs::ReadWrite);
        let described: Vec<String> = hosts.list.iter().map(describe).collect();
        assert_eq!(described, ["h1:5433", "[::1]:5434", "h3:5432"]);
        assert!(hosts.list.iter().all(|o| o.get_database() == Some("app")));
        assert!(hosts.choosing());
    }

    #[test]
    fn key_value_settings_give_one_server_per_host() {
        let hosts = Hosts::parse(
            "host=a,b port=1,2 dbname=app user=me password='it''s' target_session_attrs=primary",
            "url",
        );
        // A doubled quote is not libpq's escape: refused as a malformed setting.
        assert!(hosts.is_err());
        let hosts = Hosts::parse(
            "host=a,b port=1,2 dbname=app user=me password='it\\'s' target_session_attrs=primary",
            "url",
        )
        .unwrap();
        let described: Vec<String> = hosts.list.iter().map(describe).collect();
        assert_eq!(described, ["a:1", "b:2"]);
        assert_eq!(hosts.attrs, SessionAttrs::Primary);
        assert!(matches!(
            Hosts::parse("host=a sslcert=x", "url"),
            Err(Error::InvalidConfig(m)) if m.contains("sslcert")
        ));
        assert!(matches!(
            Hosts::parse("postgres://h/db?target_session_attrs=writable", "url"),
            Err(Error::InvalidConfig(_))
        ));
    }

    #[test]
    fn a_plain_url_chooses_nothing() {
        let hosts = Hosts::parse("postgres://u@h/db", "url").unwrap();
        assert!(!hosts.choosing());
    }
}
