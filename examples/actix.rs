//! An actix-web app on pgsession's actix-session store, with actix-identity: log in, count
//! visits, see your sessions, log out, or log out everywhere (every browser of that user,
//! whichever instance served it).
//!
//! ```text
//! cargo run --features actix-session --example actix                 # http://127.0.0.1:8080
//! cargo run --features actix-session --example actix -- --port 9000
//! ```
//!
//! Uses `DATABASE_URL` when it is set; otherwise starts a private, throwaway PostgreSQL server
//! from the installed binaries. Tokens are signed with `PGSESSION_SIGNING_KEY` (base64, at
//! least 32 bytes) or a key generated at start. Run two copies on two ports against one
//! `DATABASE_URL` with the same `PGSESSION_SIGNING_KEY` and `ACTIX_COOKIE_KEY` (base64, at
//! least 64 bytes) and one browser sees both as one site.

use actix_identity::{Identity, IdentityMiddleware};
use actix_session::config::CookieContentSecurity;
use actix_session::{Session, SessionMiddleware};
use actix_web::cookie::Key;
use actix_web::error::ErrorInternalServerError;
use actix_web::http::header::{ContentType, LOCATION};
use actix_web::{App, HttpMessage, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use pgsession::actix_session::PgSessionStore;
use pgsession::{Config, SessionManager, SigningKey};
use pgsession_testkit::TempPostgres;
use serde::Deserialize;

type Failure = Box<dyn std::error::Error>;

/// The page: who you are, your count, your sessions, and what you can do.
async fn index(
    user: Option<Identity>,
    session: Session,
    manager: web::Data<SessionManager>,
) -> actix_web::Result<HttpResponse> {
    let visits = session.get::<u64>("visits")?.unwrap_or(0);
    let mut page = String::from(
        "<!doctype html><meta charset=utf-8><title>pgsession on actix-web</title>\
         <h1>pgsession on actix-web</h1>",
    );
    page.push_str(&format!(
        "<p>Visits counted in this session: <b>{visits}</b></p>\
         <form method=post action=/count><button>Count a visit</button></form>"
    ));
    match user {
        None => page.push_str(
            "<p>Not logged in.</p><form method=post action=/login>\
             <input name=name placeholder=name required> <button>Log in</button></form>",
        ),
        Some(user) => {
            let id = user.id()?;
            let sessions = manager
                .list_user_sessions(id.as_str())
                .await
                .map_err(ErrorInternalServerError)?;
            page.push_str(&format!(
                "<p>Logged in as <b>{}</b>, with {} session(s):</p><ul>",
                escape(&id),
                sessions.len()
            ));
            for s in &sessions {
                page.push_str(&format!(
                    "<li>{} from {}, last seen {}</li>",
                    s.id(),
                    s.ip().map_or_else(|| "?".to_owned(), |ip| ip.to_string()),
                    s.last_accessed_at().format("%H:%M:%S")
                ));
            }
            page.push_str(
                "</ul><form method=post action=/logout><button>Log out</button></form>\
                 <form method=post action=/logout-everywhere>\
                 <button>Log out everywhere</button></form>",
            );
        }
    }
    Ok(HttpResponse::Ok()
        .content_type(ContentType::html())
        .body(page))
}

#[derive(Deserialize)]
struct Login {
    name: String,
}

async fn log_in(request: HttpRequest, form: web::Form<Login>) -> actix_web::Result<HttpResponse> {
    let name = form.into_inner().name.trim().to_owned();
    if !name.is_empty() {
        // The session is saved bound to this user: listed, capped, ended everywhere at once.
        Identity::login(&request.extensions(), name)?;
    }
    Ok(home())
}

async fn count(session: Session) -> actix_web::Result<HttpResponse> {
    let visits = session.get::<u64>("visits")?.unwrap_or(0) + 1;
    session.insert("visits", visits)?; // saved as a delta: only "visits" is written
    Ok(home())
}

async fn log_out(user: Identity) -> HttpResponse {
    user.logout(); // deletes this session on every instance
    home()
}

async fn log_out_everywhere(
    user: Identity,
    manager: web::Data<SessionManager>,
) -> actix_web::Result<HttpResponse> {
    let ended = manager
        .delete_all_user_sessions(user.id()?)
        .await
        .map_err(ErrorInternalServerError)?;
    println!("logged out everywhere: {ended} session(s) ended");
    user.logout();
    Ok(home())
}

/// Back to the page (POST, redirect, GET).
fn home() -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((LOCATION, "/"))
        .finish()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A base64 secret from the environment variable `name`, if set.
fn secret(name: &str) -> Result<Option<Vec<u8>>, Failure> {
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => {
            let text = text.trim();
            let bytes = URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .or_else(|_| STANDARD.decode(text))
                .map_err(|e| format!("{name} is not base64: {e}"))?;
            Ok(Some(bytes))
        }
        _ => Ok(None),
    }
}

fn port() -> Result<u16, Failure> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(8080),
        [flag, port] if flag == "--port" => Ok(port.parse()?),
        _ => Err("usage: actix [--port N]   (default 8080)".into()),
    }
}

#[actix_web::main]
async fn main() -> Result<(), Failure> {
    let port = port()?;
    let (database_url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let server = TempPostgres::start()?;
            (server.url("postgres"), Some(server))
        }
    };
    // The same keys on every instance: cookies set by one must open on all.
    let signing_key = match secret("PGSESSION_SIGNING_KEY")? {
        Some(bytes) => SigningKey::from_bytes(&bytes)?,
        None => SigningKey::generate(),
    };
    let cookie_key = match secret("ACTIX_COOKIE_KEY")? {
        Some(bytes) => Key::try_from(bytes.as_slice())?,
        None => Key::generate(),
    };
    let config = Config {
        signing_keys: vec![signing_key],
        ..Config::default()
    };
    let manager = SessionManager::connect(config, &database_url).await?;
    let store = PgSessionStore::new(manager.clone());

    let app_manager = manager.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(app_manager.clone()))
            .route("/", web::get().to(index))
            .route("/login", web::post().to(log_in))
            .route("/count", web::post().to(count))
            .route("/logout", web::post().to(log_out))
            .route("/logout-everywhere", web::post().to(log_out_everywhere))
            // The last `wrap` sees the request first: the guard, the session, the identity.
            .wrap(IdentityMiddleware::default())
            .wrap(
                SessionMiddleware::builder(store.clone(), cookie_key.clone())
                    .cookie_content_security(CookieContentSecurity::Private)
                    // Plain HTTP on loopback for the demo; keep the default (Secure) in production.
                    .cookie_secure(false)
                    .build(),
            )
            .wrap(store.cookie_guard(cookie_key.clone()))
    })
    .bind(("127.0.0.1", port))?;
    for address in server.addrs() {
        println!("listening on http://{address} (Ctrl-C to stop)");
    }
    server.run().await?;
    manager.shutdown().await?;
    println!("stopped");
    Ok(())
}
