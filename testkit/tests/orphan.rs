//! A server must not outlive the process that started it, however that process ends.
//!
//! The test re-runs this test binary as a child that starts a server and then ends without
//! running destructors, and checks that no process of that server remains and that its
//! directory is removed.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pgsession_testkit::TempPostgres;

const CHILD_ENV: &str = "PGSESSION_TESTKIT_ORPHAN_CHILD";

/// Only does something when run as the child of `no_server_outlives_its_process`.
#[test]
fn orphan_child() {
    let Ok(how) = std::env::var(CHILD_ENV) else {
        return;
    };
    let server = TempPostgres::start().unwrap();
    println!("ROOT={}", server.data_dir().parent().unwrap().display());
    match how.as_str() {
        "exit" => std::process::exit(0),
        // Wait to be killed with SIGKILL.
        _ => std::thread::sleep(Duration::from_secs(60)),
    }
}

#[test]
fn no_server_outlives_its_process() {
    for how in ["exit", "kill"] {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["orphan_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, how)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let root = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            // libtest may print "test orphan_child ... " on the same line first.
            .find_map(|line| line.split_once("ROOT=").map(|(_, root)| root.to_owned()))
            .expect("the child did not start a server");
        let marker = Path::new(&root)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            !processes_mentioning(&marker).is_empty(),
            "{how}: no server found"
        );
        if how == "kill" {
            child.kill().unwrap();
        }
        child.wait().unwrap();

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = processes_mentioning(&marker);
            if left.is_empty() && !Path::new(&root).exists() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{how}: left behind {left:?}, dir exists: {}",
                Path::new(&root).exists()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Command lines of the processes whose command line (or, for PostgreSQL's children, process
/// title, which includes the cluster name) mentions `marker`.
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
