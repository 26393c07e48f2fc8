//! The tower-sessions store, behind tower-sessions' own `SessionManagerLayer` in an axum
//! router: first what a visitor sees request by request (cookies, values, ids, expiry), checked
//! against what the database then holds; then two nodes on one database, served over loopback
//! HTTP, staying coherent; then the store's own API (cache hits without I/O, users read from
//! axum-login's data).
#![cfg(feature = "tower-sessions")]

mod common;

#[allow(dead_code)] // its `main` is the example's own
#[path = "../examples/axum_login.rs"]
mod axum_login_example;

use std::time::Duration as StdDuration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, post, put};
use common::*;
use http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use pgsession::tower_sessions::PgSessionStore;
use pgsession::{Config, MaxSessionsPolicy, SessionEvent, SessionEventKind};
use serde_json::json;
use time::{Duration, OffsetDateTime};
use tokio::sync::OnceCell;
use tokio::sync::broadcast::Receiver;
use tower::ServiceExt;
use tower_cookies::Cookie;
use tower_cookies::cookie::SameSite;
use tower_sessions::{Expiry, Session, SessionManagerLayer};
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{ExpiredDeletion, SessionStore};

/// A store over a node of a database of its own (for tests that count every row), leaked so
/// that a test may ignore it.
async fn store(config: Config) -> (PgSessionStore, &'static TestDatabase) {
    let db: &'static TestDatabase = Box::leak(Box::new(TestDatabase::create().await));
    (PgSessionStore::new(node(db, config).await), db)
}

/// The database every web test shares. They look only at the rows of the sessions they made,
/// and wait only for other nodes' writes to those, so they can run side by side on it.
async fn shared_db() -> &'static TestDatabase {
    static DB: OnceCell<TestDatabase> = OnceCell::const_new();
    DB.get_or_init(TestDatabase::create).await
}

/// A store over a new node on the shared database.
async fn shared_store() -> PgSessionStore {
    PgSessionStore::new(node(shared_db().await, config()).await)
}

// ---------------------------------------------------------------------------------------------
// The web application under test

/// What a handler answers for a key the session does not hold.
const ABSENT: &str = "(none)";

type Answer = Result<String, (StatusCode, String)>;

fn failed(e: tower_sessions::session::Error) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn hello(_untouched: Session) -> &'static str {
    "hello"
}

async fn put_number(session: Session, Path((key, n)): Path<(String, i64)>) -> Answer {
    session.insert(&key, n).await.map_err(failed)?;
    Ok("stored".to_owned())
}

async fn put_word(session: Session, Path((key, word)): Path<(String, String)>) -> Answer {
    session.insert(&key, word).await.map_err(failed)?;
    Ok("stored".to_owned())
}

/// The typed read.
async fn number(session: Session, Path(key): Path<String>) -> Answer {
    let n = session.get::<i64>(&key).await.map_err(failed)?;
    Ok(n.map_or_else(|| ABSENT.to_owned(), |n| n.to_string()))
}

/// The untyped read: the JSON text of the value.
async fn value(session: Session, Path(key): Path<String>) -> Answer {
    let v = session.get_value(&key).await.map_err(failed)?;
    Ok(v.map_or_else(|| ABSENT.to_owned(), |v| v.to_string()))
}

async fn take_number(session: Session, Path(key): Path<String>) -> Answer {
    let n = session.remove::<i64>(&key).await.map_err(failed)?;
    Ok(n.map_or_else(|| ABSENT.to_owned(), |n| n.to_string()))
}

async fn take_value(session: Session, Path(key): Path<String>) -> Answer {
    let v = session.remove_value(&key).await.map_err(failed)?;
    Ok(v.map_or_else(|| ABSENT.to_owned(), |v| v.to_string()))
}

async fn cycle(session: Session) -> Answer {
    session.cycle_id().await.map_err(failed)?;
    Ok("cycled".to_owned())
}

async fn log_out(session: Session) -> Answer {
    session.flush().await.map_err(failed)?;
    Ok("bye".to_owned())
}

async fn expire_in(session: Session, Path(ms): Path<i64>) -> &'static str {
    let at = OffsetDateTime::now_utc() + Duration::milliseconds(ms);
    session.set_expiry(Some(Expiry::AtDateTime(at)));
    "dated"
}

async fn expire_with_browser(session: Session) -> &'static str {
    session.set_expiry(Some(Expiry::OnSessionEnd));
    "until the browser closes"
}

type Layer = SessionManagerLayer<PgSessionStore>;

