//! The actix-session store behind actix-session's own `SessionMiddleware` and actix-identity,
//! in actix-web apps served over loopback HTTP: two instances, each with its own node, on one
//! database, staying coherent (logins, values, logouts, read-your-writes); the cookie guard's
//! repairs, shown against what actix-web does without it; concurrent deltas, sessions deleted
//! during a request, forged tokens; and the store's API (exact values, expiry).
#![cfg(feature = "actix-session")]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use actix_identity::{Identity, IdentityMiddleware};
use actix_session::storage::{SessionKey, SessionStore};
use actix_session::{Session, SessionMiddleware};
use actix_web::cookie::time::Duration as Ttl;
use actix_web::cookie::{Cookie, CookieJar, Key};
use actix_web::dev::ServerHandle;
use actix_web::error::ErrorInternalServerError;
use actix_web::middleware::Condition;
use actix_web::{App, HttpMessage, HttpRequest, HttpServer, web};
use common::*;
use pgsession::actix_session::{ACTIX_IDENTITY_USER_KEY, PgSessionStore, TEXT_MEMBER};
use pgsession::{Clock, Config, SessionEventKind, SessionManager, SessionToken, SigningKey};
use reqwest::Method;
use reqwest::header::{COOKIE, HeaderValue, SET_COOKIE};
use serde_json::json;
use tokio::sync::{Barrier, OnceCell};

/// The database every test shares; each looks only at its own sessions and users.
async fn shared_db() -> &'static TestDatabase {
    static DB: OnceCell<TestDatabase> = OnceCell::const_new();
    DB.get_or_init(TestDatabase::create).await
}

// ---------------------------------------------------------------------------------------------
// The application under test

/// Where requests of `/slow/{key}/...` wait, so that a test can act while they hold their
/// loaded session and have not saved it yet: every party (the requests and the test) meets at
/// `arrived`; then each request waits for the test at the barrier of its key in `go`, if any.
struct Gate {
    arrived: Barrier,
    go: HashMap<String, Barrier>,
}

impl Gate {
    fn new(parties: usize, keys: &[&str]) -> Arc<Gate> {
        Arc::new(Gate {
            arrived: Barrier::new(parties),
            go: keys
                .iter()
                .map(|k| ((*k).to_owned(), Barrier::new(2)))
                .collect(),
        })
    }

    /// Let the request changing `key` go on.
    async fn release(&self, key: &str) {
        self.go[key].wait().await;
    }
}

const ANONYMOUS: &str = "anonymous";
const USER_AGENT: &str = "actix-session-test/1.0";
const ABSENT: &str = "(none)";

async fn me(user: Option<Identity>) -> actix_web::Result<String> {
    Ok(match user {
        Some(user) => user.id()?,
        None => ANONYMOUS.to_owned(),
    })
}

async fn log_in(request: HttpRequest, user: web::Path<String>) -> actix_web::Result<String> {
    Identity::login(&request.extensions(), user.into_inner())?;
    Ok("welcome".to_owned())
}

async fn log_out(user: Identity) -> &'static str {
    user.logout();
    "bye"
}

async fn log_out_everywhere(
    user: Identity,
    manager: web::Data<SessionManager>,
) -> actix_web::Result<String> {
    let ended = manager
        .delete_all_user_sessions(user.id()?)
        .await
        .map_err(ErrorInternalServerError)?;
    user.logout();
    Ok(ended.to_string())
}

async fn count(session: Session) -> actix_web::Result<String> {
    // Not `update_or`: actix-session 0.11's `Session::update` changes the value without
    // marking the session changed, so an update of an existing key alone is never saved.
    let n = session.get::<u64>("n")?.unwrap_or(0) + 1;
    session.insert("n", n)?;
    Ok(n.to_string())
}

async fn counter(session: Session) -> actix_web::Result<String> {
    Ok(session.get::<u64>("n")?.unwrap_or(0).to_string())
}

