//! TempPgBouncer in front of a TempPostgres: queries, admin console, killed server connections,
//! shutdown, and no pgbouncer outliving its process.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgsession_testkit::{TempPgBouncer, TempPostgres};
use sqlx::{Connection, PgConnection, Row};

const CHILD_ENV: &str = "PGSESSION_TESTKIT_PGBOUNCER_ORPHAN_CHILD";

/// `SELECT pg_backend_pid()` the way pgbouncer's transaction mode allows: simple protocol.
async fn backend_pid(conn: &mut PgConnection) -> i32 {
    let row = sqlx::raw_sql("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    row.get(0)
}

/// A bound, unprepared query inside a transaction (the other way that works through pgbouncer).
async fn add_one(conn: &mut PgConnection, n: i32) -> i32 {
    let mut tx = conn.begin().await.unwrap();
    let sum = sqlx::query_scalar("SELECT $1::int4 + 1")
        .bind(n)
        .persistent(false)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sum
}

/// The `SHOW SERVERS` rows as (remote_pid, local_port).
fn servers(bouncer: &TempPgBouncer) -> Vec<(i32, i32)> {
    let out = bouncer.admin("SHOW SERVERS").unwrap();
    // Columns: type|user|database|state|addr|port|local_addr|local_port|...|remote_pid|...
    let header = Command::new("psql")
        .args(["-X", "-A", "-P", "footer=off", "-h", "127.0.0.1"])
        .args([
            "-p",
            &bouncer.port().to_string(),
            "-U",
            "postgres",
            "pgbouncer",
        ])
        .args(["-c", "SHOW SERVERS"])
        .output()
        .unwrap();
    let header = String::from_utf8(header.stdout).unwrap();
    let columns: Vec<&str> = header.lines().next().unwrap().split('|').collect();
    let col = |name: &str| columns.iter().position(|c| *c == name).unwrap();
    let (pid_col, port_col) = (col("remote_pid"), col("local_port"));
    out.lines()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split('|').collect();
            (
                fields[pid_col].parse().unwrap(),
                fields[port_col].parse().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn queries_admin_kill_and_drop() {
    let server = TempPostgres::start().unwrap();
    let bouncer = TempPgBouncer::start(server.addr()).unwrap();
    assert_eq!(
        bouncer.url("postgres"),
        format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port())
    );
    assert_eq!(bouncer.addr().port(), bouncer.port());
    assert_ne!(
        bouncer.port(),
        6432,
        "must not use the system pgbouncer's port"
    );

    // Queries through the bouncer, on any database of the server.
    let mut client = PgConnection::connect(&bouncer.url("postgres"))
        .await
        .unwrap();
    assert_eq!(add_one(&mut client, 41).await, 42);
    let first_pid = backend_pid(&mut client).await;
    let mut other_db = PgConnection::connect(&bouncer.url("template1"))
        .await
        .unwrap();
    let db: String = sqlx::raw_sql("SELECT current_database()")
        .fetch_one(&mut other_db)
        .await
        .unwrap()
        .get(0);
    assert_eq!(db, "template1");
    other_db.close().await.unwrap();

    // The admin console answers.
    let pools = bouncer.admin("SHOW POOLS").unwrap();
    assert!(
        pools.lines().any(|l| l.starts_with("postgres|postgres|")),
        "{pools}"
    );
    assert!(bouncer.admin("NO SUCH COMMAND").is_err());

    // pgbouncer's server connections are identified by the backend pid it reports; on a direct
    // connection that is the backend whose client port is pgbouncer's local port.
    let held = servers(&bouncer);
    assert!(held.iter().any(|&(pid, _)| pid == first_pid), "{held:?}");
    let mut direct = PgConnection::connect(&server.url("postgres"))
        .await
        .unwrap();
    let direct_pid = backend_pid(&mut direct).await;
    for &(pid, local_port) in &held {
        let client_port: i32 =
            sqlx::query_scalar("SELECT client_port FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_one(&mut direct)
                .await
                .unwrap();
        assert_eq!(client_port, local_port, "backend {pid}");
    }

    // Killing them leaves other connections alone; the idle client gets a new server
    // connection with its next transaction.
    let killed = bouncer
        .kill_server_connections(&server.url("postgres"))
        .unwrap();
    assert!(killed >= 1, "killed {killed}");
    assert_eq!(killed, held.len());
    assert!(servers(&bouncer).is_empty());
    assert_eq!(backend_pid(&mut direct).await, direct_pid);
    let alive: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)")
            .bind(first_pid)
            .fetch_one(&mut direct)
            .await
            .unwrap();
    assert!(!alive, "backend {first_pid} still there");
    assert_ne!(backend_pid(&mut client).await, first_pid);
    assert_eq!(add_one(&mut client, 1).await, 2);
    assert_eq!(
        bouncer
            .kill_server_connections(&server.url("postgres"))
            .unwrap(),
        1
    );
    assert_eq!(add_one(&mut client, 2).await, 3);

    // Dropping it stops pgbouncer and removes its directory; the server is untouched.
    let addr = bouncer.addr();
    let dir = bouncer.dir().to_owned();
    assert!(dir.join("pgbouncer.log").exists());
    drop(bouncer);
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    assert!(
        sqlx::raw_sql("SELECT 1")
            .execute(&mut client)
            .await
            .is_err()
    );
    assert_eq!(backend_pid(&mut direct).await, direct_pid);
}

#[test]
fn nothing_to_kill_without_a_runtime() {
    let server = TempPostgres::start().unwrap();
    // Started before its upstream exists, as pgbouncer only connects for clients.
    let unused = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    let early = TempPgBouncer::start(unused).unwrap();
    assert_eq!(early.admin("SHOW SERVERS").unwrap(), "");
    let bouncer = TempPgBouncer::start(server.addr()).unwrap();
    assert_ne!(bouncer.port(), early.port());
    assert_eq!(
        bouncer
            .kill_server_connections(&server.url("postgres"))
            .unwrap(),
        0
    );
    assert!(bouncer.admin("RECONNECT").is_ok());
}

/// Only does something when run as the child of `no_pgbouncer_outlives_its_process`.
#[test]
fn orphan_child() {
    let Ok(how) = std::env::var(CHILD_ENV) else {
        return;
    };
    let bouncer = TempPgBouncer::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 9))).unwrap();
    println!("DIR={} PORT={}", bouncer.dir().display(), bouncer.port());
    match how.as_str() {
        "exit" => std::process::exit(0),
        // Wait to be killed with SIGKILL.
        _ => std::thread::sleep(Duration::from_secs(60)),
    }
}

#[test]
fn no_pgbouncer_outlives_its_process() {
    for how in ["exit", "kill"] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["orphan_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, how)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let line = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            // libtest may print "test orphan_child ... " on the same line first.
            .find_map(|line| line.split_once("DIR=").map(|(_, rest)| rest.to_owned()))
            .expect("the child did not start pgbouncer");
        let (dir, port) = line.rsplit_once(" PORT=").unwrap();
        let port: u16 = port.trim().parse().unwrap();
        let marker = Path::new(dir)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            processes_mentioning(&marker)
                .iter()
                .any(|c| c.contains("pgbouncer.ini")),
            "{how}: no pgbouncer found"
        );
        if how == "kill" {
            child.kill().unwrap();
        }
        child.wait().unwrap();

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = processes_mentioning(&marker);
            if left.is_empty() && !Path::new(dir).exists() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{how}: left behind {left:?}, dir exists: {}",
                Path::new(dir).exists()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    }
}

/// Command lines of the processes whose command line mentions `marker`.
fn processes_mentioning(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(marker))
        .collect()
}