/// The application over `store`, its session layer configured by `configure`.
fn app(store: &PgSessionStore, configure: impl FnOnce(Layer) -> Layer) -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/numbers/{key}", get(number).delete(take_number))
        .route("/numbers/{key}/{n}", put(put_number))
        .route("/words/{key}/{word}", put(put_word))
        .route("/values/{key}", get(value).delete(take_value))
        .route("/cycle", post(cycle))
        .route("/logout", post(log_out))
        .route("/expiry/in/{ms}", post(expire_in))
        .route("/expiry/browser", post(expire_with_browser))
        .layer(configure(SessionManagerLayer::new(store.clone())))
}

/// Sessions end after an idle hour.
fn idle_hour(layer: Layer) -> Layer {
    layer.with_expiry(Expiry::OnInactivity(Duration::hours(1)))
}

/// tower-sessions' default: no expiry configured, so a browser-session cookie.
fn no_expiry(layer: Layer) -> Layer {
    layer
}

// ---------------------------------------------------------------------------------------------
// Driving it

/// Where a site's requests go: into the router directly, or over loopback HTTP to a server.
enum Transport {
    Direct(Router),
    Http {
        base: String,
        client: reqwest::Client,
    },
}

/// The application over one node's store, and the way to reach it.
struct Site {
    store: PgSessionStore,
    transport: Transport,
}

/// What came back: the status, the body, and the session cookie set, if any.
struct Reply {
    status: StatusCode,
    body: String,
    set_cookie: Option<Cookie<'static>>,
}

impl Reply {
    fn new(status: StatusCode, headers: &http::HeaderMap, body: String) -> Reply {
        let mut set: Vec<Cookie<'static>> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|h| {
                let text = h.to_str().expect("an ASCII Set-Cookie").to_owned();
                Cookie::parse(text).expect("a well-formed Set-Cookie")
            })
            .collect();
        assert!(set.len() <= 1, "one cookie at most, got {set:?}");
        Reply {
            status,
            body,
            set_cookie: set.pop(),
        }
    }

    /// The cookie this reply must have set.
    fn cookie(&self) -> Cookie<'static> {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        self.set_cookie.clone().expect("a Set-Cookie")
    }

    /// The body of a successful write to the session behind `sent`, whose cookie it set again.
    fn same_session(&self, sent: &Cookie<'_>) -> &str {
        assert_eq!(self.cookie().value(), sent.value(), "same session");
        &self.body
    }

    /// The body of a successful reply that left the cookie alone.
    fn quietly(&self) -> &str {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        assert!(
            self.set_cookie.is_none(),
            "no Set-Cookie expected, got {:?}",
            self.set_cookie
        );
        &self.body
    }
}

impl Site {
    /// The application on a new node of the shared database, called without a socket.
    async fn direct(configure: impl FnOnce(Layer) -> Layer) -> Site {
        let store = shared_store().await;
        let router = app(&store, configure);
        Site {
            store,
            transport: Transport::Direct(router),
        }
    }

    /// The application on a new node of the shared database, served on 127.0.0.1.
    async fn served(configure: impl FnOnce(Layer) -> Layer) -> Site {
        let store = shared_store().await;
        let router = app(&store, configure);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let base = format!("http://{}", listener.local_addr().expect("bound"));
        tokio::spawn(async move { axum::serve(listener, router).await });
        Site {
            store,
            transport: Transport::Http {
                base,
                client: reqwest::Client::new(),
            },
        }
    }

    async fn send(&self, method: Method, path: &str, cookie: Option<&Cookie<'_>>) -> Reply {
        let cookie = cookie.map(|c| c.stripped().to_string());
        match &self.transport {
            Transport::Direct(router) => {
                let mut request = Request::builder().method(method).uri(path);
                if let Some(cookie) = cookie {
                    request = request.header(header::COOKIE, cookie);
                }
                let request = request.body(Body::empty()).expect("a request");
                let response = router.clone().oneshot(request).await.expect("infallible");
                let status = response.status();
                let headers = response.headers().clone();
                let bytes = response
                    .into_body()
                    .collect()
                    .await
                    .expect("a body")
                    .to_bytes();
                Reply::new(status, &headers, String::from_utf8_lossy(&bytes).into())
            }
            Transport::Http { base, client } => {
                let mut request = client.request(method, format!("{base}{path}"));
                if let Some(cookie) = cookie {
                    request = request.header(header::COOKIE, cookie);
                }
                let response = request.send().await.expect("the server answers");
                let status = response.status();
                let headers = response.headers().clone();
                Reply::new(status, &headers, response.text().await.expect("a body"))
            }
        }
    }

    async fn get(&self, path: &str, cookie: Option<&Cookie<'_>>) -> Reply {
        self.send(Method::GET, path, cookie).await
    }

