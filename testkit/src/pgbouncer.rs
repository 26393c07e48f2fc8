use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{
    PORT_ATTEMPTS, StartError, Startup, accepts_connections, as_server_user, await_ready,
    free_port, log_tail, make_root, remove_root, server_user,
};
use crate::redact;
use crate::server::find_bindir;

/// How long [`TempPgBouncer::kill_server_connections`] waits for pgbouncer to notice.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The controller that owns the pgbouncer process, on the same plan as
/// [`TempPostgres`](crate::TempPostgres)'s: it runs as pgbouncer's OS user, and its stdin is a
/// pipe whose only writer is this process, so when this process dies in any way `read` sees EOF
/// and the controller stops pgbouncer and removes the directory. `$1` is the directory to
/// remove, `$2` the file for pgbouncer's stdout and stderr, the rest the pgbouncer command.
///
/// pgbouncer 1.18 exits at once on SIGTERM; later versions wait for their clients to leave, so
/// SIGKILL follows after 5 s (pgbouncer keeps nothing that needs a clean shutdown).
const CONTROLLER: &str = r#"
exec 2>>"$2"
trap '' PIPE
dir=$1 log=$2
shift 2
pid=
halt() {
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    n=0
    while [ "$n" -lt 100 ] && read -r _pid _comm state _rest <"/proc/$pid/stat" \
        && [ "$state" != Z ]; do
        sleep 0.05
        n=$((n + 1))
    done 2>/dev/null
    kill -KILL "$pid" 2>/dev/null
    wait "$pid"
    pid=
}
while read -r cmd; do
    case $cmd in
        start) halt; "$@" </dev/null >>"$log" 2>&1 & pid=$!; echo "$pid" ;;
        stop) halt; echo stopped ;;
    esac
done
halt
rm -rf "$dir"
"#;

/// A private, throwaway pgbouncer (Debian's `pgbouncer` package, 1.18) in **transaction**
/// pooling mode in front of a PostgreSQL server.
///
/// It listens on 127.0.0.1 (a free port, never the system pgbouncer's 6432; no Unix socket),
/// serves any database name from the upstream server, trusts the user `postgres` (also its admin
/// user), ignores the `extra_float_digits` startup parameter and no other, and runs no
/// `server_reset_query`. Dropping it stops pgbouncer and deletes its directory; if the process
/// ends without running destructors, a watchdog does the same.
///
/// pgbouncer 1.18 in transaction mode does not keep named prepared statements across
/// transactions: query through it with `sqlx::raw_sql`, or with `.persistent(false)` inside a
/// transaction.
pub struct TempPgBouncer {
    root: PathBuf,
    port: u16,
    controller: Controller,
}

