//! The public identifiers: [`SessionId`] (a session's handle, safe to show) and [`UserId`]
//! (whose sessions they are).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::Error;

/// Longest user id accepted, in bytes of UTF-8.
pub const MAX_USER_ID_LEN: usize = 256;

/// The public handle of a session: a one-way hash of its [`SessionToken`](crate::SessionToken),
/// so it grants nothing. Safe to log, to show on a "your devices" page, and to put in a URL
/// that revokes a device. It is what the database stores and what invalidations name.
///
/// Text form: 32 lower-case hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) Uuid);

impl SessionId {
    /// The first 16 bytes of a SHA-256 digest.
    pub(crate) fn from_digest(digest: &[u8; 32]) -> SessionId {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        SessionId(Uuid::from_bytes(bytes))
    }

    /// The 16 bytes as stored (the `id` column is a `uuid`).
    pub(crate) fn as_uuid(self) -> Uuid {
        self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.simple(), f)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0.simple())
    }
}

impl FromStr for SessionId {
    type Err = Error;

    /// Exactly 32 hexadecimal digits, as [`Display`](fmt::Display) writes them.
    fn from_str(s: &str) -> Result<SessionId, Error> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidSessionId(
                "a session id is 32 hexadecimal digits".into(),
            ));
        }
        Uuid::try_parse(s)
            .map(SessionId)
            .map_err(|e| Error::InvalidSessionId(e.to_string()))
    }
}

/// Stored as the `uuid` it is in the `id` column, so that a session id binds directly in
/// hand-written SQL against the sessions table.
impl sqlx::Type<sqlx::Postgres> for SessionId {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Uuid as sqlx::Type<sqlx::Postgres>>::type_info()
    }
}

impl sqlx::postgres::PgHasArrayType for SessionId {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <Uuid as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for SessionId {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <Uuid as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl sqlx::Decode<'_, sqlx::Postgres> for SessionId {
    fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
        <Uuid as sqlx::Decode<sqlx::Postgres>>::decode(value).map(SessionId)
    }
}

impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SessionId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whose session it is: any identifier the application uses for its users, stored as text,
/// so UUIDs, integers (axum-login's `AuthUser::Id`) and strings all work. At most
/// [`MAX_USER_ID_LEN`] bytes, not empty, no NUL character; the calls taking one check it
/// ([`Error::InvalidUserId`]). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Refuse ids PostgreSQL could not store or that are unreasonably long.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        match text_id_problem(&self.0, MAX_USER_ID_LEN) {
            None => Ok(()),
            Some(reason) => Err(Error::InvalidUserId(format!(
                "user id {:?} is invalid: {reason}",
                self.0.chars().take(40).collect::<String>()
            ))),
        }
    }
}

/// Why `text` cannot be a stored text id (a user's, a group's) of at most `max` bytes, if it
/// cannot: empty, too long, or containing NUL (which PostgreSQL's `text` cannot hold).
pub(crate) fn text_id_problem(text: &str, max: usize) -> Option<String> {
    if text.is_empty() {
        Some("it is empty".to_owned())
    } else if text.len() > max {
        Some(format!("it is longer than {max} bytes"))
    } else if text.contains('\0') {
        Some("it contains the NUL character".to_owned())
    } else {
        None
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({:?})", &*self.0)
    }
}

impl From<Uuid> for UserId {
    /// The hyphenated lower-case form, as PostgreSQL prints a `uuid`.
    fn from(id: Uuid) -> UserId {
        UserId(id.hyphenated().to_string().into())
    }
}

impl From<i64> for UserId {
    fn from(id: i64) -> UserId {
        UserId(id.to_string().into())
    }
}

impl From<i32> for UserId {
    fn from(id: i32) -> UserId {
        UserId(id.to_string().into())
    }
}

impl From<u64> for UserId {
    fn from(id: u64) -> UserId {
        UserId(id.to_string().into())
    }
}

impl From<String> for UserId {
    fn from(id: String) -> UserId {
        UserId(id.into())
    }
}

impl From<&str> for UserId {
    fn from(id: &str) -> UserId {
        UserId(id.into())
    }
}

impl From<&String> for UserId {
    fn from(id: &String) -> UserId {
        UserId(id.as_str().into())
    }
}

impl From<&UserId> for UserId {
    fn from(id: &UserId) -> UserId {
        id.clone()
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<UserId, D::Error> {
        Ok(UserId(String::deserialize(deserializer)?.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_parse_from_exactly_what_they_print() {
        let id = SessionId(Uuid::new_v4());
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<SessionId>().unwrap(), id);
        for bad in [
            "",
            "xyz",
            &text[..31],
            &format!("{text}0"),
            &Uuid::new_v4().to_string(),
        ] {
            assert!(matches!(
                bad.parse::<SessionId>(),
                Err(Error::InvalidSessionId(_))
            ));
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SessionId>(&json).unwrap(), id);
    }

    #[test]
    fn user_ids_of_every_kind_are_text() {
        let uuid = Uuid::new_v4();
        assert_eq!(UserId::from(uuid).as_str(), uuid.to_string());
        assert_eq!(UserId::from(42i64).to_string(), "42");
        assert_eq!(UserId::from("alice"), UserId::from(String::from("alice")));
        assert!(UserId::from("").validate().is_err());
        assert!(UserId::from("a\0b").validate().is_err());
        assert!(UserId::from("x".repeat(257)).validate().is_err());
        assert!(UserId::from("x".repeat(256)).validate().is_ok());
    }
}