    async fn put(&self, path: &str, cookie: Option<&Cookie<'_>>) -> Reply {
        self.send(Method::PUT, path, cookie).await
    }

    async fn post(&self, path: &str, cookie: Option<&Cookie<'_>>) -> Reply {
        self.send(Method::POST, path, cookie).await
    }

    async fn delete(&self, path: &str, cookie: Option<&Cookie<'_>>) -> Reply {
        self.send(Method::DELETE, path, cookie).await
    }

    /// The row of the session behind `cookie`, read from the database.
    async fn row(&self, cookie: &Cookie<'_>) -> Option<Row> {
        let (attributes, seconds_left, version) = sqlx::query_as(
            "SELECT attributes, extract(epoch FROM expires_at - now())::float8, version \
             FROM sessions WHERE id = $1",
        )
        .bind(PgSessionStore::session_id(&id_of(cookie)))
        .fetch_optional(self.store.manager().pool())
        .await
        .expect("query")?;
        Some(Row {
            attributes,
            seconds_left,
            version,
        })
    }
}

/// A session's row as the database holds it.
#[derive(Debug)]
struct Row {
    attributes: serde_json::Value,
    seconds_left: f64,
    version: i64,
}

/// tower-sessions' id in a session cookie.
fn id_of(cookie: &Cookie<'_>) -> Id {
    cookie.value().parse().expect("a tower-sessions id")
}

/// A cookie as a client would send it back.
fn cookie(value: &str) -> Cookie<'static> {
    Cookie::new("id", value.to_owned())
}

/// The cookie tower-sessions sets for a session, with its default attributes.
fn assert_session_cookie(cookie: &Cookie<'_>) {
    assert_eq!(cookie.name(), "id");
    assert!(cookie.value().parse::<Id>().is_ok(), "{cookie}");
    assert_eq!(cookie.http_only(), Some(true), "{cookie}");
    assert_eq!(cookie.same_site(), Some(SameSite::Strict), "{cookie}");
    assert_eq!(cookie.secure(), Some(true), "{cookie}");
    assert_eq!(cookie.path(), Some("/"), "{cookie}");
    assert_eq!(cookie.expires(), None, "Max-Age alone dates it: {cookie}");
}

/// A cookie telling the browser to forget the session cookie.
fn assert_removal(cookie: &Cookie<'_>) {
    assert_eq!(cookie.name(), "id");
    assert_eq!(cookie.value(), "", "{cookie}");
    assert_eq!(cookie.max_age(), Some(Duration::ZERO), "{cookie}");
    let expires = cookie.expires_datetime().expect("an Expires date");
    assert!(expires < OffsetDateTime::now_utc(), "{cookie}");
    assert_eq!(cookie.path(), Some("/"), "{cookie}");
}

/// `actual` is within `slack` below `expected` (time passes between setting and reading).
fn assert_about(actual: f64, expected: f64, slack: f64) {
    assert!(
        actual <= expected + 0.5 && actual >= expected - slack,
        "{actual} is not {expected} (less up to {slack})"
    );
}

fn max_age_secs(cookie: &Cookie<'_>) -> f64 {
    cookie.max_age().expect("a Max-Age").as_seconds_f64()
}

const HOUR: f64 = 3600.0;
const DAY: f64 = 86_400.0;
/// What tower-sessions stores as the expiry of a session without one: two weeks.
const TWO_WEEKS: f64 = 14.0 * DAY;

