//! The demo site in a real browser: headless Chromium through ChromeDriver (Debian packages
//! `chromium` and `chromium-driver`), two nodes on two ports sharing one database.
#![cfg(feature = "axum")]

#[path = "../examples/web/app.rs"]
mod app;
mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use pgsession::{SessionManager, SigningKey};
use serde_json::{Value, json};

/// A ChromeDriver process, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(path) = std::env::var(env) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

const INSTALL: &str = "the browser test needs Chromium and ChromeDriver: \
    `apt-get install chromium chromium-driver` on Debian (or set CHROMIUM and CHROMEDRIVER \
    to their paths); .ci/run installs them";

/// Starts ChromeDriver on a free port and waits for its "started successfully" line.
fn start_driver() -> Driver {
    let program = find_program("CHROMEDRIVER", &["chromedriver"]).expect(INSTALL);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(&program)
        .arg(format!("--port={port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL}", program.display()));
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("started successfully") => break,
            Some(Ok(_)) => continue,
            _ => panic!("ChromeDriver exited before it started; {INSTALL}"),
        }
    }
    // Keep draining its output so that it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let chromium = find_program("CHROMIUM", &["chromium", "chromium-browser"]).expect(INSTALL);
    // Without the background-networking flags Chromium keeps dialling out of a closed network.
    let args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,1150",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let capabilities = json!({
        "goog:chromeOptions": { "binary": chromium, "args": args }
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("Chromium does not start under ChromeDriver: {e}; {INSTALL}"))
}

/// Serves one demo node on a free port of 127.0.0.1; returns its base URL.
async fn serve(name: &str, manager: SessionManager) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("bound");
    let router = app::router(app::Node::new(name, manager, app::prometheus()));
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn click(client: &Client, id: &str) {
    client
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id} on the page: {e}"))
        .click()
        .await
        .expect("click");
}

async fn text(client: &Client, id: &str) -> String {
    client
        .find(Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id} on the page: {e}"))
        .text()
        .await
        .expect("text")
}

/// Waits for the page (after a click's navigation) to show `xpath`.
async fn wait_for(client: &Client, xpath: &str) {
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::XPath(xpath))
        .await
        .unwrap_or_else(|e| panic!("the page never showed {xpath}: {e}"));
}

async fn session_cookie(client: &Client) -> fantoccini::cookies::Cookie<'static> {
    client
        .get_all_cookies()
        .await
        .expect("cookies")
        .into_iter()
        .find(|c| c.name() == "id")
        .expect("the session cookie")
}

