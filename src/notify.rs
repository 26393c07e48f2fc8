//! The invalidation protocol carried by NOTIFY payloads.
//!
//! Every payload is at most 7900 bytes, under PostgreSQL's 8000-byte limit, whatever the
//! operation: bulk deletions list at most 200 ids per message (the SQL in [`crate::store`]
//! chunks them), "log out everywhere" names the user, not the sessions, and batches of
//! single-session invalidations are packed a line each up to that size.
//!
//! A payload holds one or more messages, one per line:
//!
//! | payload | sent by | meaning |
//! |---|---|---|
//! | `u <id> <version>` | update | the session now has `version`; older cached copies are stale |
//! | `d <id>,<id>,...` | delete, cap eviction, cleanup | these sessions are gone |
//! | `U <user>` | logout everywhere | every session of this user may be gone (the user id's UTF-8 bytes in hex, so that any text fits a line) |
//! | `C <epoch>` | `clear_cache` | empty every cache; `epoch` counts clears so far |
//! | `p <token>` | a listener's probe | nothing (the sender waits for its own probe to return) |
//!
//! Session ids are 32 lower-case hex digits (a [`SessionId`](crate::SessionId)), never tokens.

use uuid::Uuid;

use crate::ids::UserId;

/// A decoded invalidation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// A session changed and now has this version.
    Updated { id: Uuid, version: i64 },
    /// These sessions were deleted.
    Deleted(Vec<Uuid>),
    /// Sessions of this user were deleted.
    UserDeleted(UserId),
    /// Drop everything; the number of clears so far.
    Clear(i64),
    /// Another listener's liveness probe (or this one's).
    Probe,
}

impl Message {
    /// Decode one line. `None` for anything malformed; the caller must then assume the worst
    /// (clear its cache) rather than ignore it.
    pub(crate) fn parse(payload: &str) -> Option<Message> {
        let (kind, rest) = payload.split_once(' ').unwrap_or((payload, ""));
        match kind {
            "u" => {
                let (id, version) = rest.split_once(' ')?;
                Some(Message::Updated {
                    id: Uuid::try_parse(id).ok()?,
                    version: version.parse().ok()?,
                })
            }
            "d" => rest
                .split(',')
                .map(|id| Uuid::try_parse(id).ok())
                .collect::<Option<Vec<_>>>()
                .map(Message::Deleted),
            "U" => Some(Message::UserDeleted(decode_user(rest)?)),
            "C" => Some(Message::Clear(rest.parse().ok()?)),
            "p" => Some(Message::Probe),
            _ => None,
        }
    }
}

/// A user id as it travels in a payload (see the module docs; the SQL in `crate::store` encodes
/// it the same way).
#[cfg(test)]
pub(crate) fn encode_user(user: &UserId) -> String {
    user.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_user(hex: &str) -> Option<UserId> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok().map(UserId::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message_kind() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let hex = |u: Uuid| u.simple().to_string();
        assert_eq!(
            Message::parse(&format!("u {} 42", hex(a))),
            Some(Message::Updated { id: a, version: 42 })
        );
        assert_eq!(
            Message::parse(&format!("d {},{}", hex(a), hex(b))),
            Some(Message::Deleted(vec![a, b]))
        );
        let user = UserId::from("ünïcode\nuser 7");
        assert_eq!(
            Message::parse(&format!("U {}", encode_user(&user))),
            Some(Message::UserDeleted(user))
        );
        assert_eq!(Message::parse("C 7"), Some(Message::Clear(7)));
        assert_eq!(Message::parse("p 12 3"), Some(Message::Probe));
    }

    #[test]
    fn malformed_payloads_are_rejected_not_half_applied() {
        let a = Uuid::new_v4().simple().to_string();
        for bad in [
            "".to_string(),
            "x".into(),
            format!("u {a}"),
            format!("u {a} notanumber"),
            format!("d {a},zz"),
            "U nope".into(),
            "U abc".into(),
            "U ff".into(),
            "C".into(),
            "C extra".into(),
        ] {
            assert_eq!(Message::parse(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn two_hundred_ids_fit_the_payload_limit() {
        let ids: Vec<String> = (0..200)
            .map(|_| Uuid::new_v4().simple().to_string())
            .collect();
        let payload = format!("d {}", ids.join(","));
        assert!(payload.len() < 8000, "{}", payload.len());
    }
}