/// Wait (5 s at most) until the node behind `events` has applied another node's `kind` write
/// of the session tower-sessions knows as `id` (the shared database carries other tests'
/// writes too, so the session is checked as well as the kind).
async fn applied_from_elsewhere(
    events: &mut Receiver<SessionEvent>,
    kind: SessionEventKind,
    id: &Id,
) {
    let wanted = PgSessionStore::session_id(id);
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(5);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("another node's {kind:?} of {wanted} within 5 s"))
            .expect("no lag");
        if event.kind == kind
            && event.origin == pgsession::Origin::OtherNode
            && event.session_id == Some(wanted)
        {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One node, request by request

#[tokio::test]
async fn a_request_that_leaves_the_session_alone_sets_no_cookie() {
    let site = Site::direct(idle_hour).await;

    assert_eq!(site.get("/", None).await.quietly(), "hello");
}

#[tokio::test]
async fn reading_a_value_without_a_session_answers_none_and_starts_no_session() {
    let site = Site::direct(idle_hour).await;

    assert_eq!(site.get("/values/visits", None).await.quietly(), ABSENT);
    assert_eq!(site.get("/numbers/visits", None).await.quietly(), ABSENT);
}

#[tokio::test]
async fn a_first_write_sets_a_strict_secure_cookie_aged_by_the_idle_timeout() {
    let site = Site::direct(idle_hour).await;

    let reply = site.put("/numbers/visits/3", None).await;

    let cookie = reply.cookie();
    assert_session_cookie(&cookie);
    assert_eq!(cookie.max_age(), Some(Duration::hours(1)));
    assert_eq!(cookie.domain(), None);
    let row = site.row(&cookie).await.expect("the session is stored");
    assert_eq!(row.attributes, json!({ "visits": 3 }));
    assert_about(row.seconds_left, HOUR, 5.0);
}

#[tokio::test]
async fn without_an_expiry_the_cookie_lasts_the_browser_session_and_the_record_two_weeks() {
    let site = Site::direct(no_expiry).await;

    let cookie = site.put("/numbers/visits/1", None).await.cookie();

    assert_session_cookie(&cookie);
    assert_eq!(cookie.max_age(), None, "{cookie}");
    let row = site.row(&cookie).await.expect("the session is stored");
    assert_about(row.seconds_left, TWO_WEEKS, 5.0);
}

#[tokio::test]
async fn an_unknown_well_formed_id_is_not_adopted_and_a_write_gets_a_new_one() {
    let site = Site::direct(idle_hour).await;
    let bogus = cookie(&Id::default().to_string());

    let fresh = site.put("/numbers/visits/1", Some(&bogus)).await.cookie();

    assert_session_cookie(&fresh);
    assert_ne!(fresh.value(), bogus.value());
    assert!(
        site.row(&bogus).await.is_none(),
        "nothing under the id sent"
    );
    assert!(site.row(&fresh).await.is_some());
    assert_eq!(
        site.get("/numbers/visits", Some(&fresh)).await.quietly(),
        "1"
    );
}

#[tokio::test]
async fn a_malformed_cookie_is_cleared_and_the_request_still_served() {
    let site = Site::direct(idle_hour).await;
    let malformed = cookie("not a session id!");

    let reply = site.get("/", Some(&malformed)).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "hello");
    assert_removal(&reply.set_cookie.expect("a removal cookie"));
    let fresh = site
        .put("/numbers/visits/1", Some(&malformed))
        .await
        .cookie();
    assert_session_cookie(&fresh);
    assert_eq!(
        site.get("/numbers/visits", Some(&fresh)).await.quietly(),
        "1"
    );
}

#[tokio::test]
async fn a_stored_value_is_read_back_typed_and_as_json_by_its_visitor_only() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/answer/42", None).await.cookie();
    site.put("/words/drink/tea", Some(&cookie))
        .await
        .same_session(&cookie);

    assert_eq!(
        site.get("/numbers/answer", Some(&cookie)).await.quietly(),
        "42"
    );
    assert_eq!(
        site.get("/values/answer", Some(&cookie)).await.quietly(),
        "42"
    );
    assert_eq!(
        site.get("/values/drink", Some(&cookie)).await.quietly(),
        "\"tea\""
    );
    assert_eq!(
        site.get("/values/missing", Some(&cookie)).await.quietly(),
        ABSENT
    );
    let other = site.put("/numbers/answer/7", None).await.cookie();
    assert_ne!(other.value(), cookie.value());
    assert_eq!(
        site.get("/numbers/answer", Some(&cookie)).await.quietly(),
        "42"
    );
    assert_eq!(
        site.get("/numbers/answer", Some(&other)).await.quietly(),
        "7"
    );
}

#[tokio::test]
async fn a_read_is_served_from_the_cache_and_writes_nothing() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/visits/5", None).await.cookie();
    let version = site.row(&cookie).await.expect("stored").version;
    let before = site.store.manager().stats();

    assert_eq!(
        site.get("/numbers/visits", Some(&cookie)).await.quietly(),
        "5"
    );

    let after = site.store.manager().stats();
    assert_eq!(after.hits, before.hits + 1);
    assert_eq!(after.misses, before.misses, "no database read");
    assert_eq!(site.row(&cookie).await.expect("stored").version, version);
}

#[tokio::test]
async fn a_typed_remove_hands_back_the_value_once_and_keeps_the_others() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/a/1", None).await.cookie();
    site.put("/numbers/b/2", Some(&cookie))
        .await
        .same_session(&cookie);

    let reply = site.delete("/numbers/a", Some(&cookie)).await;

    assert_eq!(reply.same_session(&cookie), "1");
    assert_eq!(site.delete("/numbers/a", Some(&cookie)).await.body, ABSENT);
    assert_eq!(
        site.get("/numbers/a", Some(&cookie)).await.quietly(),
        ABSENT
    );
    assert_eq!(site.get("/numbers/b", Some(&cookie)).await.quietly(), "2");
    let row = site.row(&cookie).await.expect("still stored");
    assert_eq!(row.attributes, json!({ "b": 2 }));
}