/// What `/api/me` says to a client holding `cookie` (a plain HTTP client, not the browser).
async fn me(url: &str, cookie: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{url}/api/me"))
        .header("cookie", format!("id={cookie}"))
        .send()
        .await
        .expect("the node answers")
        .text()
        .await
        .map(|body| serde_json::from_str(&body).expect("JSON"))
        .expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_counts_logs_in_on_one_node_and_logs_out_everywhere_from_the_other() {
    let db = TestDatabase::create().await;
    // The demo's own configuration: tokens signed with a key both nodes share.
    let key = SigningKey::generate();
    let manager_a = node(&db, app::config(key.clone())).await;
    let a = serve("node A", manager_a.clone()).await;
    let b = serve("node B", node(&db, app::config(key)).await).await;
    let driver = start_driver();
    let profile = std::env::temp_dir().join(format!("pgsession-chromium-{}", std::process::id()));
    let client = browser(&driver, &profile).await;

    // Before login: a counter kept in an anonymous session, seen by both nodes.
    client.goto(&format!("{a}/")).await.expect("page");
    assert_eq!(text(&client, "node").await, "node A");
    assert_eq!(text(&client, "counter").await, "0");
    assert!(
        client.get_all_cookies().await.expect("cookies").is_empty(),
        "no session (and no cookie) for a visitor who changed nothing"
    );
    click(&client, "count").await;
    wait_for(&client, "//strong[@id='counter' and text()='1']").await;
    client.goto(&format!("{b}/")).await.expect("page");
    assert_eq!(text(&client, "node").await, "node B");
    assert_eq!(
        text(&client, "counter").await,
        "1",
        "node B sees the visitor's session"
    );
    let visitor = session_cookie(&client).await;
    let token = visitor.value().split('.').next().expect("token");
    assert_eq!(token.len(), 64, "a signed token: {}", visitor.value());
    assert_eq!(visitor.http_only(), Some(true));
    // A forged cookie of the same shape is refused before any lookup, and counted.
    let (forged_before, misses_before) =
        (manager_a.stats().forged_tokens, manager_a.stats().misses);
    let forged = format!("{}A{}", &token[..20], &token[21..]);
    let forged = if forged == token {
        token.replace('A', "B")
    } else {
        forged
    };
    assert_eq!(me(&a, &forged).await["counter"], 0);
    assert_eq!(manager_a.stats().forged_tokens, forged_before + 1);
    assert_eq!(manager_a.stats().misses, misses_before, "no database read");
    assert_eq!(format!("{:?}", visitor.same_site()), "Some(Lax)");

    // Login on node A rotates the cookie (session fixation) and keeps the counter.
    client.goto(&format!("{a}/")).await.expect("page");
    client
        .find(Locator::Id("user"))
        .await
        .expect("field")
        .send_keys("alice")
        .await
        .expect("type");
    click(&client, "login").await;
    wait_for(&client, "//span[@id='user-name' and text()='alice']").await;
    assert_eq!(
        text(&client, "counter").await,
        "1",
        "the visitor's data carried over"
    );
    // The safe counter: 20 counts sent at once by the page lose none.
    let sent = client
        .execute_async(
            "const done = arguments[arguments.length - 1];\
             Promise.all(Array.from({length: 20}, () => fetch('/count', {method: 'POST'})\
               .then(r => r.status)))\
             .then(statuses => done(statuses), e => done(String(e)));",
            vec![],
        )
        .await
        .expect("the page sends the counts");
    assert_eq!(sent, json!(vec![200; 20]), "every count answered");
    client.goto(&format!("{a}/")).await.expect("page");
    assert_eq!(
        text(&client, "counter").await,
        "21",
        "1 + 20 concurrent counts"
    );
    let logged_in = session_cookie(&client).await;
    assert_ne!(
        logged_in.value(),
        visitor.value(),
        "login gives a new token"
    );
    assert_eq!(logged_in.http_only(), Some(true));
    assert_eq!(
        me(&a, visitor.value()).await["user"],
        Value::Null,
        "the old token opens nothing"
    );

    // Node B shows the user and this session, marked.
    client.goto(&format!("{b}/")).await.expect("page");
    assert_eq!(text(&client, "user-name").await, "alice");

    // The node panel: a reload is served from the cache, and the panel counts the hit.
    let hits = |t: String| t.parse::<u64>().expect("a number of hits");
    let before = hits(text(&client, "panel-hits").await);
    client.refresh().await.expect("reload");
    wait_for(&client, "//section[@id='panel']").await;
    let after = hits(text(&client, "panel-hits").await);
    assert!(
        after > before,
        "the reload was a cache hit: {before} -> {after}"
    );
    assert_eq!(text(&client, "panel-trusted").await, "trusted");
    assert!(text(&client, "panel-ratio").await.ends_with('%'));
    client
        .find(Locator::Css("svg#panel-history"))
        .await
        .expect("the history chart is drawn");
    let y_max = text(&client, "panel-y-max").await;
    assert!(
        y_max.parse::<u64>().is_ok_and(|peak| peak >= 1),
        "the chart's y axis is labelled with its peak: {y_max:?}"
    );
    // /metrics in the browser: Prometheus text with pgsession's names.
    client.goto(&format!("{b}/metrics")).await.expect("metrics");
    let exported = client
        .find(Locator::Css("body"))
        .await
        .expect("body")
        .text()
        .await
        .expect("text");
    for name in [
        "pgsession_cache_hits_total",
        "pgsession_cache_entries",
        "pgsession_cache_trusted",
    ] {
        assert!(exported.contains(name), "/metrics lacks {name}");
    }
    client.goto(&format!("{b}/")).await.expect("page");
    let rows = client
        .find_all(Locator::Css("tr.session"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].text().await.expect("text").contains("(this one)"));
    let screenshot = client.screenshot().await.expect("screenshot");
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(shots.join("demo-logged-in.png"), &screenshot).expect("saved");
    let api = me(&b, logged_in.value()).await;
    assert_eq!(api["node"], "node B");
    assert_eq!(api["user"], "alice");
    assert_eq!(api["counter"], 21);
    assert_eq!(api["sessions"][0]["current"], true);

    // Log out everywhere on node B; node A then shows the login form (once A has applied
    // B's announcement, which its event follows).
    let mut on_a = manager_a.subscribe_events();
    click(&client, "logout-everywhere").await;
    wait_for(&client, "//button[@id='login']").await;
    heard_from_other_node(
        &mut on_a,
        pgsession::SessionEventKind::UserLoggedOutEverywhere,
    )
    .await;
    client.goto(&format!("{a}/")).await.expect("page");
    assert_eq!(text(&client, "node").await, "node A");
    assert!(
        client.find(Locator::Id("login")).await.is_ok(),
        "node A shows the login form"
    );
    assert!(client.find(Locator::Id("user-name")).await.is_err());
    assert_eq!(me(&a, logged_in.value()).await["user"], Value::Null);

    client.close().await.expect("browser closes");
    let _ = std::fs::remove_dir_all(&profile);
}
