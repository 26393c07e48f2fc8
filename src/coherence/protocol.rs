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
//! | `d <id>,<id>,...` | delete, cap eviction | these sessions are gone |
//! | `x <id>,<id>,...` | cleanup | these sessions expired and are gone |
//! | `r <old> <new> <version>` | rotation, login | `old` is gone; the session lives on as `new` |
//! | `c <id> <user>` | create, with `Config::announce_creates` | a new session (`-`: no user) |
//! | `U <user>` | logout everywhere | every session of this user may be gone (the user id's UTF-8 bytes in hex, so that any text fits a line) |
//! | `K <user>` | an attribute removed from every session of a user | every session of this user may have changed |
//! | `G <group>` | `delete_group_sessions` | every session of this group (hex, like a user) may be gone |
//! | `A <epoch>` | `delete_all_sessions` | every session is gone: empty every cache; counts as a clear |
//! | `C <epoch>` | `clear_cache` | empty every cache; `epoch` counts clears so far |
//! | `p <token>` | a listener's probe | nothing (the sender waits for its own probe to return) |
//!
//! Session ids are 32 lower-case hex digits (a [`SessionId`](crate::SessionId)), never tokens.
//! A line may end with ` @` and the sending node's eight-hex-digit tag, by which a node tells
//! its own writes (whose events it has already reported) from other nodes'.

use uuid::Uuid;

use crate::model::ids::UserId;

/// A decoded invalidation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Message {
    /// A session changed and now has this version.
    Updated { id: Uuid, version: i64 },
    /// These sessions were deleted.
    Deleted(Vec<Uuid>),
    /// These sessions expired and were deleted.
    Expired(Vec<Uuid>),
    /// A session moved to a new id.
    Rotated { old: Uuid, new: Uuid, version: i64 },
    /// A session was created.
    Created { id: Uuid, user: Option<UserId> },
    /// Sessions of this user were deleted.
    UserDeleted(UserId),
    /// Sessions of this user changed.
    UserChanged(UserId),
    /// Sessions of this group were deleted.
    GroupDeleted(String),
    /// Every session was deleted; the number of clears so far.
    AllDeleted(i64),
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
            "d" => parse_ids(rest).map(Message::Deleted),
            "x" => parse_ids(rest).map(Message::Expired),
            "r" => {
                let mut parts = rest.split(' ');
                let (old, new, version) = (parts.next()?, parts.next()?, parts.next()?);
                if parts.next().is_some() {
                    return None;
                }
                Some(Message::Rotated {
                    old: Uuid::try_parse(old).ok()?,
                    new: Uuid::try_parse(new).ok()?,
                    version: version.parse().ok()?,
                })
            }
            "c" => {
                let (id, user) = rest.split_once(' ')?;
                Some(Message::Created {
                    id: Uuid::try_parse(id).ok()?,
                    user: match user {
                        "-" => None,
                        hex => Some(UserId::from(decode_text(hex)?)),
                    },
                })
            }
            "U" => Some(Message::UserDeleted(UserId::from(decode_text(rest)?))),
            "K" => Some(Message::UserChanged(UserId::from(decode_text(rest)?))),
            "G" => Some(Message::GroupDeleted(decode_text(rest)?)),
            "A" => Some(Message::AllDeleted(rest.parse().ok()?)),
            "C" => Some(Message::Clear(rest.parse().ok()?)),
            "p" => Some(Message::Probe),
            _ => None,
        }
    }
}

/// Split a line into its message and the sender's tag (` @` and 8 hex digits), if it has one.
pub(crate) fn split_tag(line: &str) -> (&str, Option<&str>) {
    match line.rsplit_once(" @") {
        Some((body, tag)) if tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (body, Some(tag))
        }
        _ => (line, None),
    }
}

/// A node's tag as it ends the lines it sends: ` @` and 8 random hex digits.
pub(crate) fn new_tag() -> String {
    format!(" @{:08x}", Uuid::new_v4().as_u64_pair().0 as u32)
}

fn parse_ids(list: &str) -> Option<Vec<Uuid>> {
    list.split(',').map(|id| Uuid::try_parse(id).ok()).collect()
}

/// A user id as it travels in a payload (see the module docs; the SQL in `crate::store` encodes
/// it the same way).
#[cfg(test)]
pub(crate) fn encode_user(user: &UserId) -> String {
    user.as_str().bytes().map(|b| format!("{b:02x}")).collect()
}

/// Text (a user or group id) from the hex of its UTF-8 bytes.
fn decode_text(hex: &str) -> Option<String> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
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
        assert_eq!(Message::parse("A 8"), Some(Message::AllDeleted(8)));
        assert_eq!(
            Message::parse(&format!("x {}", hex(a))),
            Some(Message::Expired(vec![a]))
        );
        assert_eq!(
            Message::parse(&format!("r {} {} 3", hex(a), hex(b))),
            Some(Message::Rotated {
                old: a,
                new: b,
                version: 3
            })
        );
        assert_eq!(
            Message::parse(&format!("c {} -", hex(a))),
            Some(Message::Created { id: a, user: None })
        );
        assert_eq!(
            Message::parse("G 6163"),
            Some(Message::GroupDeleted("ac".into()))
        );
        let tag = new_tag();
        let line = format!("u {} 42{tag}", hex(a));
        assert_eq!(
            split_tag(&line),
            (&line[..line.len() - 10], Some(&tag[2..]))
        );
        assert_eq!(split_tag("C 7"), ("C 7", None));
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