#[tokio::test]
async fn remove_value_hands_back_the_json_and_drops_the_key_from_the_record() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/words/drink/tea", None).await.cookie();
    site.put("/numbers/cups/2", Some(&cookie))
        .await
        .same_session(&cookie);

    let reply = site.delete("/values/drink", Some(&cookie)).await;

    assert_eq!(reply.same_session(&cookie), "\"tea\"");
    assert_eq!(
        site.get("/values/drink", Some(&cookie)).await.quietly(),
        ABSENT
    );
    let row = site.row(&cookie).await.expect("still stored");
    assert_eq!(row.attributes, json!({ "cups": 2 }));
}

/// tower-sessions saves a session emptied by removals (only `flush` deletes), so its record
/// stays, holding nothing, and the cookie keeps working.
#[tokio::test]
async fn removing_the_last_value_leaves_an_empty_session_that_answers_none() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/visits/9", None).await.cookie();

    let reply = site.delete("/values/visits", Some(&cookie)).await;

    assert_eq!(reply.same_session(&cookie), "9");
    assert_eq!(
        site.get("/values/visits", Some(&cookie)).await.quietly(),
        ABSENT
    );
    let row = site
        .row(&cookie)
        .await
        .expect("the emptied session is saved");
    assert_eq!(row.attributes, json!({}));
    site.put("/numbers/visits/10", Some(&cookie))
        .await
        .same_session(&cookie);
    assert_eq!(
        site.get("/numbers/visits", Some(&cookie)).await.quietly(),
        "10"
    );
}

#[tokio::test]
async fn cycling_the_id_moves_the_values_to_a_new_cookie_and_the_old_one_opens_nothing() {
    let site = Site::direct(idle_hour).await;
    let old = site.put("/numbers/answer/42", None).await.cookie();

    let new = site.post("/cycle", Some(&old)).await.cookie();

    assert_session_cookie(&new);
    assert_ne!(new.value(), old.value());
    assert_eq!(new.max_age(), Some(Duration::hours(1)));
    assert!(site.row(&old).await.is_none(), "the old record is deleted");
    let row = site.row(&new).await.expect("the new record is stored");
    assert_eq!(row.attributes, json!({ "answer": 42 }));
    assert_eq!(
        site.get("/numbers/answer", Some(&new)).await.quietly(),
        "42"
    );
    let stale = site.get("/numbers/answer", Some(&old)).await;
    assert_eq!(stale.body, ABSENT);
    assert_removal(&stale.set_cookie.expect("the old cookie is cleared"));
}

#[tokio::test]
async fn a_flush_deletes_the_record_and_clears_the_cookie() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/visits/1", None).await.cookie();

    let reply = site.post("/logout", Some(&cookie)).await;

    assert_eq!(reply.body, "bye");
    let removal = reply.cookie();
    assert_removal(&removal);
    assert_eq!(removal.domain(), None);
    assert!(site.row(&cookie).await.is_none(), "the record is deleted");
    let after = site.get("/numbers/visits", Some(&cookie)).await;
    assert_eq!(after.body, ABSENT);
    assert_removal(&after.set_cookie.expect("a stale cookie is cleared"));
}

#[tokio::test]
async fn with_a_domain_both_the_cookie_and_its_removal_name_it() {
    let site = Site::direct(|layer| idle_hour(layer).with_domain("localhost")).await;
    let cookie = site.put("/numbers/visits/1", None).await.cookie();
    assert_session_cookie(&cookie);
    assert_eq!(cookie.domain(), Some("localhost"));

    let removal = site.post("/logout", Some(&cookie)).await.cookie();

    assert_removal(&removal);
    assert_eq!(removal.domain(), Some("localhost"));
    assert!(site.row(&cookie).await.is_none());
}

#[tokio::test]
async fn a_dated_expiry_replaces_the_idle_timeout_in_the_cookie_and_the_record() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/visits/1", None).await.cookie();
    assert_about(max_age_secs(&cookie), HOUR, 1.0);

    let dated = site
        .post("/expiry/in/86400000", Some(&cookie))
        .await
        .cookie();

    assert_session_cookie(&dated);
    assert_eq!(dated.value(), cookie.value(), "same session");
    assert_about(max_age_secs(&dated), DAY, 5.0);
    let row = site.row(&cookie).await.expect("stored");
    assert_about(row.seconds_left, DAY, 5.0);
    assert_eq!(row.attributes, json!({ "visits": 1 }), "values kept");
}