async fn put_value(
    session: Session,
    path: web::Path<(String, String)>,
) -> actix_web::Result<&'static str> {
    let (key, value) = path.into_inner();
    session.insert(key, value)?;
    Ok("stored")
}

async fn value(session: Session, key: web::Path<String>) -> actix_web::Result<String> {
    Ok(session
        .get::<String>(&key)?
        .unwrap_or_else(|| ABSENT.to_owned()))
}

async fn remove_value(session: Session, key: web::Path<String>) -> &'static str {
    session.remove(&key);
    "removed"
}

/// Set a value, then wait at the gate before the response (and so the save) goes out.
async fn put_slowly(
    session: Session,
    path: web::Path<(String, String)>,
    gate: web::Data<Arc<Gate>>,
) -> actix_web::Result<&'static str> {
    let (key, value) = path.into_inner();
    session.insert(key.clone(), value)?;
    gate.arrived.wait().await;
    if let Some(go) = gate.go.get(&key) {
        go.wait().await;
    }
    Ok("stored")
}

/// A cookie of another application, as the app sees it.
async fn other_cookie(request: HttpRequest, name: web::Path<String>) -> String {
    request
        .cookie(&name)
        .map_or_else(|| ABSENT.to_owned(), |c| c.value().to_owned())
}

/// One instance of the app: its node's store, served on a free loopback port.
struct Instance {
    base: String,
    store: PgSessionStore,
    server: ServerHandle,
}

impl Instance {
    fn manager(&self) -> &SessionManager {
        self.store.manager()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn stop(self) {
        self.server.stop(true).await;
    }
}

/// How an instance is set up.
#[derive(Clone)]
struct Setup {
    key: Key,
    guard: bool,
    gate: Arc<Gate>,
}

impl Setup {
    /// The recommended setup: the guard outside actix-session.
    fn guarded(key: &Key) -> Setup {
        Setup {
            key: key.clone(),
            guard: true,
            gate: Gate::new(1, &[]),
        }
    }
}

/// The app on a new node of the shared database with `config`.
async fn start(config: Config, setup: Setup) -> Instance {
    let store = PgSessionStore::new(node(shared_db().await, config).await);
    let served = store.clone();
    let server = HttpServer::new(move || {
        let Setup { key, guard, gate } = setup.clone();
        App::new()
            .app_data(web::Data::new(served.manager().clone()))
            .app_data(web::Data::new(gate))
            .route("/me", web::get().to(me))
            .route("/login/{user}", web::post().to(log_in))
            .route("/logout", web::post().to(log_out))
            .route("/logout-everywhere", web::post().to(log_out_everywhere))
            .route("/counter", web::post().to(count))
            .route("/counter", web::get().to(counter))
            .route("/values/{key}/{value}", web::put().to(put_value))
            .route("/values/{key}", web::get().to(value))
            .route("/values/{key}", web::delete().to(remove_value))
            .route("/slow/{key}/{value}", web::put().to(put_slowly))
            .route("/cookies/{name}", web::get().to(other_cookie))
            .wrap(IdentityMiddleware::default())
            .wrap(
                SessionMiddleware::builder(served.clone(), key.clone())
                    .cookie_secure(false)
                    .build(),
            )
            .wrap(Condition::new(guard, served.cookie_guard(key)))
    })
    .workers(2)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .expect("a free port");
    let base = format!("http://{}", server.addrs()[0]);
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    Instance {
        base,
        store,
        server: handle,
    }
}

/// Two instances of the app, each on its own node, both with `setup`.
async fn pair(setup: Setup) -> (Instance, Instance) {
    let a = start(config(), setup.clone()).await;
    let b = start(config(), setup).await;
    (a, b)
}

// ---------------------------------------------------------------------------------------------
// The client

/// What came back.
struct Reply {
    status: reqwest::StatusCode,
    body: String,
    /// `Some(None)` for a removal of the session cookie, `Some(Some("id=..."))` for a new one.
    session_cookie: Option<Option<String>>,
}

/// An HTTP client holding the session cookie, as a browser would.
struct Browser {
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .build()
                .expect("a client"),
            cookie: None,
        }
    }

    /// Send with exactly the `Cookie` header given (any bytes), or none.
    async fn send(&self, method: Method, url: &str, cookie: Option<&[u8]>) -> Reply {
        let mut request = self.http.request(method, url);
        if let Some(cookie) = cookie {
            let value = HeaderValue::from_bytes(cookie).expect("a sendable Cookie header");
            request = request.header(COOKIE, value);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status();
        let mut session_cookie = None;
        for header in response.headers().get_all(SET_COOKIE) {
            let text = header.to_str().expect("an ASCII Set-Cookie");
            let pair = text.split(';').next().unwrap_or_default().trim();
            if let Some(value) = pair.strip_prefix("id=") {
                session_cookie = Some((!value.is_empty()).then(|| pair.to_owned()));
            }
        }
        let body = response.text().await.expect("a body");
        Reply {
            status,
            body,
            session_cookie,
        }
    }

    /// A request with this browser's cookie; keeps what the reply sets; the body of a 200.
    async fn go(&mut self, method: Method, url: &str) -> String {
        let cookie = self.cookie.clone();
        let reply = self
            .send(method, url, cookie.as_deref().map(str::as_bytes))
            .await;
        assert_eq!(reply.status, 200, "{url}: {}", reply.body);
        if let Some(set) = reply.session_cookie {
            self.cookie = set;
        }
        reply.body
    }

    async fn get(&mut self, url: &str) -> String {
        self.go(Method::GET, url).await
    }

    async fn post(&mut self, url: &str) -> String {
        self.go(Method::POST, url).await
    }

    async fn put(&mut self, url: &str) -> String {
        self.go(Method::PUT, url).await
    }

    /// The session cookie held now (`id=...`).
    fn cookie(&self) -> String {
        self.cookie.clone().expect("a session cookie")
    }
}

