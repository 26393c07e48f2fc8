//! Session events: what happened to sessions, on this node (reported by the operation itself)
//! and on the others (decoded from the invalidation stream), for audit logs, live dashboards and
//! tests. See [`SessionManager::subscribe_events`](crate::SessionManager::subscribe_events).

use tokio::sync::broadcast;

use crate::model::ids::{SessionId, UserId};

/// Events buffered per receiver; a receiver further behind than this loses the oldest and is
/// told how many with [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged).
pub const EVENT_BUFFER: usize = 4096;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SessionEventKind {
    /// A session was created. Other nodes report creates only with
    /// [`Config::announce_creates`](crate::Config::announce_creates).
    Created,
    /// A session's attributes or expiry changed.
    Updated,
    /// A session got a new token (and id): a rotation or a login. [`SessionEvent::session_id`]
    /// is the new id, [`SessionEvent::previous_id`] the old one (on other nodes: the old id
    /// and the new one as announced).
    Rotated,
    /// A session was deleted: a logout, a cap eviction, a revocation.
    Deleted,
    /// A session expired: found expired by a read, or deleted by cleanup. A session may be
    /// reported expired twice (by a read, then by cleanup).
    Expired,
    /// Every session of [`SessionEvent::user_id`] was deleted ("log out everywhere").
    UserLoggedOutEverywhere,
    /// An attribute was removed from every session of [`SessionEvent::user_id`].
    UserSessionsUpdated,
    /// Every session of [`SessionEvent::group_id`] was deleted.
    GroupDeleted,
    /// Every session was deleted.
    AllDeleted,
}

/// Where an event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// On this node: reported by the operation itself, before it returned.
    ThisNode,
    /// On another node (or by an unknown writer): decoded from its invalidation.
    OtherNode,
}

/// One event. Fields a notification does not carry are `None`: other nodes' updates, deletes
/// and expiries name the session but not its user; bulk events name no session.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionEvent {
    /// What happened.
    pub kind: SessionEventKind,
    /// The session (for a rotation, its new id); `None` for bulk events.
    pub session_id: Option<SessionId>,
    /// For [`SessionEventKind::Rotated`]: the id the session had before.
    pub previous_id: Option<SessionId>,
    /// The user, where known.
    pub user_id: Option<UserId>,
    /// The group, for [`SessionEventKind::GroupDeleted`] (and where known).
    pub group_id: Option<String>,
    /// The session's version after the change, where known.
    pub version: Option<i64>,
    /// This node or another.
    pub origin: Origin,
}

impl SessionEvent {
    pub(crate) fn new(kind: SessionEventKind, origin: Origin) -> SessionEvent {
        SessionEvent {
            kind,
            session_id: None,
            previous_id: None,
            user_id: None,
            group_id: None,
            version: None,
            origin,
        }
    }

    pub(crate) fn session(mut self, id: uuid::Uuid) -> SessionEvent {
        self.session_id = Some(SessionId(id));
        self
    }

    pub(crate) fn user(mut self, user: Option<UserId>) -> SessionEvent {
        self.user_id = user;
        self
    }

    pub(crate) fn version(mut self, version: i64) -> SessionEvent {
        self.version = Some(version);
        self
    }
}

/// The sending side, shared by the operations and the listener. Sending never blocks: a slow
/// receiver loses its oldest events, never slows a node.
#[derive(Clone, Debug)]
pub(crate) struct Events {
    tx: broadcast::Sender<SessionEvent>,
}

impl Events {
    pub(crate) fn new() -> Events {
        Events {
            tx: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.tx.subscribe()
    }

    /// Whether anyone listens: with no receiver, events are not even built.
    pub(crate) fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Send the event `build` makes, if anyone listens.
    pub(crate) fn emit(&self, build: impl FnOnce() -> SessionEvent) {
        if self.wanted() {
            // An error only means every receiver went away meanwhile.
            let _ = self.tx.send(build());
        }
    }
}