#[tokio::test]
async fn a_browser_session_becomes_persistent_when_given_a_date() {
    let site = Site::direct(no_expiry).await;
    let cookie = site.put("/numbers/visits/1", None).await.cookie();
    assert_eq!(cookie.max_age(), None);

    let dated = site
        .post("/expiry/in/86400000", Some(&cookie))
        .await
        .cookie();

    assert_eq!(dated.value(), cookie.value());
    assert_about(max_age_secs(&dated), DAY, 5.0);
    assert_about(
        site.row(&cookie).await.expect("stored").seconds_left,
        DAY,
        5.0,
    );
}

#[tokio::test]
async fn a_persistent_session_becomes_a_browser_session_on_request() {
    let site = Site::direct(idle_hour).await;
    let cookie = site.put("/numbers/visits/1", None).await.cookie();
    assert_eq!(cookie.max_age(), Some(Duration::hours(1)));

    let session_cookie = site.post("/expiry/browser", Some(&cookie)).await.cookie();

    assert_session_cookie(&session_cookie);
    assert_eq!(session_cookie.value(), cookie.value());
    assert_eq!(session_cookie.max_age(), None, "{session_cookie}");
    let row = site.row(&cookie).await.expect("stored");
    assert_about(row.seconds_left, TWO_WEEKS, 5.0);
}

// ---------------------------------------------------------------------------------------------
// Two nodes on one database, over loopback HTTP: what tower-sessions' `CachingSessionStore`
// cannot do, since it never hears of another instance's writes

async fn two_nodes() -> (Site, Site) {
    tokio::join!(Site::served(idle_hour), Site::served(idle_hour))
}

#[tokio::test]
async fn a_value_written_through_one_node_is_read_through_the_other() {
    let (a, b) = two_nodes().await;

    let cookie = a.put("/numbers/visits/3", None).await.cookie();

    assert_eq!(b.get("/numbers/visits", Some(&cookie)).await.quietly(), "3");
    assert_eq!(b.get("/values/visits", Some(&cookie)).await.quietly(), "3");
}

#[tokio::test]
async fn a_change_on_one_node_replaces_what_the_other_had_cached() {
    let (a, b) = two_nodes().await;
    let cookie = a.put("/numbers/visits/1", None).await.cookie();
    assert_eq!(b.get("/numbers/visits", Some(&cookie)).await.quietly(), "1");
    let mut a_events = a.store.manager().subscribe_events();

    b.put("/numbers/visits/2", Some(&cookie))
        .await
        .same_session(&cookie);
    applied_from_elsewhere(&mut a_events, SessionEventKind::Updated, &id_of(&cookie)).await;

    assert_eq!(a.get("/numbers/visits", Some(&cookie)).await.quietly(), "2");
}

#[tokio::test]
async fn a_flush_on_one_node_logs_the_visitor_out_on_the_other() {
    let (a, b) = two_nodes().await;
    let cookie = a.put("/numbers/visits/1", None).await.cookie();
    assert_eq!(b.get("/numbers/visits", Some(&cookie)).await.quietly(), "1");
    let mut b_events = b.store.manager().subscribe_events();

    assert_removal(&a.post("/logout", Some(&cookie)).await.cookie());
    applied_from_elsewhere(&mut b_events, SessionEventKind::Deleted, &id_of(&cookie)).await;

    let on_b = b.get("/numbers/visits", Some(&cookie)).await;
    assert_eq!(on_b.body, ABSENT);
    assert_removal(&on_b.set_cookie.expect("b clears the cookie"));
    assert!(b.row(&cookie).await.is_none());
}

#[tokio::test]
async fn after_a_cycle_on_one_node_the_old_cookie_opens_nothing_on_the_other() {
    let (a, b) = two_nodes().await;
    let old = a.put("/numbers/answer/42", None).await.cookie();
    assert_eq!(b.get("/numbers/answer", Some(&old)).await.quietly(), "42");
    let mut b_events = b.store.manager().subscribe_events();

    let new = a.post("/cycle", Some(&old)).await.cookie();
    applied_from_elsewhere(&mut b_events, SessionEventKind::Deleted, &id_of(&old)).await;

    assert_ne!(new.value(), old.value());
    let stale = b.get("/numbers/answer", Some(&old)).await;
    assert_eq!(stale.body, ABSENT);
    assert_removal(&stale.set_cookie.expect("b clears the old cookie"));
    assert_eq!(b.get("/numbers/answer", Some(&new)).await.quietly(), "42");
}

