//! The demo site's routes: one node of a service, with its page, forms and JSON API. Shared by
//! `examples/web/main.rs` and the browser test (`tests/browser.rs`).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, Path, State};
use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use pgsession::axum::{SessionLayer, WebSession};
use pgsession::{Config, Session, SessionId, SessionManager, SigningKey, Stats};
use serde::Deserialize;
use serde_json::json;

/// The state every handler of one node sees.
#[derive(Clone)]
pub struct Node {
    /// Shown on every page, so a visitor sees which node served it.
    pub name: String,
    /// This node's manager.
    pub manager: SessionManager,
    /// The process's Prometheus exporter (both demo nodes share the process, so `/metrics`
    /// shows their sum).
    pub metrics: PrometheusHandle,
    /// Hits and misses of each of the last 60 seconds, oldest first.
    history: Arc<Mutex<VecDeque<(u64, u64)>>>,
}

/// Seconds of history the panel draws.
const HISTORY: usize = 60;

impl Node {
    /// A node, with a task sampling its cache counters every second for the panel.
    pub fn new(name: &str, manager: SessionManager, metrics: PrometheusHandle) -> Node {
        let history = Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY)));
        let sampled = Arc::downgrade(&history);
        let watched = manager.clone();
        tokio::spawn(async move {
            let mut last = watched.stats();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(history) = sampled.upgrade() else {
                    return;
                };
                let now = watched.stats();
                let mut h = history.lock().unwrap();
                if h.len() == HISTORY {
                    h.pop_front();
                }
                h.push_back((now.hits - last.hits, now.misses - last.misses));
                last = now;
            }
        });
        Node {
            name: name.to_owned(),
            manager,
            metrics,
            history,
        }
    }
}

/// The demo's configuration: tokens signed with `key`, so a forged cookie is refused before
/// any cache or database lookup (`pgsession_forged_tokens_total` counts them). Both nodes
/// must use the same key.
pub fn config(key: SigningKey) -> Config {
    Config {
        signing_keys: vec![key],
        ..Config::default()
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder in this process")
        })
        .clone()
}

/// The node's router. The demo serves plain HTTP on 127.0.0.1, where a `Secure` cookie would
/// not be sent back by every client (browsers make an exception for `localhost` only), so it
/// turns `Secure` off; a real service keeps the default.
pub fn router(node: Node) -> Router {
    let layer = SessionLayer::new(node.manager.clone()).with_secure(false);
    Router::new()
        .route("/", get(page))
        .route("/api/me", get(me))
        .route("/count", post(count))
        .route("/login", post(log_in))
        .route("/logout", post(log_out))
        .route("/logout-everywhere", post(log_out_everywhere))
        .route("/sessions/{id}/revoke", post(revoke))
        .route("/metrics", get(metrics))
        .with_state(node)
        .layer(layer)
}

/// What a page or the API shows of the visitor.
struct Visitor {
    current: Option<Session>,
    sessions: Vec<Session>,
}

async fn visitor(node: &Node, session: &WebSession) -> pgsession::Result<Visitor> {
    let current = session.session().await?;
    let sessions = match current.as_ref().and_then(Session::user_id) {
        Some(user) => {
            let mut all = node.manager.list_user_sessions(user.clone()).await?;
            all.sort_by_key(|s| std::cmp::Reverse(s.created_at()));
            all
        }
        None => Vec::new(),
    };
    Ok(Visitor { current, sessions })
}