/// Wait (at most 5 s) for this node's next update of a session.
async fn saved_here(events: &mut tokio::sync::broadcast::Receiver<pgsession::SessionEvent>) {
    loop {
        let e = tokio::time::timeout(StdDuration::from_secs(5), events.recv())
            .await
            .expect("an update within 5 s")
            .expect("no lag");
        if e.kind == SessionEventKind::Updated && e.origin == pgsession::Origin::ThisNode {
            return;
        }
    }
}

/// The session key (`<token>.<version>`) inside a session cookie `id=...`.
fn session_key_in(cookie: &str, key: &Key) -> String {
    let mut jar = CookieJar::new();
    jar.add_original(Cookie::parse_encoded(cookie.to_owned()).expect("a cookie"));
    jar.private(key)
        .get("id")
        .expect("a cookie of this key")
        .value()
        .to_owned()
}

/// The pgsession token inside a session cookie.
fn token_in(cookie: &str, key: &Key) -> SessionToken {
    let session_key = session_key_in(cookie, key);
    let (token, _version) = session_key.rsplit_once('.').expect("<token>.<version>");
    token.parse().expect("a token")
}

/// The session cookie (`id=...`) actix-session would send for `session_key` under `key`.
fn cookie_for(session_key: &str, key: &Key) -> String {
    let mut jar = CookieJar::new();
    jar.private_mut(key)
        .add(Cookie::new("id", session_key.to_owned()));
    let cookie = jar.delta().next().expect("the cookie added");
    cookie.encoded().stripped().to_string()
}

