//! The axum session layer, driven by a real HTTP client over loopback: lazy loading, cookies,
//! delta saves, login rotation, logout, and faults.
#![cfg(feature = "axum")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use common::*;
use pgsession::SessionManager;
use pgsession::axum::{SameSite, SessionLayer, WebSession};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Barrier;

#[derive(Clone)]
struct AppState {
    barrier: Arc<Barrier>,
}

async fn read(session: WebSession, Path(key): Path<String>) -> pgsession::Result<String> {
    Ok(match session.get_as::<String>(&key).await? {
        Some(value) => value,
        None => "none".to_owned(),
    })
}

async fn write(
    session: WebSession,
    Path((key, value)): Path<(String, String)>,
) -> pgsession::Result<()> {
    session.set(key, value).await
}

/// Loads the session, changes one key, and returns only when a second request has loaded and
/// changed its key too, so both saves start from the same state.
async fn write_together(
    State(state): State<AppState>,
    session: WebSession,
    Path((key, value)): Path<(String, String)>,
) -> pgsession::Result<()> {
    session.set(key, value).await?;
    state.barrier.wait().await;
    Ok(())
}

async fn write_then_fail(
    session: WebSession,
    Path((key, value)): Path<(String, String)>,
) -> pgsession::Result<StatusCode> {
    session.set(key, value).await?;
    Ok(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn log_in(session: WebSession, Path(user): Path<String>) -> pgsession::Result<()> {
    session.log_in(user).await
}

async fn whoami(session: WebSession) -> pgsession::Result<String> {
    Ok(match session.user_id().await? {
        Some(user) => user.to_string(),
        None => "nobody".to_owned(),
    })
}

async fn rotate(session: WebSession) -> pgsession::Result<()> {
    session.rotate().await
}

async fn log_out(session: WebSession) -> pgsession::Result<String> {
    Ok(session.log_out().await?.to_string())
}

async fn log_out_everywhere(session: WebSession) -> pgsession::Result<String> {
    Ok(session.log_out_everywhere().await?.to_string())
}

async fn count(session: WebSession) -> pgsession::Result<String> {
    let n = session
        .modify("n", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await?;
    Ok(n.to_string())
}

async fn plain() -> &'static str {
    "no session used"
}

fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/plain", get(plain))
        .route("/count", post(count))
        .route("/get/{key}", get(read))
        .route("/set/{key}/{value}", post(write))
        .route("/together/{key}/{value}", post(write_together))
        .route("/fail/{key}/{value}", post(write_then_fail))
        .route("/login/{user}", post(log_in))
        .route("/whoami", get(whoami))
        .route("/rotate", post(rotate))
        .route("/logout", post(log_out))
        .route("/logout-everywhere", post(log_out_everywhere))
        .with_state(AppState {
            barrier: Arc::new(Barrier::new(2)),
        })
        .layer(layer)
}

/// Serves the test app on a free loopback port; returns its base URL.
async fn serve(layer: SessionLayer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app(layer)).await });
    format!("http://{addr}")
}

struct Reply {
    status: StatusCode,
    set_cookie: Vec<String>,
    body: String,
}

impl Reply {
    /// The token the one `Set-Cookie` header sets (empty for a removal).
    fn token(&self) -> String {
        assert_eq!(
            self.set_cookie.len(),
            1,
            "one Set-Cookie: {:?}",
            self.set_cookie
        );
        let pair = self.set_cookie[0].split(';').next().expect("a pair");
        let (name, value) = pair.split_once('=').expect("name=value");
        assert_eq!(name, "id");
        value.to_owned()
    }
}

async fn send(method: &str, url: &str, cookie: Option<&str>) -> Reply {
    send_bytes(method, url, cookie.map(str::as_bytes)).await
}

/// [`send`] with a `Cookie` header of any bytes HTTP allows (not only ASCII).
async fn send_bytes(method: &str, url: &str, cookie: Option<&[u8]>) -> Reply {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = client.request(method, url);
    if let Some(cookie) = cookie {
        let value = reqwest::header::HeaderValue::from_bytes(cookie).expect("a header value");
        request = request.header("cookie", value);
    }
    let response = request.send().await.expect("the server answers");
    let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
    let set_cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect();
    let body = response.text().await.expect("body");
    Reply {
        status,
        set_cookie,
        body,
    }
}

fn cookie(token: &str) -> String {
    format!("id={token}")
}