fn counter(session: Option<&Session>) -> u64 {
    session
        .and_then(|s| s.get_as::<u64>("counter").ok().flatten())
        .unwrap_or(0)
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn device(session: &Session) -> String {
    session
        .get_as::<String>("device")
        .ok()
        .flatten()
        .unwrap_or_else(|| "unknown device".to_owned())
}

async fn page(State(node): State<Node>, session: WebSession) -> pgsession::Result<Html<String>> {
    let v = visitor(&node, &session).await?;
    let current = v.current.as_ref();
    let mut body = String::new();
    let _ = write!(
        body,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>pgsession demo: {node}</title>\
         <style>body{{font-family:sans-serif;max-width:46em;margin:2em auto;line-height:1.5}}\
         table{{border-collapse:collapse}}td,th{{padding:.2em .8em;border-bottom:1px solid #ccc;text-align:left}}\
         form{{display:inline}}.node{{background:#eef;padding:.2em .6em;border-radius:.3em}}</style>\
         </head><body><h1>pgsession demo</h1>\
         <p>Served by <span class=\"node\" id=\"node\">{node}</span>. Both nodes share one \
         database; a change on one is seen on the other at once.</p>\
         <h2>Visits</h2><p>Counter kept in your session: <strong id=\"counter\">{count}</strong> \
         <form method=\"post\" action=\"/count\"><button id=\"count\">Count a visit</button></form></p>",
        node = escape(&node.name),
        count = counter(current),
    );
    match current.and_then(Session::user_id) {
        None => body.push_str(
            "<h2>Log in</h2><form method=\"post\" action=\"/login\" id=\"login-form\">\
             <label>User name <input name=\"user\" id=\"user\" required maxlength=\"64\"></label> \
             <button id=\"login\">Log in</button></form><p>No password: this is a demo.</p>",
        ),
        Some(user) => {
            let _ = write!(
                body,
                "<h2>Logged in as <span id=\"user-name\">{user}</span></h2>\
                 <form method=\"post\" action=\"/logout\"><button id=\"logout\">Log out</button></form> \
                 <form method=\"post\" action=\"/logout-everywhere\">\
                 <button id=\"logout-everywhere\">Log out everywhere</button></form>\
                 <h3>Your sessions</h3><table id=\"sessions\"><tr><th>Device</th><th>Created</th>\
                 <th>Last seen</th><th></th></tr>",
                user = escape(user.as_str()),
            );
            let here = current.map(Session::id);
            for s in &v.sessions {
                let this = Some(s.id()) == here;
                let _ = write!(
                    body,
                    "<tr class=\"session\"><td>{device}{mark}</td><td>{created}</td><td>{seen}</td>\
                     <td><form method=\"post\" action=\"/sessions/{id}/revoke\">\
                     <button>Revoke</button></form></td></tr>",
                    device = escape(&device(s)),
                    mark = if this {
                        " <strong>(this one)</strong>"
                    } else {
                        ""
                    },
                    created = s.created_at().format("%Y-%m-%d %H:%M:%S UTC"),
                    seen = s.last_accessed_at().format("%Y-%m-%d %H:%M:%S UTC"),
                    id = s.id(),
                );
            }
            body.push_str("</table>");
        }
    }
    body.push_str(&panel(&node));
    body.push_str("</body></html>");
    Ok(Html(body))
}

/// The node panel: this node's cache as its counters show it after this very request, and a
/// bar per second of the last minute's hits (green) over misses (grey).
fn panel(node: &Node) -> String {
    let s: Stats = node.manager.stats();
    let reads = s.hits + s.misses;
    let ratio = if reads == 0 {
        "-".to_owned()
    } else {
        format!("{:.1} %", 100.0 * s.hits as f64 / reads as f64)
    };
    let history: Vec<(u64, u64)> = node.history.lock().unwrap().iter().copied().collect();
    let chart = chart(&history);
    format!(
        "<h2>This node</h2><section id=\"panel\"><table>\
         <tr><th>cache entries</th><td id=\"panel-entries\">{entries}</td></tr>\
         <tr><th>hits / misses</th><td><span id=\"panel-hits\">{hits}</span> / \
         <span id=\"panel-misses\">{misses}</span> (hit ratio <span id=\"panel-ratio\">{ratio}</span>)</td></tr>\
         <tr><th>cache</th><td id=\"panel-trusted\">{trusted}</td></tr>\
         <tr><th>invalidations received</th><td id=\"panel-invalidations\">{inv}</td></tr>\
         <tr><th>listener reconnects</th><td id=\"panel-reconnects\">{reconnects}</td></tr>\
         </table><p>Reads per second, last minute (hits green, misses grey):</p>{chart}\
         <p><a href=\"/metrics\">/metrics</a> (Prometheus text)</p></section>",
        entries = s.entries,
        hits = s.hits,
        misses = s.misses,
        trusted = if s.cache_trusted {
            "trusted"
        } else {
            "distrusted: reads go to the database"
        },
        inv = s.invalidations,
        reconnects = s.reconnects,
    )
}

/// The last minute's reads per second as stacked bars (hits green over misses grey), with a
/// y axis in reads per second (0 and the peak) and an x axis in seconds ago (60 to now).
fn chart(history: &[(u64, u64)]) -> String {
    let peak = history.iter().map(|(h, m)| h + m).max().unwrap_or(0).max(1);
    // Plot area: left margin for y labels, bottom margin for x labels.
    let (left, top, bar, plot_h) = (44.0, 8.0, 4.0, 60.0);
    let plot_w = bar * HISTORY as f64;
    let (w, h) = (left + plot_w + 8.0, top + plot_h + 28.0);
    let base = top + plot_h;
    // Bars end at the right edge: the newest second is "now".
    let first = HISTORY - history.len();
    let mut svg = String::new();
    for (i, (hits, misses)) in history.iter().enumerate() {
        let x = left + (first + i) as f64 * bar;
        let h_hits = plot_h * *hits as f64 / peak as f64;
        let h_misses = plot_h * *misses as f64 / peak as f64;
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"{y:.1}\" width=\"3\" height=\"{h_hits:.1}\" fill=\"#2a2\"/>\
             <rect x=\"{x}\" y=\"{y2:.1}\" width=\"3\" height=\"{h_misses:.1}\" fill=\"#999\"/>",
            y = base - h_hits,
            y2 = base - h_hits - h_misses,
        );
    }
    let axis = "stroke=\"#444\" stroke-width=\"1\"";
    let text = "font-size=\"10\" font-family=\"sans-serif\" fill=\"#444\"";
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{base}\" {axis}/>\
         <line x1=\"{left}\" y1=\"{base}\" x2=\"{right}\" y2=\"{base}\" {axis}/>\
         <text id=\"panel-y-max\" x=\"{ly}\" y=\"{ty}\" text-anchor=\"end\" {text}>{peak}</text>\
         <text x=\"{ly}\" y=\"{base}\" text-anchor=\"end\" {text}>0</text>\
         <text x=\"2\" y=\"{mid}\" {text} transform=\"rotate(-90 8 {mid})\">reads/s</text>\
         <text x=\"{left}\" y=\"{lx}\" text-anchor=\"middle\" {text}>-60 s</text>\
         <text x=\"{half}\" y=\"{lx}\" text-anchor=\"middle\" {text}>-30 s</text>\
         <text x=\"{right}\" y=\"{lx}\" text-anchor=\"end\" {text}>now</text>\
         <text x=\"{half}\" y=\"{lt}\" text-anchor=\"middle\" {text}>seconds ago</text>",
        right = left + plot_w,
        ly = left - 4.0,
        ty = top + 8.0,
        mid = top + plot_h / 2.0 + 16.0,
        half = left + plot_w / 2.0,
        lx = base + 12.0,
        lt = base + 24.0,
    );
    format!(
        "<svg id=\"panel-history\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         role=\"img\" aria-label=\"reads per second, hits and misses, last minute\">{svg}</svg>"
    )
}

/// Prometheus text of the process's metrics (pgsession's, through the `metrics` facade).
async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        node.metrics.render(),
    )
}

async fn me(
    State(node): State<Node>,
    session: WebSession,
) -> pgsession::Result<Json<serde_json::Value>> {
    let v = visitor(&node, &session).await?;
    let current = v.current.as_ref();
    let here = current.map(Session::id);
    let sessions: Vec<_> = v
        .sessions
        .iter()
        .map(|s| {
            json!({
                "id": s.id().to_string(),
                "current": Some(s.id()) == here,
                "created_at": s.created_at().to_rfc3339(),
                "last_accessed_at": s.last_accessed_at().to_rfc3339(),
                "user_agent": s.get("device"),
            })
        })
        .collect();
    Ok(Json(json!({
        "node": node.name,
        "user": current.and_then(Session::user_id).map(|u| u.to_string()),
        "session_id": here.map(|id| id.to_string()),
        "counter": counter(current),
        "sessions": sessions,
    })))
}

/// Safe against concurrent counts of one visitor on any node: `get` then `set` would lose
/// some (both requests read n, both write n + 1).
async fn count(session: WebSession) -> pgsession::Result<Redirect> {
    session
        .modify("counter", |n: Option<u64>| n.unwrap_or(0) + 1)
        .await?;
    Ok(Redirect::to("/"))
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
}

async fn log_in(
    session: WebSession,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Redirect, Response> {
    let user = form.user.trim();
    if user.is_empty() || user.len() > 64 {
        return Err((StatusCode::BAD_REQUEST, "a user name of 1 to 64 bytes").into_response());
    }
    let agent = headers
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown device");
    let agent: String = agent.chars().take(200).collect();
    session
        .set("device", agent)
        .await
        .map_err(IntoResponse::into_response)?;
    session
        .log_in(user.to_owned())
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(Redirect::to("/"))
}

async fn log_out(session: WebSession) -> pgsession::Result<Redirect> {
    session.log_out().await?;
    Ok(Redirect::to("/"))
}

async fn log_out_everywhere(session: WebSession) -> pgsession::Result<Redirect> {
    session.log_out_everywhere().await?;
    Ok(Redirect::to("/"))
}

/// Revoke one of the visitor's own sessions (another device, or this one: a logout).
async fn revoke(
    State(node): State<Node>,
    session: WebSession,
    Path(id): Path<String>,
) -> pgsession::Result<Response> {
    let Ok(id) = id.parse::<SessionId>() else {
        return Ok((StatusCode::BAD_REQUEST, "not a session id").into_response());
    };
    let Some(user) = session.user_id().await? else {
        return Ok(Redirect::to("/").into_response());
    };
    if session.id().await? == Some(id) {
        session.log_out().await?;
    } else {
        let mine = node.manager.list_user_sessions(user).await?;
        if mine.iter().any(|s| s.id() == id) {
            node.manager.delete_session(id).await?;
        } else {
            return Ok((StatusCode::NOT_FOUND, "not one of your sessions").into_response());
        }
    }
    Ok(Redirect::to("/").into_response())
}
