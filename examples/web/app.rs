//! The demo site's routes: one node of a service, with its page, forms and JSON API. Shared by
//! `examples/web/main.rs` and the browser test (`tests/browser.rs`).

use std::fmt::Write as _;

use axum::extract::{Form, Path, State};
use axum::http::header::USER_AGENT;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgsession::axum::{SessionLayer, WebSession};
use pgsession::{Session, SessionId, SessionManager};
use serde::Deserialize;
use serde_json::json;

/// The state every handler of one node sees.
#[derive(Clone)]
pub struct Node {
    /// Shown on every page, so a visitor sees which node served it.
    pub name: String,
    /// This node's manager.
    pub manager: SessionManager,
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
    body.push_str("</body></html>");
    Ok(Html(body))
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

async fn count(session: WebSession) -> pgsession::Result<Redirect> {
    let n: u64 = session.get_as("counter").await?.unwrap_or(0);
    session.set("counter", n + 1).await?;
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