#[tokio::test]
async fn a_request_without_a_cookie_reads_nothing_and_sets_no_cookie() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node.clone())).await;
    let before = node.stats();

    let plain = send("GET", &format!("{url}/plain"), None).await;
    let read = send("GET", &format!("{url}/get/cart"), None).await;

    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(read.body, "none");
    assert!(plain.set_cookie.is_empty() && read.set_cookie.is_empty());
    let after = node.stats();
    assert_eq!((after.hits, after.misses), (before.hits, before.misses));
    assert_eq!(
        count_rows(&pool(&db).await).await,
        0,
        "no session for a reader"
    );
}

#[tokio::test]
async fn a_write_creates_an_anonymous_session_with_a_secure_cookie_sent_once() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node.clone())).await;

    let created = send("POST", &format!("{url}/set/cart/apples"), None).await;
    assert_eq!(created.status, StatusCode::OK);
    let header = &created.set_cookie[0];
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(header.contains(attribute), "{attribute} in {header}");
    }
    let max_age: i64 = header
        .split("Max-Age=")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .expect("a Max-Age number");
    let ttl = node.config().session_ttl.as_secs() as i64;
    assert!(
        (ttl - 5..=ttl).contains(&max_age),
        "Max-Age {max_age} follows the {ttl} s expiry"
    );
    let token = created.token();

    let read = send("GET", &format!("{url}/get/cart"), Some(&cookie(&token))).await;
    assert_eq!(read.body, "apples");
    assert!(
        read.set_cookie.is_empty(),
        "no Set-Cookie when the token did not change"
    );
    let who = send("GET", &format!("{url}/whoami"), Some(&cookie(&token))).await;
    assert_eq!(who.body, "nobody");
    assert_eq!(count_rows(&pool(&db).await).await, 1);
}

#[tokio::test]
async fn cookie_attributes_follow_the_builder() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let layer = SessionLayer::new(node)
        .with_cookie_name("sid")
        .with_secure(false)
        .with_same_site(SameSite::Strict)
        .with_path("/app")
        .with_domain("example.test")
        .with_persistent(false);
    let url = serve(layer).await;

    let created = send("POST", &format!("{url}/set/k/v"), None).await;
    let header = &created.set_cookie[0];
    assert!(header.starts_with("sid="), "{header}");
    assert!(header.contains("Path=/app") && header.contains("Domain=example.test"));
    assert!(header.contains("SameSite=Strict") && header.contains("HttpOnly"));
    assert!(!header.contains("Secure"), "{header}");
    assert!(
        !header.contains("Max-Age"),
        "a browser-session cookie: {header}"
    );
}

#[tokio::test]
async fn malformed_forged_and_unknown_cookies_are_no_session_not_an_error() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node.clone())).await;
    let forged = "A".repeat(43);
    let unknown = unknown_token().to_string();

    for bad in ["", "not a token", "%%%", forged.as_str(), unknown.as_str()] {
        let reply = send("GET", &format!("{url}/get/cart"), Some(&cookie(bad))).await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "none"),
            "{bad:?}"
        );
        assert!(reply.set_cookie.is_empty());
        // A write behind a bad cookie starts a new session rather than failing.
        let reply = send("POST", &format!("{url}/set/cart/pears"), Some(&cookie(bad))).await;
        assert_eq!(reply.status, StatusCode::OK, "{bad:?}");
        assert_ne!(reply.token(), bad);
    }
}

#[tokio::test]
async fn an_expired_session_cookie_is_no_session() {
    let db = TestDatabase::create().await;
    let short = pgsession::Config {
        session_ttl: Duration::from_secs(1),
        ..config()
    };
    let node = node(&db, short).await;
    let url = serve(SessionLayer::new(node)).await;
    let token = send("POST", &format!("{url}/set/cart/figs"), None)
        .await
        .token();
    // Expiry is a point in time: waiting for it is the subject, not synchronisation.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let reply = send("GET", &format!("{url}/get/cart"), Some(&cookie(&token))).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "none")
    );
}

#[tokio::test]
async fn two_concurrent_requests_changing_different_keys_both_keep_their_change() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;
    let token = send("POST", &format!("{url}/set/base/x"), None)
        .await
        .token();
    let jar = cookie(&token);

    let (left, right) = (
        format!("{url}/together/left/1"),
        format!("{url}/together/right/2"),
    );
    let (a, b) = tokio::join!(
        send("POST", &left, Some(&jar)),
        send("POST", &right, Some(&jar)),
    );
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));

    for (key, value) in [("left", "1"), ("right", "2"), ("base", "x")] {
        let reply = send("GET", &format!("{url}/get/{key}"), Some(&jar)).await;
        assert_eq!(reply.body, value, "{key} kept");
    }
}