// ---------------------------------------------------------------------------------------------
// Two instances staying coherent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_one_instance_is_seen_on_the_other_and_binds_the_session_to_the_user() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    assert_eq!(browser.get(&b.url("/me")).await, ANONYMOUS);
    browser.post(&a.url("/login/alice-login")).await;
    assert_eq!(browser.get(&b.url("/me")).await, "alice-login");

    let sessions = b.manager().list_user_sessions("alice-login").await.unwrap();
    assert_eq!(sessions.len(), 1, "one session, bound to the user");
    assert_eq!(
        sessions[0].ip(),
        Some("127.0.0.1".parse().unwrap()),
        "the client recorded by the guard"
    );
    assert_eq!(sessions[0].user_agent(), Some(USER_AGENT));
    assert_eq!(
        sessions[0].get(ACTIX_IDENTITY_USER_KEY),
        Some(&json!("alice-login")),
        "actix-identity's value, as real JSON"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_incremented_on_one_instance_is_read_on_the_other() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    for n in 1..=3 {
        assert_eq!(browser.post(&a.url("/counter")).await, n.to_string());
    }
    assert_eq!(browser.get(&b.url("/counter")).await, "3");
    assert_eq!(browser.post(&b.url("/counter")).await, "4");
    assert_eq!(browser.get(&a.url("/counter")).await, "4");
    let token = token_in(&browser.cookie(), &key);
    let stored = a
        .manager()
        .get_session_fresh(&token)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get("n"), Some(&json!(4)), "stored as a JSON number");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_instance_is_seen_on_the_other() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    browser.post(&a.url("/login/lou-logout")).await;
    let cookie = browser.cookie();
    assert_eq!(
        browser.get(&b.url("/me")).await,
        "lou-logout",
        "b caches it"
    );
    let mut events = b.manager().subscribe_events();
    browser.post(&a.url("/logout")).await;
    assert_eq!(browser.cookie, None, "the cookie is removed");
    heard_from_other_node(&mut events, SessionEventKind::Deleted).await;
    // The old cookie, replayed on the other instance, opens nothing.
    let replayed = browser
        .send(Method::GET, &b.url("/me"), Some(cookie.as_bytes()))
        .await;
    assert_eq!(replayed.body, ANONYMOUS);
    assert_eq!(
        b.manager().count_user_sessions("lou-logout").await.unwrap(),
        0
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_everywhere_on_one_instance_ends_every_session_of_the_user_on_the_other() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    let (mut laptop, mut phone) = (Browser::new(), Browser::new());
    laptop.post(&a.url("/login/bea-everywhere")).await;
    phone.post(&b.url("/login/bea-everywhere")).await;
    assert_eq!(laptop.get(&a.url("/me")).await, "bea-everywhere");
    assert_eq!(phone.get(&a.url("/me")).await, "bea-everywhere");
    let mut events = a.manager().subscribe_events();

    assert_eq!(phone.post(&b.url("/logout-everywhere")).await, "2");
    heard_from_other_node(&mut events, SessionEventKind::UserLoggedOutEverywhere).await;
    assert_eq!(laptop.get(&a.url("/me")).await, ANONYMOUS);
    assert_eq!(phone.get(&a.url("/me")).await, ANONYMOUS);
    assert_eq!(
        a.manager()
            .count_user_sessions("bea-everywhere")
            .await
            .unwrap(),
        0
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_instance_is_read_at_once_on_the_other_500_times_out_of_500() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    browser.put(&a.url("/values/v/0")).await;
    let mut stale = Vec::new();
    for i in 1..=500 {
        browser.put(&a.url(&format!("/values/v/{i}"))).await;
        // B has the previous version cached (it served it just before); the notification
        // of this write may still be on its way.
        let seen = browser.get(&b.url("/values/v")).await;
        if seen != i.to_string() {
            stale.push((i, seen));
        }
    }
    assert_eq!(stale, [], "stale reads (write, what B served)");
    a.stop().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Cookies actix-web alone gets wrong

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_cookie_that_is_not_ascii_keeps_the_session() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    browser.post(&a.url("/login/cyd-foreign")).await;
    let ours = browser.cookie();
    let headers: [Vec<u8>; 4] = [
        [b"theme=caf\xe9; ".as_slice(), ours.as_bytes()].concat(), // latin-1
        [ours.as_bytes(), b"; \xff\xfe=\xff".as_slice()].concat(), // not even latin-1 text
        format!("theme=caf\u{e9}; {ours}").into_bytes(),           // UTF-8
        format!("{ours}; lang=\u{65e5}\u{672c}").into_bytes(),     // UTF-8, not latin-1
    ];
    for header in &headers {
        let reply = browser.send(Method::GET, &b.url("/me"), Some(header)).await;
        assert_eq!(
            reply.body,
            "cyd-foreign",
            "{}",
            String::from_utf8_lossy(header)
        );
    }
    // The app still sees the other cookies that are UTF-8, as sent.
    let reply = browser
        .send(Method::GET, &b.url("/cookies/theme"), Some(&headers[2]))
        .await;
    assert_eq!(reply.body, "caf\u{e9}");
    // A write beside a latin-1 cookie goes to the session too.
    let latin1 = [ours.as_bytes(), b"; theme=caf\xe9".as_slice()].concat();
    let reply = browser
        .send(Method::POST, &a.url("/counter"), Some(&latin1))
        .await;
    assert_eq!(reply.body, "1");
    let token = token_in(&ours, &key);
    let sessions = a.manager().list_user_sessions("cyd-foreign").await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        sessions[0].id(),
        token.id(),
        "the same session, not a new one"
    );
    assert_eq!(sessions[0].get("n"), Some(&json!(1)));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_cookies_of_our_name_the_first_that_opens_a_session_wins_even_when_second() {
    let key = Key::generate();
    let (a, b) = pair(Setup::guarded(&key)).await;
    // A stale cookie: properly encrypted, its session logged out.
    let mut old = Browser::new();
    old.post(&a.url("/login/dee-stale")).await;
    let stale = old.cookie();
    old.post(&a.url("/logout")).await;
    let mut live = Browser::new();
    live.post(&a.url("/login/dee-live")).await;
    let valid = live.cookie();
    // One actix-session cannot open (a key it never set), and one of another cookie key.
    let garbage = "id=not-a-session";
    let foreign_key = cookie_for(&session_key_in(&valid, &key), &Key::generate());

    for header in [
        format!("{stale}; {valid}"),
        format!("{garbage}; {valid}"),
        format!("{foreign_key}; {valid}"),
        format!("{valid}; {stale}"),
        format!("{stale}; theme=dark; {garbage}; {valid}"),
    ] {
        let reply = live
            .send(Method::GET, &b.url("/me"), Some(header.as_bytes()))
            .await;
        assert_eq!(reply.body, "dee-live", "{header}");
    }
    // A write goes to the session that opened, whose cookie comes back.
    let header = format!("{stale}; {valid}");
    let reply = live
        .send(Method::POST, &b.url("/counter"), Some(header.as_bytes()))
        .await;
    assert_eq!(reply.body, "1");
    let set = reply
        .session_cookie
        .flatten()
        .expect("the cookie set again");
    assert_eq!(token_in(&set, &key), token_in(&valid, &key));
    live.cookie = Some(set);
    assert_eq!(live.get(&a.url("/counter")).await, "1");
    a.stop().await;
    b.stop().await;
}

/// What the guard is for: actix-session alone, on actix-web's cookie parsing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_guard_actix_drops_the_session_beside_a_latin1_cookie_or_behind_a_stale_one() {
    let key = Key::generate();
    let setup = Setup {
        guard: false,
        ..Setup::guarded(&key)
    };
    let a = start(config(), setup).await;
    let mut browser = Browser::new();
    browser.post(&a.url("/login/eli-unguarded")).await;
    let ours = browser.cookie();
    let mut stale_browser = Browser::new();
    stale_browser.post(&a.url("/login/eli-stale")).await;
    let stale = stale_browser.cookie();
    stale_browser.post(&a.url("/logout")).await;

    let me = |header: Vec<u8>| {
        let (browser, url) = (&browser, a.url("/me"));
        async move { browser.send(Method::GET, &url, Some(&header)).await.body }
    };
    // UTF-8 that is not ASCII: fine.
    assert_eq!(
        me(format!("theme=caf\u{e9}; {ours}").into_bytes()).await,
        "eli-unguarded"
    );
    // Latin-1: `HttpRequest::cookies()` fails for the whole header, so no session.
    let latin1 = [b"theme=caf\xe9; ".as_slice(), ours.as_bytes()].concat();
    assert_eq!(me(latin1).await, ANONYMOUS);
    // Two of our name: only the first is tried.
    assert_eq!(me(format!("{stale}; {ours}").into_bytes()).await, ANONYMOUS);
    assert_eq!(
        me(format!("{ours}; {stale}").into_bytes()).await,
        "eli-unguarded"
    );
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Concurrency, deletions during a request, forgeries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_changing_different_keys_both_keep_their_change_on_one_or_two_instances()
 {
    let key = Key::generate();
    let gate = Gate::new(3, &["x", "y"]); // two requests and this test
    let setup = Setup {
        gate: Arc::clone(&gate),
        ..Setup::guarded(&key)
    };
    let (a, b) = pair(setup).await;
    let mut browser = Browser::new();
    browser.post(&a.url("/login/fay-concurrent")).await;
    browser.put(&a.url("/values/x/0")).await;
    browser.put(&a.url("/values/y/0")).await;
    let cookie = browser.cookie();
    let token = token_in(&cookie, &key);

    // Both requests load the session and change their key; x saves, then y. On one
    // instance, y's save then finds x's write in the cache: only a delta from what y loaded
    // keeps it. Then across the two instances.
    let mut events = a.manager().subscribe_events();
    for (round, second) in [(1, &a), (2, &b)] {
        let x = a.url(&format!("/slow/x/{round}"));
        let y = second.url(&format!("/slow/y/{round}"));
        let (on_x, on_y, ()) = tokio::join!(
            browser.send(Method::PUT, &x, Some(cookie.as_bytes())),
            browser.send(Method::PUT, &y, Some(cookie.as_bytes())),
            async {
                gate.arrived.wait().await;
                gate.release("x").await;
                saved_here(&mut events).await;
                gate.release("y").await;
            }
        );
        assert_eq!((on_x.status.as_u16(), on_y.status.as_u16()), (200, 200));
        let stored = a
            .manager()
            .get_session_fresh(&token)
            .await
            .unwrap()
            .unwrap();
        let round = json!(round.to_string());
        assert_eq!(stored.get("x"), Some(&round), "x's change");
        assert_eq!(stored.get("y"), Some(&round), "y's change");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_does_not_write_back_a_login_ended_everywhere() {
    let key = Key::generate();
    let gate = Gate::new(2, &["k"]);
    let setup = Setup {
        gate: Arc::clone(&gate),
        ..Setup::guarded(&key)
    };
    let a = start(config(), setup).await;
    let mut browser = Browser::new();
    browser.post(&a.url("/login/gus-in-flight")).await;
    let cookie = browser.cookie();

    let url = a.url("/slow/k/v");
    let request = browser.send(Method::PUT, &url, Some(cookie.as_bytes()));
    let meanwhile = async {
        gate.arrived.wait().await;
        let ended = a
            .manager()
            .delete_all_user_sessions("gus-in-flight")
            .await
            .unwrap();
        gate.release("k").await;
        ended
    };
    let (reply, ended) = tokio::join!(request, meanwhile);
    assert_eq!((reply.status.as_u16(), ended), (200, 1));
    assert_eq!(
        a.manager()
            .count_user_sessions("gus-in-flight")
            .await
            .unwrap(),
        0,
        "not written back"
    );
    let after = reply.session_cookie.flatten().unwrap_or(cookie);
    let me = browser
        .send(Method::GET, &a.url("/me"), Some(after.as_bytes()))
        .await;
    assert_eq!(me.body, ANONYMOUS);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_session_deleted_during_a_request_is_saved_anew_with_its_state() {
    let key = Key::generate();
    let gate = Gate::new(2, &["note"]);
    let setup = Setup {
        gate: Arc::clone(&gate),
        ..Setup::guarded(&key)
    };
    let a = start(config(), setup).await;
    let mut browser = Browser::new();
    browser.put(&a.url("/values/cart/apples")).await;
    let cookie = browser.cookie();
    let old = token_in(&cookie, &key);

    let url = a.url("/slow/note/hi");
    let request = browser.send(Method::PUT, &url, Some(cookie.as_bytes()));
    let meanwhile = async {
        gate.arrived.wait().await;
        assert!(a.manager().delete_session(old.id()).await.unwrap());
        gate.release("note").await;
    };
    let (reply, ()) = tokio::join!(request, meanwhile);
    let new = reply
        .session_cookie
        .flatten()
        .expect("a new session's cookie");
    assert_ne!(
        token_in(&new, &key),
        old,
        "a new session, not the deleted one"
    );
    browser.cookie = Some(new);
    assert_eq!(browser.get(&a.url("/values/cart")).await, "apples");
    assert_eq!(browser.get(&a.url("/values/note")).await, "hi");
    assert!(a.manager().get_session_fresh(&old).await.unwrap().is_none());
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_the_user_key_logs_the_session_in_under_a_new_token_and_removing_it_logs_out() {
    let key = Key::generate();
    let a = start(config(), Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    browser.put(&a.url("/values/cart/pears")).await;
    let visitor = token_in(&browser.cookie(), &key);

    // Set without actix-identity's renewal: the store logs the session in itself.
    browser
        .put(&a.url(&format!("/values/{ACTIX_IDENTITY_USER_KEY}/hal-key")))
        .await;
    let member = token_in(&browser.cookie(), &key);
    assert_ne!(member, visitor, "a new token at login");
    assert!(
        a.manager()
            .get_session_fresh(&visitor)
            .await
            .unwrap()
            .is_none()
    );
    let sessions = a.manager().list_user_sessions("hal-key").await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].get("cart"), Some(&json!("pears")), "data kept");
    assert_eq!(browser.get(&a.url("/me")).await, "hal-key");

    // Removed (actix-identity's DeleteIdentityKeys logout): unbound, under a new token.
    browser
        .go(
            Method::DELETE,
            &a.url(&format!("/values/{ACTIX_IDENTITY_USER_KEY}")),
        )
        .await;
    let after = token_in(&browser.cookie(), &key);
    assert_ne!(after, member);
    assert_eq!(a.manager().count_user_sessions("hal-key").await.unwrap(), 0);
    assert_eq!(browser.get(&a.url("/me")).await, ANONYMOUS);
    assert_eq!(browser.get(&a.url("/values/cart")).await, "pears");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_are_counted_and_cost_no_database_read() {
    let key = Key::generate();
    let signed = Config {
        signing_keys: vec![SigningKey::generate()],
        ..config()
    };
    let a = start(signed, Setup::guarded(&key)).await;
    let mut browser = Browser::new();
    browser.post(&a.url("/login/ida-forged")).await;
    assert_eq!(browser.get(&a.url("/me")).await, "ida-forged");

    // Tokens signed with another key, inside cookies the attacker could make only with the
    // cookie key: pgsession's signature is the second line.
    let stranger = SessionManager::in_memory(Config {
        signing_keys: vec![SigningKey::generate()],
        ..Config::default()
    })
    .await
    .unwrap();
    let before = a.manager().stats();
    let forgeries = 3;
    for _ in 0..forgeries {
        let (_, token) = stranger.create_anonymous_session([("x", 1)]).await.unwrap();
        let cookie = cookie_for(&format!("{token}.1"), &key);
        let reply = browser
            .send(Method::GET, &a.url("/me"), Some(cookie.as_bytes()))
            .await;
        assert_eq!(reply.body, ANONYMOUS);
    }
    let after = a.manager().stats();
    assert_eq!(after.forged_tokens - before.forged_tokens, forgeries);
    assert_eq!(after.misses, before.misses, "no database read");
    assert_eq!(after.hits, before.hits, "no cache lookup either");
    a.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The store's API

fn state(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn token_of(session_key: &SessionKey) -> SessionToken {
    let (token, _) = session_key
        .as_ref()
        .rsplit_once('.')
        .expect("<token>.<version>");
    token.parse().expect("a token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_saved_loads_back_exactly_and_other_users_see_real_json() {
    let store = PgSessionStore::new(node(shared_db().await, config()).await);
    let saved = state(&[
        ("n", "5"),
        ("name", r#""ann""#),
        ("user", r#"{"id":7,"roles":["admin"]}"#),
        ("spaced", r#"{ "a": 1 }"#),
        ("unordered", r#"{"b":1,"a":2}"#),
        ("plain", "not json"),
        ("big", "1e16"),
        ("wrapper-look-alike", r#"{"actix-session.text":"x"}"#),
    ]);
    let key = store.save(saved.clone(), &Ttl::hours(1)).await.unwrap();
    assert_eq!(store.load(&key).await.unwrap(), Some(saved.clone()));

    let session = store
        .manager()
        .get_session_fresh(&token_of(&key))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session.get("n"), Some(&json!(5)));
    assert_eq!(session.get("name"), Some(&json!("ann")));
    assert_eq!(
        session.get("user"),
        Some(&json!({"id": 7, "roles": ["admin"]}))
    );
    assert_eq!(
        session.get("spaced"),
        Some(&json!({ TEXT_MEMBER: r#"{ "a": 1 }"# })),
        "a text that would not come back byte for byte is kept as text"
    );

    // An update changes only what differs, and the new key reads back the same way.
    let mut changed = saved.clone();
    changed.insert("n".into(), "6".into());
    changed.remove("plain");
    let key = store
        .update(key, changed.clone(), &Ttl::hours(1))
        .await
        .unwrap();
    assert_eq!(store.load(&key).await.unwrap(), Some(changed));
    assert!(
        key.as_ref().ends_with(".2"),
        "the version written: {}",
        key.as_ref()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_ttl_sets_the_expiry_and_update_ttl_moves_it_only_when_it_lags_by_a_sixteenth() {
    let clock = Clock::manual("2031-05-01T12:00:00Z".parse().unwrap());
    let manager = node(
        shared_db().await,
        Config {
            clock: clock.clone(),
            session_ttl: StdDuration::from_secs(7 * 86_400),
            ..config()
        },
    )
    .await;
    let store = PgSessionStore::new(manager.clone());
    let start = clock.now();
    let hour = Ttl::hours(1);
    let key = store.save(state(&[("k", "1")]), &hour).await.unwrap();
    let token = token_of(&key);
    let expires = |s: &pgsession::Session| s.expires_at();
    let session = manager.get_session(&token).await.unwrap().unwrap();
    assert_eq!(expires(&session), start + chrono::Duration::hours(1));

    // Three minutes on: less than a sixteenth of the hour lost; only the access is recorded.
    clock.advance(StdDuration::from_secs(180));
    let before = manager.stats();
    store.update_ttl(&key, &hour).await.unwrap();
    let after = manager.stats();
    assert_eq!(after.misses, before.misses, "no database read");
    let session = manager.get_session(&token).await.unwrap().unwrap();
    assert_eq!(
        (expires(&session), session.version()),
        (start + chrono::Duration::hours(1), 1)
    );

    // Ten minutes on: moved to an hour from now, in one write.
    clock.advance(StdDuration::from_secs(420));
    store.update_ttl(&key, &hour).await.unwrap();
    let session = manager.get_session_fresh(&token).await.unwrap().unwrap();
    assert_eq!(expires(&session), clock.now() + chrono::Duration::hours(1));
    assert_eq!(session.version(), 2);

    // Never past pgsession's absolute lifetime.
    let key = store
        .save(state(&[("k", "1")]), &Ttl::days(365))
        .await
        .unwrap();
    let session = manager.get_session(&token_of(&key)).await.unwrap().unwrap();
    assert_eq!(
        expires(&session),
        session.created_at() + chrono::Duration::days(7)
    );
}
