use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use crate::process::{
    PORT_ATTEMPTS, StartError, Startup, accepts_connections, as_server_user, await_ready,
    free_port, make_root, remove_root, server_user,
};

/// The controller that owns the server process. It runs as the server's OS user so that it may
/// signal the postmaster and delete the data directory. Its stdin is a pipe whose only writer is
/// this process, so when this process dies in any way (even `kill -9` or `process::exit`, which
/// skip destructors) `read` sees EOF and the controller stops the server and removes the
/// directory. `$1` is the directory to remove, `$2` the log file, the rest the server command.
const CONTROLLER: &str = r#"
exec 2>>"$2"
trap '' PIPE
dir=$1 log=$2
shift 2
pid=
halt() {
    if [ -n "$pid" ]; then kill -INT "$pid" 2>/dev/null; wait "$pid"; pid=; fi
}
while read -r cmd port; do
    case $cmd in
        start) "$@" -p "$port" </dev/null >>"$log" 2>&1 & pid=$!; echo "$pid" ;;
        stop) halt; echo stopped ;;
    esac
done
halt
rm -rf "$dir"
"#;

/// Settings for [`TempPostgres::start_with`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Turn `fsync`, `synchronous_commit` and `full_page_writes` on (for benchmarks that should
    /// pay for durability like production); off by default so that tests run fast.
    pub durable: bool,
    /// `max_connections`; 200 by default so that many pools can share one server.
    pub max_connections: u32,
    /// Extra `-c name=value` settings, applied after (and so overriding) the ones above.
    pub settings: Vec<(String, String)>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            durable: false,
            max_connections: 200,
            settings: Vec::new(),
        }
    }
}

/// A private, throwaway PostgreSQL server started from the installed binaries.
///
/// It listens on 127.0.0.1 only (no Unix socket), trusts every connection, and has the superuser
/// `postgres`. Dropping it stops the server and deletes its directory; if the process ends
/// without running destructors, a watchdog does the same.
pub struct TempPostgres {
    root: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    options: ServerOptions,
    controller: Mutex<Controller>,
}

struct Controller {
    child: Child,
    /// `None` once the controller has been told to shut down for good.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The running postmaster's pid, `None` while stopped.
    postmaster: Option<u32>,
}

/// Why a start attempt failed: only a lost port race is worth retrying.
impl TempPostgres {
    /// Start a new server with [`ServerOptions::default`].
    ///
    /// Blocks (for about a second) until the server accepts connections; it does not need or use
    /// a tokio runtime, so it may be called from sync code or from inside a runtime.
    pub fn start() -> Result<TempPostgres, String> {
        Self::start_with(ServerOptions::default())
    }