#[tokio::test]
async fn changes_are_not_saved_on_a_server_error_response() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;
    let token = send("POST", &format!("{url}/set/cart/plums"), None)
        .await
        .token();
    let jar = cookie(&token);

    let failed = send("POST", &format!("{url}/fail/cart/stolen"), Some(&jar)).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let failed_new = send("POST", &format!("{url}/fail/cart/ghost"), None).await;
    assert!(
        failed_new.set_cookie.is_empty(),
        "no session created for a 5xx"
    );

    let reply = send("GET", &format!("{url}/get/cart"), Some(&jar)).await;
    assert_eq!(reply.body, "plums");
    assert_eq!(count_rows(&pool(&db).await).await, 1);
}

#[tokio::test]
async fn login_rotates_the_cookie_keeps_the_visitors_data_and_retires_the_old_token() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;
    let visitor = send("POST", &format!("{url}/set/cart/kiwis"), None)
        .await
        .token();

    let login = send(
        "POST",
        &format!("{url}/login/alice"),
        Some(&cookie(&visitor)),
    )
    .await;
    assert_eq!(login.status, StatusCode::OK);
    let logged_in = login.token();
    assert_ne!(
        logged_in, visitor,
        "a new token at login (session fixation)"
    );

    let who = send("GET", &format!("{url}/whoami"), Some(&cookie(&logged_in))).await;
    assert_eq!(who.body, "alice");
    let cart = send("GET", &format!("{url}/get/cart"), Some(&cookie(&logged_in))).await;
    assert_eq!(cart.body, "kiwis");
    let old = send("GET", &format!("{url}/whoami"), Some(&cookie(&visitor))).await;
    assert_eq!(
        old.body, "nobody",
        "the visitor's token opens nothing any more"
    );

    let rotated = send("POST", &format!("{url}/rotate"), Some(&cookie(&logged_in))).await;
    let newer = rotated.token();
    assert_ne!(newer, logged_in);
    let who = send("GET", &format!("{url}/whoami"), Some(&cookie(&newer))).await;
    assert_eq!(who.body, "alice");
}

#[tokio::test]
async fn login_without_a_session_creates_one_for_the_user() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;

    let token = send("POST", &format!("{url}/login/bob"), None)
        .await
        .token();
    let who = send("GET", &format!("{url}/whoami"), Some(&cookie(&token))).await;
    assert_eq!(who.body, "bob");
}

#[tokio::test]
async fn logout_deletes_the_session_and_removes_the_cookie() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;
    let token = send("POST", &format!("{url}/login/carol"), None)
        .await
        .token();

    let out = send("POST", &format!("{url}/logout"), Some(&cookie(&token))).await;
    assert_eq!(out.body, "true");
    assert_eq!(out.token(), "", "the removal cookie has no value");
    assert!(out.set_cookie[0].contains("Max-Age=0"));
    assert_eq!(count_rows(&pool(&db).await).await, 0);
    let who = send("GET", &format!("{url}/whoami"), Some(&cookie(&token))).await;
    assert_eq!(who.body, "nobody");

    let nothing = send("POST", &format!("{url}/logout"), None).await;
    assert!(
        nothing.set_cookie.is_empty(),
        "no removal for a browser without a cookie"
    );
}

#[tokio::test]
async fn logout_everywhere_on_one_node_ends_the_users_sessions_on_the_other() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let url_a = serve(SessionLayer::new(a)).await;
    let url_b = serve(SessionLayer::new(b)).await;
    let laptop = send("POST", &format!("{url_a}/login/dave"), None)
        .await
        .token();
    let phone = send("POST", &format!("{url_b}/login/dave"), None)
        .await
        .token();
    // Node A caches the laptop's session.
    let who = send("GET", &format!("{url_a}/whoami"), Some(&cookie(&laptop))).await;
    assert_eq!(who.body, "dave");

    let out = send(
        "POST",
        &format!("{url_b}/logout-everywhere"),
        Some(&cookie(&phone)),
    )
    .await;
    assert_eq!(out.body, "2");
    assert_eq!(out.token(), "");

    let laptop_cookie = cookie(&laptop);
    eventually(
        Duration::from_secs(1),
        "node A drops the laptop's session",
        || {
            let url = format!("{url_a}/whoami");
            let jar = laptop_cookie.clone();
            async move { send("GET", &url, Some(&jar)).await.body == "nobody" }
        },
    )
    .await;
}

