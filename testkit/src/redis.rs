use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use crate::process::{
    PORT_ATTEMPTS, StartError, Startup, as_server_user, await_ready, free_port, log_tail,
    make_root, process_alive, remove_root,
};

/// The shell process that owns redis-server. Its stdin is a pipe written only by this process:
/// `launch PORT` starts redis-server on PORT and answers with its pid, `halt` stops it and
/// answers `halted`, and end of input (this process has gone, however it ended) stops it and
/// removes the directory. `$1` is the directory, `$2` the log file, the rest the redis-server
/// command without its port.
///
/// redis-server saves nothing here and exits promptly on SIGTERM; SIGKILL follows after 5 s
/// all the same, so that a stuck server cannot hang a drop.
const WATCHDOG: &str = r#"
exec 2>>"$2"
trap '' PIPE
dir=$1 log=$2
shift 2
child=
finish() {
    if [ -z "$child" ]; then return 0; fi
    kill -TERM "$child" 2>/dev/null
    tries=0
    while [ "$tries" -lt 100 ] && kill -0 "$child" 2>/dev/null \
        && ! grep -q '^[^)]*) [ZX]' "/proc/$child/stat" 2>/dev/null; do
        sleep 0.05
        tries=$((tries + 1))
    done
    kill -KILL "$child" 2>/dev/null
    wait "$child"
    child=
}
while read -r verb port; do
    if [ "$verb" = launch ]; then
        finish
        "$@" --port "$port" </dev/null >>"$log" 2>&1 &
        child=$!
        echo "$child"
    elif [ "$verb" = halt ]; then
        finish
        echo halted
    fi
done
finish
rm -rf "$dir"
"#;

/// What redis-server logs once it serves clients (7.x adds the listener kind after it).
const READY_LINE: &str = "Ready to accept connections";

/// A private, throwaway Redis server (Debian's `redis-server` package).
///
/// It listens on a free port on 127.0.0.1 (no Unix socket), keeps nothing on disk (no RDB
/// snapshots, no append-only file) and has no password. Dropping it stops the server and
/// deletes its directory; if the process ends without running destructors, a watchdog does the
/// same.
pub struct TempRedis {
    dir: PathBuf,
    port: u16,
    watchdog: Watchdog,
}

struct Watchdog {
    shell: Child,
    /// `None` once the watchdog has been told to finish.
    commands: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
}

/// A failed start attempt; a port someone else took in the meantime is worth another try.
impl TempRedis {
    /// Start a new server. Blocks until it answers `PING`; it does not need or use a tokio
    /// runtime, so it may be called from sync code or from inside a runtime.
    pub fn start() -> Result<TempRedis, String> {
        let bin = find_redis_server()?;
        // redis-server is content to run as root, so it runs as whoever we are.
        let (dir, _) = make_root(None, "pgsession-testkit-redis")?;
        let log = dir.join("redis.log");

        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(WATCHDOG)
            .arg("pgsession-testkit-redis-watchdog")
            .arg(&dir)
            .arg(&log)
            .arg(&bin)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&dir);
        sh.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // A Ctrl-C for the whole run must not kill the watchdog before it has cleaned up;
            // the pipe closing is its signal.
            .process_group(0);
        let mut shell = as_server_user(&mut sh, None, &dir)
            .spawn()
            .map_err(|e| remove_root(&dir, format!("cannot run sh: {e}")))?;
        let (Some(commands), Some(replies)) = (shell.stdin.take(), shell.stdout.take()) else {
            let _ = shell.kill();
            let _ = shell.wait();
            return Err(remove_root(&dir, "the watchdog has no pipes".to_owned()));
        };
        let mut watchdog = Watchdog {
            shell,
            commands: Some(commands),
            replies: BufReader::new(replies),
        };

