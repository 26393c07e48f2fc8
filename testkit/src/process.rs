//! Helpers shared by the throwaway servers ([`TempPostgres`](crate::TempPostgres),
//! [`TempPgBouncer`](crate::TempPgBouncer) and [`TempRedis`](crate::TempRedis)): their OS
//! user, their private directory, ports, processes, logs and start-up.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a start may take before it is reported as failed.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Why one attempt at starting a server failed.
pub(crate) enum StartError {
    /// Another process took the port first: try another.
    PortTaken(String),
    Other(String),
}

/// What [`await_ready`] needs to know of the server it waits for.
pub(crate) struct Startup<'a> {
    /// As error messages name it ("PostgreSQL", "pgbouncer", "redis-server").
    pub name: &'a str,
    pub port: u16,
    pub pid: u32,
    pub log: &'a Path,
    /// Where this attempt's part of the log starts (errors show only that).
    pub log_from: u64,
    /// What not being ready within [`READY_TIMEOUT`] means ("did not accept connections").
    pub not_ready: &'a str,
    /// Log text that means the port was taken.
    pub port_taken: &'a str,
}

/// Wait until `ready()` (the server says it bound *our* port, and a probe that it serves);
/// when the process exits first or [`READY_TIMEOUT`] passes, `stop()` it and report why, with
/// the end of its log.
pub(crate) fn await_ready(
    s: &Startup<'_>,
    mut ready: impl FnMut() -> bool,
    stop: impl FnOnce(),
) -> Result<(), StartError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        let died = !process_alive(s.pid);
        if died || Instant::now() > deadline {
            stop();
            let tail = log_tail(s.log, s.log_from);
            let what = if died {
                "exited during startup".to_owned()
            } else {
                format!("{} within {} s", s.not_ready, READY_TIMEOUT.as_secs())
            };
            let msg = format!(
                "{} on port {} {what}; its log ({}) ends with:\n{tail}",
                s.name,
                s.port,
                s.log.display()
            );
            return Err(if died && tail.contains(s.port_taken) {
                StartError::PortTaken(msg)
            } else {
                StartError::Other(msg)
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Attempts at finding a free port: another process may take the one we picked before the
/// server binds it.
pub(crate) const PORT_ATTEMPTS: usize = 5;

/// A new, private directory `$TMPDIR/<prefix>-<uuid>` for one server, owned by the server's OS
/// user; returns the directory and its name.
pub(crate) fn make_root(
    owner: Option<(u32, u32)>,
    prefix: &str,
) -> Result<(PathBuf, String), String> {
    let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let root = std::env::temp_dir().join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&root)
        .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&root, Some(uid), Some(gid))
            .map_err(|e| remove_root(&root, format!("cannot chown {}: {e}", root.display())))?;
    }
    Ok((root, name))
}

/// Remove a server's directory on an error path, passing the error on.
pub(crate) fn remove_root(root: &Path, e: String) -> String {
    let _ = std::fs::remove_dir_all(root);
    e
}

/// The command with the server's OS user and a working directory that user may enter.
pub(crate) fn as_server_user<'a>(
    cmd: &'a mut Command,
    owner: Option<(u32, u32)>,
    dir: &Path,
) -> &'a mut Command {
    cmd.current_dir(dir).env("LC_ALL", "C");
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// `None` to run the server as ourselves; the `postgres` user's uid and gid when we are root,
/// because `initdb`, `postgres` and `pgbouncer` refuse to run as root. `program` names the
/// server in the error message.
pub(crate) fn server_user(program: &str) -> Result<Option<(u32, u32)>, String> {
    let uid = match std::fs::metadata("/proc/self") {
        Ok(meta) => meta.uid(),
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(u32::MAX),
    };
    if uid != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "running as root, but {program} refuses to run as root and there is no \
                 `postgres` OS user to run it as (create one, e.g. useradd postgres, or run the \
                 tests as a normal user)"
            )
        })
}

/// A TCP port on 127.0.0.1 that is free right now.
pub(crate) fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free TCP port on 127.0.0.1: {e}"))
}

/// Whether a real session on `database` (as user `postgres`) can be opened on 127.0.0.1:`port`:
/// startup message, then wait for ReadyForQuery.
pub(crate) fn accepts_connections(port: u16, database: &str) -> bool {
    let probe = || -> std::io::Result<bool> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut params = b"user\0postgres\0database\0".to_vec();
        params.extend_from_slice(database.as_bytes());
        params.extend_from_slice(b"\0\0");
        let mut startup = ((8 + params.len()) as u32).to_be_bytes().to_vec();
        startup.extend_from_slice(&196608u32.to_be_bytes()); // protocol 3.0
        startup.extend_from_slice(&params);
        stream.write_all(&startup)?;
        loop {
            let mut header = [0u8; 5];
            stream.read_exact(&mut header)?;
            let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            let mut body = vec![0u8; (len as usize).saturating_sub(4)];
            stream.read_exact(&mut body)?;
            match header[0] {
                b'Z' => {
                    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]); // Terminate
                    return Ok(true);
                }
                b'E' => return Ok(false), // e.g. "the database system is starting up"
                _ => {}
            }
        }
    };
    probe().unwrap_or(false)
}

/// Whether `pid` is running; a zombie counts as exited (the controller reaps it only on stop).
pub(crate) fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])),
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// The last lines of the log written after byte `from`.
pub(crate) fn log_tail(log: &Path, from: u64) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