#[tokio::test]
async fn a_save_the_database_refuses_is_a_500_and_writes_nothing() {
    let db = TestDatabase::create().await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    // The pool goes through the proxy; the listener does not, so the cache stays trusted and
    // the handler's read is a hit: what fails is the save after the handler.
    let pool_through = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&proxy.proxied_url(db.url()))
        .await
        .expect("pool");
    let node = SessionManager::new(
        pgsession::Config {
            listen_url: Some(db.url().to_owned()),
            ..config()
        },
        pool_through,
    )
    .await
    .expect("manager");
    let node = listening(node).await;
    let url = serve(SessionLayer::new(node)).await;
    let token = send("POST", &format!("{url}/set/cart/limes"), None)
        .await
        .token();
    let jar = cookie(&token);
    assert_eq!(
        send("GET", &format!("{url}/get/cart"), Some(&jar))
            .await
            .body,
        "limes"
    );

    proxy.refuse_new(true);
    proxy.disconnect_all();
    let failed = send("POST", &format!("{url}/set/cart/lemons"), Some(&jar)).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(failed.set_cookie.is_empty());
    let stored: serde_json::Value = sqlx::query_scalar("SELECT attributes->'cart' FROM sessions")
        .fetch_one(&pool(&db).await)
        .await
        .expect("row");
    assert_eq!(stored, serde_json::json!("limes"), "nothing written");

    proxy.refuse_new(false);
    // The node learns within a probe interval (250 ms at most) that the server is back.
    eventually(
        Duration::from_secs(5),
        "works again once the database is back",
        || async {
            send("POST", &format!("{url}/set/cart/lemons"), Some(&jar))
                .await
                .status
                == StatusCode::OK
        },
    )
    .await;
}

#[tokio::test]
async fn sessions_record_the_clients_address_and_user_agent() {
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;

    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let layer = SessionLayer::new(node.clone())
        .with_secure(false)
        .with_client_ip(|_, extensions| {
            extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = app(layer).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    let url = format!("http://{addr}");

    let client = reqwest::Client::new();
    let first = client
        .post(format!("{url}/login/alice"))
        .header("user-agent", "pgsession-test/1.0 (loopback)")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let listed = node.list_user_sessions("alice").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].ip(), Some("127.0.0.1".parse().unwrap()));
    assert_eq!(
        listed[0].user_agent(),
        Some("pgsession-test/1.0 (loopback)")
    );

    // Without a way to find the address, only the User-Agent is recorded.
    let plain = serve(SessionLayer::new(node.clone()).with_secure(false)).await;
    client
        .post(format!("{plain}/login/bob"))
        .header("user-agent", "other/2")
        .send()
        .await
        .unwrap();
    let listed = node.list_user_sessions("bob").await.unwrap();
    assert_eq!(
        (listed[0].ip(), listed[0].user_agent()),
        (None, Some("other/2"))
    );
}

#[tokio::test]
async fn the_layer_runs_on_an_in_memory_manager() {
    let manager = SessionManager::in_memory(config()).await.unwrap();
    let url = serve(SessionLayer::new(manager.clone()).with_secure(false)).await;
    let set = send("POST", &format!("{url}/set/cart/apples"), None).await;
    let token = set.token();
    let read = send("GET", &format!("{url}/get/cart"), Some(&cookie(&token))).await;
    assert_eq!(read.body, "apples");
    let login = send("POST", &format!("{url}/login/alice"), Some(&cookie(&token))).await;
    let who = send(
        "GET",
        &format!("{url}/whoami"),
        Some(&cookie(&login.token())),
    )
    .await;
    assert_eq!(who.body, "alice");
    assert_eq!(manager.list_user_sessions("alice").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_foreign_cookie_that_is_not_ascii_does_not_log_the_user_out() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;
    let token = send("POST", &format!("{url}/login/erin"), None)
        .await
        .token();

    let utf8 = format!("theme=caf\u{e9}; id={token}; lang=fr");
    let latin1 = [b"theme=caf\xe9; ".as_slice(), cookie(&token).as_bytes()].concat();
    for header in [utf8.as_bytes(), latin1.as_slice()] {
        let who = send_bytes("GET", &format!("{url}/whoami"), Some(header)).await;
        assert_eq!(who.body, "erin", "{:?}", String::from_utf8_lossy(header));
    }
}

#[tokio::test]
async fn of_several_cookies_of_our_name_the_first_that_opens_a_session_wins() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node)).await;
    let frank = send("POST", &format!("{url}/login/frank"), None)
        .await
        .token();
    let grace = send("POST", &format!("{url}/login/grace"), None)
        .await
        .token();
    // One tossed from a sibling subdomain, then malformed, then ours, then another valid one.
    let header = format!("id={}; id=junk; id={frank}; id={grace}", unknown_token());

    let who = send("GET", &format!("{url}/whoami"), Some(&header)).await;
    assert_eq!(who.body, "frank");
    // A write goes to the session that opened, and the cookie re-sent is that one's.
    let wrote = send("POST", &format!("{url}/set/k/v"), Some(&header)).await;
    let resent = wrote.token();
    assert_eq!(resent.split('.').next(), frank.split('.').next());
    let read = send("GET", &format!("{url}/get/k"), Some(&cookie(&frank))).await;
    assert_eq!(read.body, "v");
}