        let mut error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = match free_port() {
                Ok(port) => port,
                Err(e) => {
                    error = e;
                    break;
                }
            };
            match watchdog.launch(port, &log) {
                Ok(()) => {
                    return Ok(TempRedis {
                        dir,
                        port,
                        watchdog,
                    });
                }
                Err(StartError::PortTaken(e)) => error = e,
                Err(StartError::Other(e)) => {
                    error = e;
                    break;
                }
            }
        }
        watchdog.finish();
        Err(remove_root(&dir, error))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (holding `redis.log`), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.watchdog.finish();
        // The watchdog removes the directory; this covers a watchdog that died first.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Watchdog {
    /// Send one command line and read the one-line answer.
    fn ask(&mut self, command: &str) -> Result<String, String> {
        let gone = |e: std::io::Error| format!("redis-server's watchdog process is gone: {e}");
        let commands = self
            .commands
            .as_mut()
            .ok_or("redis-server has been shut down")?;
        commands
            .write_all(format!("{command}\n").as_bytes())
            .and_then(|()| commands.flush())
            .map_err(gone)?;
        let mut answer = String::new();
        match self.replies.read_line(&mut answer) {
            Ok(0) => Err("redis-server's watchdog process exited".to_owned()),
            Ok(_) => Ok(answer.trim().to_owned()),
            Err(e) => Err(gone(e)),
        }
    }

    /// Start redis-server on `port` and wait until it serves.
    fn launch(&mut self, port: u16, log: &Path) -> Result<(), StartError> {
        // Report only what this attempt logged.
        let from = std::fs::metadata(log).map_or(0, |m| m.len());
        let answer = self
            .ask(&format!("launch {port}"))
            .map_err(StartError::Other)?;
        let pid: u32 = answer
            .parse()
            .map_err(|_| StartError::Other(format!("unexpected watchdog answer {answer:?}")))?;
        let startup = Startup {
            name: "redis-server",
            port,
            pid,
            log,
            log_from: from,
            not_ready: "did not answer PING",
            port_taken: "already in use",
        };
        // The log line says that *this* server bound the port (a PONG alone could come from
        // another server that took it first); the PING that it serves.
        await_ready(
            &startup,
            || process_alive(pid) && log_tail(log, from).contains(READY_LINE) && answers_ping(port),
            || {
                let _ = self.ask("halt");
            },
        )
    }

    /// Closing the pipe makes the watchdog stop the server and delete the directory.
    fn finish(&mut self) {
        self.commands = None;
        let _ = self.shell.wait();
    }
}

/// Whether a Redis server on 127.0.0.1:`port` answers an inline `PING` with `+PONG`.
fn answers_ping(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        // One line is the whole answer: `+PONG\r\n`, or an error such as `-LOADING ...`.
        while !reply.ends_with(b"\r\n") && reply.len() < 512 {
            if stream.read(&mut byte)? == 0 {
                break;
            }
            reply.push(byte[0]);
        }
        Ok(reply.starts_with(b"+PONG"))
    };
    probe().unwrap_or(false)
}

/// redis-server from PATH, else Debian's `/usr/bin` (or `/usr/sbin`).
fn find_redis_server() -> Result<PathBuf, String> {
    let in_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("redis-server"))
            .find(|file| file.is_file())
    });
    in_path
        .or_else(|| {
            ["/usr/bin/redis-server", "/usr/sbin/redis-server"]
                .into_iter()
                .map(PathBuf::from)
                .find(|file| file.is_file())
        })
        .ok_or_else(|| {
            "redis-server not found (looked in PATH, /usr/bin and /usr/sbin). Install it \
             (Debian/Ubuntu: apt-get install redis-server)."
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_cleans_up() {
        let redis = TempRedis::start().unwrap();
        assert!(answers_ping(redis.port()));
        assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
        let (port, dir) = (redis.port(), redis.dir().to_owned());
        assert!(dir.is_dir());
        drop(redis);
        assert!(!answers_ping(port));
        assert!(!dir.exists());
    }
}
