//! axum-login on pgsession's tower-sessions store: log in from two devices, list the user's
//! sessions, log out everywhere. The program serves the app on a free loopback port and
//! drives it with an HTTP client, printing each step.
//!
//! ```text
//! cargo run --features tower-sessions --example axum_login
//! ```
//!
//! Uses `DATABASE_URL` when it is set; otherwise a private, throwaway PostgreSQL server.

use std::collections::HashMap;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use axum_login::{AuthManagerLayerBuilder, AuthSession, AuthUser, AuthnBackend, UserId};
use pgsession::tower_sessions::PgSessionStore;
use pgsession::{Config, SessionManager};
use pgsession_testkit::TempPostgres;
use tower_sessions::SessionManagerLayer;

#[derive(Clone, Debug)]
struct User {
    id: i64,
    name: &'static str,
    password_hash: &'static [u8],
}

impl AuthUser for User {
    type Id = i64;

    fn id(&self) -> i64 {
        self.id
    }

    fn session_auth_hash(&self) -> &[u8] {
        self.password_hash
    }
}

/// A fixed user list standing in for the application's user table.
#[derive(Clone)]
struct Users(HashMap<i64, User>);

impl AuthnBackend for Users {
    type User = User;
    type Credentials = i64;
    type Error = std::convert::Infallible;

    async fn authenticate(&self, id: i64) -> Result<Option<User>, Self::Error> {
        Ok(self.0.get(&id).cloned())
    }

    async fn get_user(&self, id: &UserId<Self>) -> Result<Option<User>, Self::Error> {
        Ok(self.0.get(id).cloned())
    }
}

type Auth = AuthSession<Users>;

async fn log_in(mut auth: Auth, Path(id): Path<i64>) -> impl IntoResponse {
    match auth.authenticate(id).await {
        Ok(Some(user)) => match auth.login(&user).await {
            Ok(()) => StatusCode::OK,
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Ok(None) => StatusCode::UNAUTHORIZED,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn me(auth: Auth) -> String {
    auth.user.map_or("nobody".to_owned(), |u| u.name.to_owned())
}

/// The signed-in user's sessions: what axum-login alone cannot list (axum-login #195).
async fn sessions(auth: Auth, manager: SessionManager) -> Result<Json<Vec<String>>, StatusCode> {
    let user = auth.user.ok_or(StatusCode::UNAUTHORIZED)?;
    let list = manager
        .list_user_sessions(user.id)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(Json(list.iter().map(|s| s.id().to_string()).collect()))
}

async fn log_out_everywhere(auth: Auth, manager: SessionManager) -> Result<String, StatusCode> {
    let user = auth.user.ok_or(StatusCode::UNAUTHORIZED)?;
    let n = manager
        .delete_all_user_sessions(user.id)
        .await
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    Ok(n.to_string())
}

/// The app: axum-login over tower-sessions over pgsession.
pub fn app(manager: SessionManager) -> Router {
    let users = Users(HashMap::from([
        (
            1,
            User {
                id: 1,
                name: "ada",
                password_hash: b"h1",
            },
        ),
        (
            2,
            User {
                id: 2,
                name: "grace",
                password_hash: b"h2",
            },
        ),
    ]));
    // Signed cookies: a forged one is refused before the store is asked (every instance must
    // use the same key: from configuration in a real service). Plain HTTP on loopback for the
    // demo; keep `Secure` on in a real service.
    let key = tower_sessions::cookie::Key::generate();
    let sessions_layer = SessionManagerLayer::new(PgSessionStore::new(manager.clone()))
        .with_signed(key)
        .with_secure(false);
    let auth = AuthManagerLayerBuilder::new(users, sessions_layer).build();
    let (m1, m2) = (manager.clone(), manager);
    Router::new()
        .route("/login/{id}", post(log_in))
        .route("/me", get(me))
        .route(
            "/sessions",
            get(move |auth: Auth| sessions(auth, m1.clone())),
        )
        .route(
            "/logout-everywhere",
            post(move |auth: Auth| log_out_everywhere(auth, m2.clone())),
        )
        .layer(auth)
}

pub type Failure = Box<dyn std::error::Error>;

/// The session cookie a response sets (`id=...`).
fn cookie_of(response: &reqwest::Response) -> Result<String, Failure> {
    let header = response
        .headers()
        .get("set-cookie")
        .ok_or("no Set-Cookie at login")?
        .to_str()?;
    Ok(header.split(';').next().unwrap_or_default().to_owned())
}

/// Log in from two devices, list, log out everywhere; errors when a step goes wrong.
pub async fn run(url: &str) -> Result<(), Failure> {
    let http = reqwest::Client::new();
    let get = |path: &str, cookie: &str| {
        http.get(format!("{url}{path}"))
            .header("cookie", cookie)
            .send()
    };
    let laptop = cookie_of(&http.post(format!("{url}/login/1")).send().await?)?;
    let phone = cookie_of(&http.post(format!("{url}/login/1")).send().await?)?;
    let who = get("/me", &laptop).await?.text().await?;
    println!("laptop is logged in as {who}");
    if who != "ada" {
        return Err(format!("expected ada, got {who}").into());
    }
    let listed: Vec<String> = serde_json::from_str(&get("/sessions", &phone).await?.text().await?)?;
    println!("ada's sessions, listed from the phone: {listed:?}");
    if listed.len() != 2 {
        return Err(format!("expected 2 sessions, got {}", listed.len()).into());
    }
    let response = http
        .post(format!("{url}/logout-everywhere"))
        .header("cookie", &phone)
        .send()
        .await?;
    println!(
        "logout everywhere ended {} sessions",
        response.text().await?
    );
    for (device, cookie) in [("laptop", &laptop), ("phone", &phone)] {
        let who = get("/me", cookie).await?.text().await?;
        println!("the {device} is now: {who}");
        if who != "nobody" {
            return Err(format!("the {device} is still logged in as {who}").into());
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Failure> {
    let (db_url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let server = TempPostgres::start()?;
            (server.url("postgres"), Some(server))
        }
    };
    let manager = SessionManager::connect(Config::default(), &db_url).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = app(manager.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    run(&url).await?;
    manager.shutdown().await?;
    println!("done");
    Ok(())
}