#[tokio::test]
async fn an_expiry_shortened_on_one_node_ends_the_session_on_the_other() {
    let (a, b) = two_nodes().await;
    let cookie = a.put("/numbers/visits/1", None).await.cookie();
    let id = id_of(&cookie);
    assert_eq!(b.get("/numbers/visits", Some(&cookie)).await.quietly(), "1");
    let cached = b.store.load(&id).await.expect("load").expect("cached on b");
    assert!(cached.expiry_date > OffsetDateTime::now_utc() + Duration::minutes(59));
    let mut b_events = b.store.manager().subscribe_events();

    a.post("/expiry/in/1200", Some(&cookie)).await.cookie();
    applied_from_elsewhere(&mut b_events, SessionEventKind::Updated, &id).await;

    let left = a.row(&cookie).await.expect("stored").seconds_left;
    assert!(left < 1.3, "a stored the short expiry: {left} s left");
    if let Some(record) = b.store.load(&id).await.expect("load") {
        let hour_left = OffsetDateTime::now_utc() + Duration::minutes(59);
        assert!(record.expiry_date < hour_left, "b dropped the hour it had");
    }
    // The expiry is a point in time: waiting for it to pass is the subject.
    tokio::time::sleep(StdDuration::from_secs_f64(left.max(0.0)) + StdDuration::from_millis(50))
        .await;
    let on_b = b.get("/numbers/visits", Some(&cookie)).await;
    assert_eq!(on_b.body, ABSENT);
    assert_removal(&on_b.set_cookie.expect("b clears the expired cookie"));
}

// ---------------------------------------------------------------------------------------------
// The store's own API

fn record(data: serde_json::Value) -> Record {
    let data = match data {
        serde_json::Value::Object(map) => map.into_iter().collect(),
        _ => panic!("an object"),
    };
    Record {
        id: Id::default(),
        data,
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    }
}

fn logged_in(user: serde_json::Value) -> Record {
    record(json!({ "axum-login.data": { "user_id": user, "auth_hash": [1, 2] }, "n": 1 }))
}

#[tokio::test]
async fn a_load_of_a_cached_record_does_no_io() {
    let (store, _) = store(config()).await;
    let mut rec = record(json!({ "foo": 42 }));
    store.create(&mut rec).await.expect("created");
    let before = store.manager().stats();

    let loaded = store.load(&rec.id).await.expect("load").expect("found");

    let after = store.manager().stats();
    assert_eq!(loaded.data, rec.data);
    assert_eq!(after.hits, before.hits + 1);
    assert_eq!(after.misses, before.misses, "served from the cache");
    let stored_at = loaded.expiry_date.unix_timestamp();
    assert_eq!(
        stored_at,
        rec.expiry_date.unix_timestamp(),
        "the record's expiry is kept"
    );
}

#[tokio::test]
async fn a_delete_on_one_instance_is_seen_by_the_other_at_once() {
    let (a, db) = store(config()).await;
    let b = PgSessionStore::new(node(db, config()).await);
    let mut rec = record(json!({ "foo": 1 }));
    a.create(&mut rec).await.expect("created");
    assert!(
        b.load(&rec.id).await.expect("load").is_some(),
        "b caches it"
    );

    a.delete(&rec.id).await.expect("deleted");

    let id = rec.id;
    eventually(
        StdDuration::from_secs(1),
        "b stops serving the deleted record",
        || {
            let b = b.clone();
            async move { b.load(&id).await.expect("load").is_none() }
        },
    )
    .await;
}

#[tokio::test]
async fn axum_login_users_get_the_cap_listing_and_logout_everywhere() {
    let capped = Config {
        max_sessions_per_user: Some(2),
        max_sessions_policy: MaxSessionsPolicy::EvictOldest,
        ..config()
    };
    let (store, _) = store(capped).await;
    let manager = store.manager().clone();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut rec = logged_in(json!(7));
        store.create(&mut rec).await.expect("created");
        ids.push(rec.id);
    }

    let listed = manager.list_user_sessions(7i64).await.expect("listed");
    assert_eq!(listed.len(), 2, "the cap of 2 applies");
    assert!(
        store.load(&ids[0]).await.expect("load").is_none(),
        "the oldest was evicted"
    );
    let mut listed_ids: Vec<_> = listed.iter().map(|s| s.id()).collect();
    listed_ids.sort();
    let mut expected: Vec<_> = ids[1..].iter().map(PgSessionStore::session_id).collect();
    expected.sort();
    assert_eq!(listed_ids, expected);

    assert_eq!(
        manager
            .delete_all_user_sessions("7")
            .await
            .expect("deleted"),
        2
    );
    for id in &ids {
        assert!(store.load(id).await.expect("load").is_none());
    }
}

