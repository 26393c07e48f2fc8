//! [`SessionOptions`]: who and what a new session is for, beyond its attributes.

use std::net::IpAddr;

use crate::error::{Error, Result};
use crate::model::ids::{MAX_USER_ID_LEN, UserId, text_id_problem};
use crate::model::record::Client;

/// Longest `User-Agent` kept, in bytes; longer ones are cut at a character boundary.
pub const MAX_USER_AGENT_LEN: usize = 512;

/// Longest group id accepted, in bytes of UTF-8.
pub const MAX_GROUP_ID_LEN: usize = MAX_USER_ID_LEN;

/// What to create a session with, for
/// [`SessionManager::create_session_with`](crate::SessionManager::create_session_with): its
/// user (none: a session before login), its group (tenant), and the client that asked for it
/// (shown by [`list_user_sessions`](crate::SessionManager::list_user_sessions) on a "your
/// devices" page). Everything is optional.
///
/// ```
/// use pgsession::SessionOptions;
///
/// let options = SessionOptions::new()
///     .user("alice")
///     .group("acme")
///     .ip("203.0.113.7".parse().unwrap())
///     .user_agent("Mozilla/5.0 (X11; Linux x86_64)");
/// ```
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub(crate) user: Option<UserId>,
    pub(crate) group: Option<String>,
    pub(crate) client: Client,
}

impl SessionOptions {
    /// No user, no group, no client.
    pub fn new() -> SessionOptions {
        SessionOptions::default()
    }

    /// The user the session belongs to (a login); the per-user cap applies.
    pub fn user(mut self, user: impl Into<UserId>) -> SessionOptions {
        self.user = Some(user.into());
        self
    }

    /// The group (tenant, organisation) it belongs to, for
    /// [`delete_group_sessions`](crate::SessionManager::delete_group_sessions). Any text of 1
    /// to 256 bytes without NUL.
    pub fn group(mut self, group: impl Into<String>) -> SessionOptions {
        self.group = Some(group.into());
        self
    }

    /// The client's address.
    pub fn ip(mut self, ip: IpAddr) -> SessionOptions {
        self.client.ip = Some(ip);
        self
    }

    /// The client's `User-Agent`; cut to [`MAX_USER_AGENT_LEN`] bytes, NUL characters dropped.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> SessionOptions {
        let mut ua: String = user_agent.into().replace('\0', "");
        if ua.len() > MAX_USER_AGENT_LEN {
            let mut end = MAX_USER_AGENT_LEN;
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            ua.truncate(end);
        }
        self.client.user_agent = Some(ua);
        self
    }

    /// Check the user and group; nothing is written when this fails.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(user) = &self.user {
            user.validate()?;
        }
        if let Some(group) = &self.group {
            validate_group(group)?;
        }
        Ok(())
    }
}

/// [`Error::InvalidGroupId`] unless `group` is 1 to 256 bytes without NUL.
pub(crate) fn validate_group(group: &str) -> Result<()> {
    match text_id_problem(group, MAX_GROUP_ID_LEN) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidGroupId(format!(
            "group id {:?} is invalid: {reason}",
            group.chars().take(40).collect::<String>()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_user_agents_are_cut_at_a_character_boundary() {
        let ua = "é".repeat(400); // 800 bytes
        let options = SessionOptions::new().user_agent(ua);
        let kept = options.client.user_agent.unwrap();
        assert!(kept.len() <= MAX_USER_AGENT_LEN && kept.len() >= MAX_USER_AGENT_LEN - 1);
        assert!(kept.chars().all(|c| c == 'é'));
    }

    #[test]
    fn bad_groups_are_refused() {
        for bad in ["", "a\0b", &"g".repeat(257)] {
            assert!(matches!(
                SessionOptions::new().group(bad).validate(),
                Err(Error::InvalidGroupId(_))
            ));
        }
        assert!(SessionOptions::new().group("acme").validate().is_ok());
    }
}