#[tokio::test]
async fn a_host_prefixed_cookie_is_set_secure_for_the_whole_host() {
    let db = TestDatabase::create().await;
    let node = node(&db, config()).await;
    let url = serve(SessionLayer::new(node).with_cookie_name("__Host-id")).await;

    let created = send("POST", &format!("{url}/set/k/v"), None).await;
    let header = &created.set_cookie[0];
    assert!(header.starts_with("__Host-id="), "{header}");
    assert!(
        header.contains("; Secure") && header.contains("; Path=/;"),
        "{header}"
    );
    assert!(!header.contains("Domain"), "{header}");
    let value = header
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("__Host-id=");
    let read = send(
        "GET",
        &format!("{url}/get/k"),
        Some(&format!("__Host-id={value}")),
    )
    .await;
    assert_eq!(read.body, "v");
}

#[tokio::test]
#[should_panic(expected = "__Host-")]
async fn a_host_prefixed_cookie_with_a_domain_is_refused_when_the_layer_is_built() {
    let manager = SessionManager::in_memory(config())
        .await
        .expect("in-memory manager");
    let _ = app(SessionLayer::new(manager)
        .with_cookie_name("__Host-id")
        .with_domain("example.test"));
}

/// A client writing on node A and at once reading on node B (which has the session cached
/// and hears of A's write only later) is served its write every time: the cookie carries the
/// version, and B reads through when its copy is older.
#[tokio::test]
async fn a_client_reads_its_own_write_on_another_node_at_once() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let (url_a, url_b) = (
        serve(SessionLayer::new(a)).await,
        serve(SessionLayer::new(b.clone())).await,
    );
    let mut jar = cookie(
        &send("POST", &format!("{url_a}/set/n/0"), None)
            .await
            .token(),
    );
    assert_eq!(
        send("GET", &format!("{url_b}/get/n"), Some(&jar))
            .await
            .body,
        "0"
    );
    let bare = |jar: &str| jar.split('.').next().unwrap().to_owned();

    let (mut stale, mut stale_without_version) = (0, 0);
    for i in 1..=1000 {
        let wrote = send("POST", &format!("{url_a}/set/n/{i}"), Some(&jar)).await;
        assert_eq!(wrote.status, StatusCode::OK);
        jar = cookie(&wrote.token());
        // The same client's next request, sent to B back to back.
        if i % 2 == 0 {
            let read = send("GET", &format!("{url_b}/get/n"), Some(&jar)).await;
            stale += usize::from(read.body != i.to_string());
        } else {
            let read = send("GET", &format!("{url_b}/get/n"), Some(&bare(&jar))).await;
            stale_without_version += usize::from(read.body != i.to_string());
        }
    }
    eprintln!(
        "stale reads on B: {stale} of 500 with the version in the cookie, \
         {stale_without_version} of 500 without"
    );
    assert_eq!(stale, 0, "reads on B older than the client's own write");
    // Reads send no cookie, whatever version theirs carried; writes send the new version.
    let read = send("GET", &format!("{url_b}/get/n"), Some(&bare(&jar))).await;
    assert!(read.set_cookie.is_empty(), "{:?}", read.set_cookie);
    let wrote = send("POST", &format!("{url_b}/set/n/x"), Some(&bare(&jar))).await;
    assert!(wrote.token().ends_with(".1002"), "{}", wrote.token());
}

/// 200 concurrent counts from one client, spread over two nodes, end at exactly 200.
#[tokio::test]
async fn concurrent_counts_from_one_client_on_two_nodes_lose_none() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let urls = [
        serve(SessionLayer::new(a)).await,
        serve(SessionLayer::new(b)).await,
    ];
    let jar = cookie(
        &send("POST", &format!("{}/count", urls[0]), None)
            .await
            .token(),
    );

    let counts = (0..200).map(|i| {
        let url = format!("{}/count", urls[i % 2]);
        let jar = jar.clone();
        tokio::spawn(async move { send("POST", &url, Some(&jar)).await })
    });
    for reply in futures_join(counts).await {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }
    let last = send("POST", &format!("{}/count", urls[1]), Some(&jar)).await;
    assert_eq!(last.body, "202", "1 + 200 + 1 counts");
}

async fn futures_join<T: Send + 'static>(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        out.push(task.await.expect("task"));
    }
    out
}