#[tokio::test]
async fn a_save_binds_the_user_its_data_names_and_unbinds_on_removal() {
    let (store, _) = store(config()).await;
    let manager = store.manager().clone();
    let mut rec = record(json!({ "cart": ["tea"] }));
    store.create(&mut rec).await.expect("created");
    assert!(
        manager
            .list_user_sessions("erin")
            .await
            .expect("list")
            .is_empty()
    );

    rec.data.insert(
        "axum-login.data".into(),
        json!({ "user_id": "erin", "auth_hash": [] }),
    );
    store.save(&rec).await.expect("saved");
    let listed = manager.list_user_sessions("erin").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].get("cart"), Some(&json!(["tea"])));
    let loaded = store.load(&rec.id).await.expect("load").expect("same id");
    assert_eq!(loaded.data, rec.data);

    rec.data.remove("axum-login.data");
    store.save(&rec).await.expect("saved");
    assert!(
        manager
            .list_user_sessions("erin")
            .await
            .expect("list")
            .is_empty()
    );
    assert!(store.load(&rec.id).await.expect("load").is_some());
}

#[tokio::test]
async fn a_save_after_a_logout_elsewhere_does_not_bring_the_session_back() {
    let (store, _) = store(config()).await;
    let mut rec = logged_in(json!("frank"));
    store.create(&mut rec).await.expect("created");
    store
        .manager()
        .delete_all_user_sessions("frank")
        .await
        .expect("logout everywhere");

    rec.data.insert("n".into(), json!(2));
    store.save(&rec).await.expect("a late save is not an error");

    assert!(store.load(&rec.id).await.expect("load").is_none());
}

#[tokio::test]
async fn only_a_hash_of_the_tower_sessions_id_is_stored() {
    let (store, db) = store(config()).await;
    let mut rec = record(json!({ "k": "v" }));
    store.create(&mut rec).await.expect("created");
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, replace(id::text, '-', '') FROM sessions")
            .fetch_all(&pool(db).await)
            .await
            .expect("rows");
    assert_eq!(rows.len(), 1);
    let raw: String = rec
        .id
        .0
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_ne!(rows[0].1, raw, "the id itself is not the key");
    assert_eq!(
        rows[0].0.simple().to_string(),
        PgSessionStore::session_id(&rec.id).to_string()
    );
}

#[tokio::test]
async fn expired_records_are_not_loaded_and_are_deleted() {
    let (store, db) = store(config()).await;
    let mut rec = record(json!({ "k": "v" }));
    rec.expiry_date = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    store.create(&mut rec).await.expect("created");
    assert!(store.load(&rec.id).await.expect("load").is_some());
    // Expiry is a point in time: waiting for it is the subject.
    let left = rec.expiry_date - time::OffsetDateTime::now_utc();
    tokio::time::sleep(
        StdDuration::try_from(left).unwrap_or_default() + StdDuration::from_millis(50),
    )
    .await;

    assert!(store.load(&rec.id).await.expect("load").is_none());
    store.delete_expired().await.expect("cleanup");
    let pool = pool(db).await;
    eventually(StdDuration::from_secs(5), "cleanup removes the row", || {
        let pool = pool.clone();
        async move { count_rows(&pool).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn bad_records_are_typed_store_errors_and_write_nothing() {
    let (store, db) = store(Config {
        max_attribute_size: 64,
        ..config()
    })
    .await;
    let mut big = record(json!({ "blob": "x".repeat(100) }));
    let err = store.create(&mut big).await.expect_err("too large");
    assert!(
        matches!(err, tower_sessions_core::session_store::Error::Encode(_)),
        "{err:?}"
    );
    let mut ancient = record(json!({ "k": "v" }));
    ancient.expiry_date = time::OffsetDateTime::UNIX_EPOCH - time::Duration::days(365);
    let err = store
        .create(&mut ancient)
        .await
        .expect_err("expiry before 1970");
    assert!(
        matches!(err, tower_sessions_core::session_store::Error::Encode(_)),
        "{err:?}"
    );
    assert_eq!(count_rows(&pool(db).await).await, 0);
}

#[tokio::test]
async fn the_axum_login_example_lists_and_ends_a_users_sessions() {
    let (store, _) = store(config()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let router = axum_login_example::app(store.manager().clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    axum_login_example::run(&url)
        .await
        .unwrap_or_else(|e| panic!("the example's flow: {e}"));
    assert!(
        store
            .manager()
            .list_user_sessions(1i64)
            .await
            .expect("list")
            .is_empty()
    );
}