struct Controller {
    child: Child,
    /// `None` once the controller has been told to shut down for good.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

/// Why a start attempt failed: only a lost port race is worth retrying.
impl TempPgBouncer {
    /// Start pgbouncer in front of the PostgreSQL server at `upstream` (e.g.
    /// [`TempPostgres::addr`](crate::TempPostgres::addr), or a
    /// [`FaultProxy`](crate::FaultProxy) in front of it). The upstream is only connected to
    /// when clients come, so it need not be up yet.
    ///
    /// Blocks until pgbouncer accepts connections (its admin console answers); it does not need
    /// or use a tokio runtime.
    pub fn start(upstream: SocketAddr) -> Result<TempPgBouncer, String> {
        let bin = find_pgbouncer()?;
        let owner = server_user("pgbouncer")?;
        let (root, _) = make_root(owner, "pgsession-testkit-pgbouncer")?;
        let console = root.join("console.log");
        let config = root.join("pgbouncer.ini");
        let auth_file = root.join("users.txt");
        write_file(&auth_file, "\"postgres\" \"\"\n", owner).map_err(|e| remove_root(&root, e))?;

        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(CONTROLLER)
            .arg("pgsession-testkit-pgbouncer-controller")
            .arg(&root)
            .arg(&console)
            .arg(&bin)
            .arg(&config);
        sh.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Keeps a Ctrl-C meant for the test run from killing the controller before it can
            // clean up; the closed pipe is what tells it to stop.
            .process_group(0);
        let mut child = as_server_user(&mut sh, owner, &root)
            .spawn()
            .map_err(|e| remove_root(&root, format!("cannot run sh: {e}")))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(remove_root(
                &root,
                "the controller has no stdout".to_owned(),
            ));
        };
        let mut controller = Controller {
            stdin: child.stdin.take(),
            stdout: BufReader::new(stdout),
            child,
        };

        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = match free_port() {
                Ok(port) => port,
                Err(e) => {
                    last_error = e;
                    break;
                }
            };
            let text = config_text(&root, &auth_file, port, upstream);
            if let Err(e) = write_file(&config, &text, owner) {
                last_error = e;
                break;
            }
            match controller.start(port, &console) {
                Ok(()) => {
                    return Ok(TempPgBouncer {
                        root,
                        port,
                        controller,
                    });
                }
                Err(StartError::PortTaken(e)) => last_error = e,
                Err(StartError::Other(e)) => {
                    last_error = e;
                    break;
                }
            }
        }
        controller.shut_down();
        Err(remove_root(&root, last_error))
    }

    /// `postgres://postgres@127.0.0.1:PORT/<dbname>`: `dbname` on the upstream server, through
    /// pgbouncer.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The TCP port pgbouncer listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// pgbouncer's private directory (configuration, auth file, `pgbouncer.log`, pid file),
    /// removed on drop.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Run `command` on pgbouncer's admin console (database `pgbouncer`), e.g. `SHOW SERVERS`,
    /// `RECONNECT`, `KILL <db>`, with `psql`; returns what psql printed (unaligned, rows only,
    /// fields separated by `|`), without the final newline.
    pub fn admin(&self, command: &str) -> Result<String, String> {
        self.psql_admin(command, &["-t"])
    }

    /// Terminate (with `pg_terminate_backend`, through a direct connection to `upstream_url`, a
    /// superuser URL of the upstream server) every server connection pgbouncer holds, idle or
    /// in use; returns how many were terminated. A client in the middle of a transaction loses
    /// its connection; idle clients get a new server connection with their next transaction.
    ///
    /// The backends are those whose pid pgbouncer's `SHOW SERVERS` reports as `remote_pid` (the
    /// pid from the server's BackendKeyData, so this also works through a proxy), and whose
    /// database and user are the ones pgbouncer reports; no other backend is touched (nor a
    /// server connection still logging in, which has no pid yet). Returns once pgbouncer no
    /// longer lists them (an error after 10 s).
    pub fn kill_server_connections(&self, upstream_url: &str) -> Result<usize, String> {
        let servers: Vec<(u32, String, String)> = self
            .show("SHOW SERVERS")?
            .into_iter()
            .filter_map(|row| {
                let pid = row.get("remote_pid")?.parse().ok().filter(|&pid| pid > 0)?;
                Some((pid, row.get("database")?.clone(), row.get("user")?.clone()))
            })
            .collect();
        if servers.is_empty() {
            return Ok(0);
        }
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let values: Vec<String> = servers
            .iter()
            .map(|(pid, db, user)| format!("({pid}, {}, {})", quote(db), quote(user)))
            .collect();
        // Materialized so that only the backends that match are terminated.
        let sql = format!(
            "WITH victims AS MATERIALIZED (SELECT pid FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
             AND (pid, datname::text, usename::text) IN (VALUES {})) \
             SELECT pid FROM victims WHERE pg_terminate_backend(pid)",
            values.join(", ")
        );
        let out = run_psql(
            Command::new(find_psql()?)
                .args([
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    upstream_url,
                ])
                .args(["-c", &sql]),
        )
        .map_err(|e| format!("cannot terminate on {}: {e}", redact(upstream_url)))?;
        let killed: Vec<u32> = out
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect();

        // pgbouncer drops a server connection when it reads the EOF; wait for that, so that the
        // next transaction does not meet a connection about to be dropped.
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let left: Vec<u32> = self
                .show("SHOW SERVERS")?
                .into_iter()
                .filter_map(|row| row.get("remote_pid")?.parse().ok())
                .filter(|pid| killed.contains(pid))
                .collect();
            if left.is_empty() {
                return Ok(killed.len());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "terminated backends {killed:?}, but after {KILL_TIMEOUT:?} pgbouncer still \
                     lists {left:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An admin console command's result as rows keyed by column name.
    fn show(&self, command: &str) -> Result<Vec<HashMap<String, String>>, String> {
        let out = self.psql_admin(command, &["-F", "\x1f", "-P", "footer=off"])?;
        let mut lines = out.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split('\x1f').collect();
        Ok(lines
            .map(|line| {
                header
                    .iter()
                    .zip(line.split('\x1f'))
                    .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
                    .collect()
            })
            .collect())
    }

    fn psql_admin(&self, command: &str, extra: &[&str]) -> Result<String, String> {
        run_psql(
            Command::new(find_psql()?)
                .args(["-X", "-A", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", "postgres", "-d", "pgbouncer"])
                .args(extra)
                .args(["-c", command]),
        )
        .map_err(|e| format!("pgbouncer admin command {command:?} failed: {e}"))
    }
}

impl Drop for TempPgBouncer {
    fn drop(&mut self) {
        self.controller.shut_down();
        // The controller removes the directory itself; this covers a controller that died.
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Controller {
    fn send(&mut self, line: &str) -> Result<String, String> {
        let lost = |e: std::io::Error| format!("pgbouncer's controller process is gone: {e}");
        let stdin = self.stdin.as_mut().ok_or("pgbouncer has been shut down")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(lost)?;
        let mut reply = String::new();
        match self.stdout.read_line(&mut reply) {
            Ok(0) => Err("pgbouncer's controller process exited".to_owned()),
            Ok(_) => Ok(reply.trim().to_owned()),
            Err(e) => Err(lost(e)),
        }
    }

    fn start(&mut self, port: u16, log: &Path) -> Result<(), StartError> {
        // Errors show only what this attempt logged.
        let log_start = std::fs::metadata(log).map_or(0, |m| m.len());
        let reply = self.send("start").map_err(StartError::Other)?;
        let pid: u32 = reply
            .parse()
            .map_err(|_| StartError::Other(format!("unexpected controller reply {reply:?}")))?;
        let listening = format!("listening on 127.0.0.1:{port}");
        let startup = Startup {
            name: "pgbouncer",
            port,
            pid,
            log,
            log_from: log_start,
            not_ready: "did not accept connections",
            port_taken: "Address already in use",
        };
        // The log says *this* pgbouncer bound the port; the probe that it really serves.
        await_ready(
            &startup,
            || {
                log_tail(log, log_start).contains(&listening)
                    && accepts_connections(port, "pgbouncer")
            },
            || {
                let _ = self.send("stop");
            },
        )
    }

    /// Closing the pipe makes the controller stop pgbouncer and delete the directory.
    fn shut_down(&mut self) {
        self.stdin = None;
        let _ = self.child.wait();
    }
}

/// pgbouncer's configuration for one start attempt.
fn config_text(root: &Path, auth_file: &Path, port: u16, upstream: SocketAddr) -> String {
    format!(
        "[databases]\n\
         * = host={host} port={upstream_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {auth_file}\n\
         admin_users = postgres\n\
         pool_mode = transaction\n\
         ignore_startup_parameters = extra_float_digits\n\
         max_client_conn = 2000\n\
         default_pool_size = 20\n\
         server_reset_query =\n\
         logfile = {logfile}\n\
         pidfile = {pidfile}\n",
        host = upstream.ip(),
        upstream_port = upstream.port(),
        auth_file = auth_file.display(),
        logfile = root.join("pgbouncer.log").display(),
        pidfile = root.join("pgbouncer.pid").display(),
    )
}

/// Write a file into pgbouncer's directory, owned by pgbouncer's OS user.
fn write_file(path: &Path, text: &str, owner: Option<(u32, u32)>) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Run psql to completion; its output, or its error output.
fn run_psql(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        // pgbouncer refuses the `options` startup parameter that PGOPTIONS would send.
        .env_remove("PGOPTIONS")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.truncate(text.trim_end_matches('\n').len());
        Ok(text)
    } else {
        Err(format!(
            "psql failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The first `name` file in PATH.
fn in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
}

fn find_pgbouncer() -> Result<PathBuf, String> {
    in_path("pgbouncer")
        .or_else(|| Some(PathBuf::from("/usr/sbin/pgbouncer")).filter(|p| p.is_file()))
        .ok_or_else(|| {
            "pgbouncer not found (looked in PATH and /usr/sbin). Install it (Debian/Ubuntu: \
             apt-get install pgbouncer)."
                .to_owned()
        })
}

fn find_psql() -> Result<PathBuf, String> {
    in_path("psql")
        .or_else(|| {
            find_bindir()
                .ok()
                .map(|dir| dir.join("psql"))
                .filter(|p| p.is_file())
        })
        .ok_or_else(|| {
            "psql (the PostgreSQL client) not found in PATH nor beside the server binaries. \
             Install it (Debian/Ubuntu: apt-get install postgresql-client)."
                .to_owned()
        })
}
