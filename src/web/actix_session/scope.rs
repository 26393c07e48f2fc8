//! One request's context, shared by the guard and the store.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;

use actix_web::http::header::HeaderValue;

use crate::{Session, SessionOptions};

tokio::task_local! {
    /// Set by the guard for the request it wraps; absent without it.
    pub(super) static REQUEST: RefCell<RequestScope>;
}

#[derive(Default)]
pub(super) struct RequestScope {
    /// The client's address and `User-Agent`, for a session created in this request.
    pub(super) peer: Option<IpAddr>,
    pub(super) agent: Option<HeaderValue>,
    /// The session the guard found, with the cookie value (session key) that opened it.
    pub(super) preloaded: Option<(String, Session)>,
    /// What `load` handed to actix-session: the baseline of this request's delta.
    pub(super) loaded: Option<Loaded>,
}

pub(super) struct Loaded {
    pub(super) key: String,
    pub(super) session: Session,
    pub(super) texts: HashMap<String, String>,
}

impl RequestScope {
    pub(super) fn client_options(&self) -> SessionOptions {
        let user_agent = self.agent.as_ref().and_then(|v| v.to_str().ok());
        crate::web::client_options(self.peer, user_agent)
    }
}

/// `f` on this request's scope; `None` outside a guard.
pub(super) fn in_scope<R>(f: impl FnOnce(&mut RequestScope) -> R) -> Option<R> {
    REQUEST.try_with(|scope| f(&mut scope.borrow_mut())).ok()
}