    /// Start a new server with the given options; see [`TempPostgres::start`].
    pub fn start_with(options: ServerOptions) -> Result<TempPostgres, String> {
        let bin = find_bindir()?;
        let owner = server_user("PostgreSQL")?;
        let (root, name) = make_root(owner, "pgsession-testkit")?;
        let data_dir = root.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["--no-sync", "-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .args(["--locale=C", "--no-instructions"]);
        run_as_server_user(&mut initdb, owner, &root, "initdb")
            .map_err(|e| remove_root(&root, e))?;
        launch(root, name, bin, owner, options)
    }

    /// Start a streaming replica (hot standby) of this server: a base backup taken through
    /// `upstream` (this server's address, or a [`FaultProxy`](crate::FaultProxy) in front of
    /// it, so that a test can cut replication), which it then keeps replicating from
    /// asynchronously. Same options as this server. [`TempPostgres::promote`] makes it a
    /// primary. Blocks until it accepts (read-only) connections.
    pub fn start_standby(&self, upstream: SocketAddr) -> Result<TempPostgres, String> {
        let bin = find_bindir()?;
        let owner = server_user("PostgreSQL")?;
        let (root, name) = make_root(owner, "pgsession-testkit")?;
        let data_dir = root.join("data");
        let mut backup = Command::new(bin.join("pg_basebackup"));
        backup
            .arg("-D")
            .arg(&data_dir)
            .args(["-h", &upstream.ip().to_string()])
            .args(["-p", &upstream.port().to_string()])
            .args(["-U", "postgres", "-X", "stream", "-c", "fast", "--no-sync"])
            // Writes standby.signal and primary_conninfo (pointing at `upstream`).
            .arg("-R");
        run_as_server_user(&mut backup, owner, &root, "pg_basebackup")
            .map_err(|e| remove_root(&root, e))?;
        launch(root, name, bin, owner, self.options.clone())
    }

    /// Promote a standby to a primary (`pg_ctl promote`); returns once it accepts writes.
    pub fn promote(&self) -> Result<(), String> {
        let mut promote = Command::new(self.bin.join("pg_ctl"));
        promote
            .arg("promote")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-w", "-t", "30"]);
        run_as_server_user(&mut promote, self.owner, &self.root, "pg_ctl promote")
    }

    /// `127.0.0.1:PORT`, e.g. to put a proxy in front of the server.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/<dbname>`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The TCP port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data directory (removed on drop), e.g. to read its files in a test.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Fast shutdown (SIGINT to the postmaster, which disconnects every client); returns once the
    /// postmaster has exited. Does nothing when already stopped.
    pub fn stop(&self) -> Result<(), String> {
        self.lock().stop()
    }

    /// Stop (if running) and start again on the same port and data directory; returns once the
    /// server accepts connections.
    pub fn restart(&self) -> Result<(), String> {
        let mut controller = self.lock();
        controller.stop()?;
        controller.start_again(self)
    }

    /// Start again after [`TempPostgres::stop`] on the same port and data directory; returns
    /// once the server accepts connections. Does nothing when already running.
    pub fn start_again(&self) -> Result<(), String> {
        self.lock().start_again(self)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Controller> {
        // A panic while holding the lock leaves the controller state as valid as any other.
        self.controller.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Run a server program (initdb, pg_basebackup, pg_ctl) to completion as the server's user.
fn run_as_server_user(
    cmd: &mut Command,
    owner: Option<(u32, u32)>,
    root: &Path,
    what: &str,
) -> Result<(), String> {
    let out = as_server_user(cmd, owner, root)
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Start the controller and the server on a prepared data directory `root/data`.
fn launch(
    root: PathBuf,
    name: String,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    options: ServerOptions,
) -> Result<TempPostgres, String> {
    let data_dir = root.join("data");
    let log = root.join("server.log");
    let on = |durable| if durable { "on" } else { "off" };
    let mut settings: Vec<(String, String)> = [
        ("listen_addresses", "127.0.0.1".to_owned()),
        ("unix_socket_directories", String::new()),
        ("max_connections", options.max_connections.to_string()),
        ("fsync", on(options.durable).to_owned()),
        ("synchronous_commit", on(options.durable).to_owned()),
        ("full_page_writes", on(options.durable).to_owned()),
        // Names every server process (ps titles), so leftovers are easy to find.
        ("cluster_name", name.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    settings.extend(options.settings.iter().cloned());

    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(CONTROLLER)
        .arg("pgsession-testkit-controller")
        .arg(&root)
        .arg(&log)
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(&data_dir);
    for (k, v) in &settings {
        sh.arg("-c").arg(format!("{k}={v}"));
    }
    sh.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Keeps a Ctrl-C meant for the test run from killing the controller before it can
        // clean up; the closed pipe is what tells it to stop.
        .process_group(0);
    let mut child = as_server_user(&mut sh, owner, &root)
        .spawn()
        .map_err(|e| remove_root(&root, format!("cannot run sh: {e}")))?;
    let mut controller = Controller {
        stdin: child.stdin.take(),
        stdout: BufReader::new(child.stdout.take().expect("stdout is piped")),
        child,
        postmaster: None,
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
        match controller.start(port, &data_dir, &log) {
            Ok(()) => {
                return Ok(TempPostgres {
                    root,
                    data_dir,
                    log,
                    port,
                    bin,
                    owner,
                    options,
                    controller: Mutex::new(controller),
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

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.lock().shut_down();
        // The controller removes the directory itself; this covers a controller that died.
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Controller {
    fn send(&mut self, line: &str) -> Result<String, String> {
        let lost = |e: std::io::Error| format!("the server's controller process is gone: {e}");
        let stdin = self.stdin.as_mut().ok_or("the server has been shut down")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(lost)?;
        let mut reply = String::new();
        match self.stdout.read_line(&mut reply) {
            Ok(0) => Err("the server's controller process exited".to_owned()),
            Ok(_) => Ok(reply.trim().to_owned()),
            Err(e) => Err(lost(e)),
        }
    }

    fn start(&mut self, port: u16, data_dir: &Path, log: &Path) -> Result<(), StartError> {
        // Errors show only what this attempt logged.
        let log_start = std::fs::metadata(log).map_or(0, |m| m.len());
        let reply = self
            .send(&format!("start {port}"))
            .map_err(StartError::Other)?;
        let pid: u32 = reply
            .parse()
            .map_err(|_| StartError::Other(format!("unexpected controller reply {reply:?}")))?;
        self.postmaster = Some(pid);
        let startup = Startup {
            name: "PostgreSQL",
            port,
            pid,
            log,
            log_from: log_start,
            not_ready: "did not accept connections",
            port_taken: "could not bind",
        };
        // The pid file says the server bound *our* port; the probe that it really serves.
        await_ready(
            &startup,
            || pid_file_ready(data_dir, pid) && accepts_connections(port, "postgres"),
            || {
                let _ = self.stop();
            },
        )
    }

    fn start_again(&mut self, server: &TempPostgres) -> Result<(), String> {
        if self.postmaster.is_some() {
            return Ok(());
        }
        self.start(server.port, &server.data_dir, &server.log)
            .map_err(|(StartError::PortTaken(e) | StartError::Other(e))| e)
    }

    fn stop(&mut self) -> Result<(), String> {
        if self.postmaster.is_none() {
            return Ok(());
        }
        match self.send("stop")?.as_str() {
            "stopped" => {
                self.postmaster = None;
                Ok(())
            }
            other => Err(format!("unexpected controller reply {other:?}")),
        }
    }

    /// Closing the pipe makes the controller stop the server and delete the directory.
    fn shut_down(&mut self) {
        self.stdin = None;
        self.postmaster = None;
        let _ = self.child.wait();
    }
}

/// The directory of the installed PostgreSQL server binaries.
pub(crate) fn find_bindir() -> Result<PathBuf, String> {
    let has_postgres = |dir: &Path| dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_postgres(&dir) {
            Ok(dir)
        } else {
            Err(format!("PG_BIN={} has no `postgres` binary", dir.display()))
        };
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_postgres(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_postgres(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| has_postgres(dir)))
        .ok_or_else(|| {
            "PostgreSQL server binaries not found (looked in $PG_BIN, pg_config --bindir, \
             /usr/lib/postgresql/*/bin, PATH). Install them (Debian/Ubuntu: apt-get install \
             postgresql) or set DATABASE_URL to a server where the user may CREATE DATABASE."
                .to_owned()
        })
}

/// Whether the postmaster's lock file names `pid` and says "ready" (as `pg_ctl` checks).
fn pid_file_ready(data_dir: &Path, pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.first().and_then(|l| l.trim().parse().ok()) == Some(pid)
        && lines.get(7).is_some_and(|l| l.trim() == "ready")
}
