//! Session tokens: the secret a cookie holds. Only its hash, the [`SessionId`], is ever
//! stored, logged or announced; with [`SigningKey`]s configured, a token carries a MAC that is
//! checked before anything is looked up, so forged tokens cost nothing.
//!
//! Text forms (all URL- and cookie-safe):
//! * unsigned: 32 random bytes, base64url without padding (43 characters);
//! * signed: the same 32 bytes and a 16-byte HMAC-SHA256 tag, base64url (64 characters);
//! * legacy: a hyphenated UUID (36 characters), the tokens of pgsession before hashing, which
//!   keep working after the upgrade (see [`Config::accept_legacy_tokens`](crate::Config)).
//!
//! A session's id is the first 16 bytes of SHA-256 over the random bytes (over the UUID's 16
//! bytes for a legacy token, which is how migration 3 converted stored ids in SQL).

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::Error;
use crate::model::ids::SessionId;

/// Random bytes in a token: 256 bits.
const SECRET_LEN: usize = 32;
/// Bytes of the MAC tag kept (128 bits).
pub(crate) const TAG_LEN: usize = 16;
/// Text length of an unsigned and of a signed token.
const UNSIGNED_LEN: usize = 43;
const SIGNED_LEN: usize = 64;
/// Domain separation of the MAC, so that a key shared with something else cannot be abused.
/// Short enough that context and secret fit one SHA-256 block with its padding (measured: the
/// tag costs two compressions instead of three).
const MAC_CONTEXT: &[u8] = b"pgsession-token-v1";
/// Shortest signing key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// The secret bearer value of a session: the only thing a cookie holds.
///
/// 256 bits from the operating system's random generator. [`Display`](fmt::Display) writes the
/// cookie text and [`FromStr`] parses exactly that back; `Debug` shows only the public
/// [`id`](Self::id). Comparisons run in constant time. The id is hashed once, when the token
/// is made or parsed, so looking a session up hashes nothing.
#[derive(Clone)]
pub struct SessionToken {
    repr: Repr,
    id: SessionId,
}

#[derive(Clone)]
enum Repr {
    Secret {
        secret: [u8; SECRET_LEN],
        tag: Option<[u8; TAG_LEN]>,
    },
    Legacy(Uuid),
    /// An id another library chose (tower-sessions' 128-bit ids): no tag, never displayed as
    /// a cookie by pgsession, hashed under its own prefix so it cannot open a native session.
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    External([u8; 16]),
}

/// Prefix hashed before an external id, separating its hashes from native tokens'.
const EXTERNAL_CONTEXT: &[u8] = b"pgsession-external-id-v1";

impl SessionToken {
    /// A new random token, signed with `key` if there is one.
    pub(crate) fn generate(key: Option<&SigningKey>) -> SessionToken {
        let mut secret = [0u8; SECRET_LEN];
        // Without the OS generator there can be no secure token at all.
        getrandom::fill(&mut secret).expect("the operating system's random generator failed");
        let tag = key.map(|k| k.tag(&secret));
        SessionToken::new(Repr::Secret { secret, tag })
    }

    fn new(repr: Repr) -> SessionToken {
        let id = hash(&repr);
        SessionToken { repr, id }
    }

    /// The session this token opens: a one-way hash of it (computed when the token was made).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The signature tag, for a signed token.
    pub(crate) fn tag(&self) -> Option<&[u8; TAG_LEN]> {
        match &self.repr {
            Repr::Secret { tag, .. } => tag.as_ref(),
            Repr::Legacy(_) | Repr::External(_) => None,
        }
    }

    /// What can be decided about this token without computing a MAC, given the verifying
    /// `keys` and whether legacy tokens are accepted now.
    pub(crate) fn precheck(&self, keys: &[SigningKey], accept_legacy: bool) -> Precheck {
        match &self.repr {
            // The other library vouches for its ids; there is no tag to check.
            Repr::External(_) => Precheck::Accepted,
            Repr::Legacy(_) if accept_legacy => Precheck::Accepted,
            Repr::Legacy(_) => Precheck::Refused,
            Repr::Secret { .. } if keys.is_empty() => Precheck::Accepted,
            Repr::Secret { tag: None, .. } => Precheck::Refused,
            Repr::Secret { tag: Some(tag), .. } => Precheck::IfSigned(*tag),
        }
    }
}

/// A token's verdict as far as it can be decided without a MAC (see
/// [`SessionToken::precheck`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Precheck {
    /// Opens its session whatever the cache holds.
    Accepted,
    /// Opens nothing (unsigned while keys are configured, or a legacy token refused).
    Refused,
    /// Opens its session if this tag is the MAC of its secret under a configured key: true
    /// when a tag verified before matches, or after computing the MAC.
    IfSigned([u8; TAG_LEN]),
}

/// Constant-time equality of two tags.
pub(crate) fn same_tag(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The id a token's representation hashes to.
fn hash(repr: &Repr) -> SessionId {
    let digest: [u8; 32] = match repr {
        Repr::Secret { secret, .. } => Sha256::digest(secret).into(),
        Repr::Legacy(uuid) => Sha256::digest(uuid.as_bytes()).into(),
        Repr::External(bytes) => {
            let mut hash = Sha256::new();
            hash.update(EXTERNAL_CONTEXT);
            hash.update(bytes);
            hash.finalize().into()
        }
    };
    SessionId::from_digest(&digest)
}

impl SessionToken {
    /// Whether the token may be looked up: its tag verifies with one of `keys` (any token
    /// when there are none), or it is a legacy token and those are accepted.
    pub(crate) fn verify(&self, keys: &[SigningKey], accept_legacy: bool) -> bool {
        match self.precheck(keys, accept_legacy) {
            Precheck::Accepted => true,
            Precheck::Refused => false,
            Precheck::IfSigned(tag) => self.signed_by(keys, &tag),
        }
    }

    /// Whether `tag` is the MAC of this token's secret under one of `keys` (a full HMAC per
    /// key tried).
    pub(crate) fn signed_by(&self, keys: &[SigningKey], tag: &[u8; TAG_LEN]) -> bool {
        match &self.repr {
            Repr::Secret { secret, .. } => keys.iter().any(|key| key.verify(secret, tag)),
            Repr::Legacy(_) | Repr::External(_) => false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.repr {
            Repr::Secret { secret, tag } => {
                let mut bytes = secret.to_vec();
                bytes.extend(tag.iter().flatten());
                bytes
            }
            Repr::Legacy(uuid) => uuid.as_bytes().to_vec(),
            Repr::External(bytes) => bytes.to_vec(),
        }
    }

    /// The token for an id another library picked and keeps in its own cookie.
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    pub(crate) fn external(id: [u8; 16]) -> SessionToken {
        SessionToken::new(Repr::External(id))
    }
}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Legacy(uuid) => fmt::Display::fmt(&uuid.hyphenated(), f),
            Repr::Secret { .. } | Repr::External(_) => {
                f.write_str(&URL_SAFE_NO_PAD.encode(self.bytes()))
            }
        }
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionToken")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl PartialEq for SessionToken {
    fn eq(&self, other: &SessionToken) -> bool {
        let (a, b) = (self.bytes(), other.bytes());
        // Constant time for tokens of one kind; the kind (a length) is not secret.
        a.len() == b.len() && a.iter().zip(&b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for SessionToken {}

impl FromStr for SessionToken {
    type Err = Error;

    /// Exactly what [`Display`](fmt::Display) writes: 43 or 64 base64url characters, or a
    /// hyphenated UUID (a legacy token).
    fn from_str(text: &str) -> Result<SessionToken, Error> {
        let invalid = |why: &str| Error::InvalidToken(why.to_owned());
        match text.len() {
            UNSIGNED_LEN | SIGNED_LEN => {
                let bytes = URL_SAFE_NO_PAD
                    .decode(text)
                    .map_err(|_| invalid("not base64url"))?;
                let mut secret = [0u8; SECRET_LEN];
                secret.copy_from_slice(&bytes[..SECRET_LEN]);
                let tag = (bytes.len() == SECRET_LEN + TAG_LEN).then(|| {
                    let mut tag = [0u8; TAG_LEN];
                    tag.copy_from_slice(&bytes[SECRET_LEN..]);
                    tag
                });
                let repr = Repr::Secret { secret, tag };
                // Non-canonical encodings (stray low bits in the last character) would give
                // two texts for one token.
                if URL_SAFE_NO_PAD.encode(&bytes) != text {
                    return Err(invalid("not a canonical encoding"));
                }
                Ok(SessionToken::new(repr))
            }
            // Exactly as printed (lower case): one text per token.
            36 => Uuid::try_parse(text)
                .ok()
                .filter(|u| u.hyphenated().to_string() == text)
                .map(|u| SessionToken::new(Repr::Legacy(u)))
                .ok_or_else(|| invalid("not a hyphenated lower-case UUID")),
            _ => Err(invalid("wrong length")),
        }
    }
}

/// A key that signs and verifies session tokens (HMAC-SHA256). Configure the same keys on
/// every node in [`Config::signing_keys`](crate::Config): the first signs new tokens, all of
/// them verify, so a key is rotated by putting the new one first and removing the old one a
/// session lifetime later. `Debug` does not show it.
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl SigningKey {
    /// A key from secret bytes (at least 32, from a secret store or a random generator).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for fewer than 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SigningKey, Error> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(Error::InvalidConfig(format!(
                "a signing key needs at least {MIN_KEY_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(bytes)
            .map_err(|e| Error::InvalidConfig(format!("signing key: {e}")))?;
        // Every tag starts with the context: absorb it once, clone the state per token.
        mac.update(MAC_CONTEXT);
        Ok(SigningKey(mac))
    }

    /// A new random 32-byte key (for tests and demos; production keys must be the same on
    /// every node, so they come from configuration).
    pub fn generate() -> SigningKey {
        let mut bytes = [0u8; MIN_KEY_LEN];
        getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
        SigningKey::from_bytes(&bytes).expect("32 bytes is long enough")
    }

    fn tag(&self, secret: &[u8; SECRET_LEN]) -> [u8; TAG_LEN] {
        let mut mac = self.0.clone();
        mac.update(secret);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    fn verify(&self, secret: &[u8; SECRET_LEN], tag: &[u8; TAG_LEN]) -> bool {
        let mut mac = self.0.clone();
        mac.update(secret);
        mac.verify_truncated_left(tag).is_ok()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_from_exactly_what_they_print() {
        let key = SigningKey::generate();
        for token in [
            SessionToken::generate(None),
            SessionToken::generate(Some(&key)),
        ] {
            let text = token.to_string();
            assert!(matches!(text.len(), UNSIGNED_LEN | SIGNED_LEN));
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            let back: SessionToken = text.parse().unwrap();
            assert_eq!(back, token);
            assert_eq!(back.id(), token.id());
        }
        let legacy = Uuid::new_v4();
        let token: SessionToken = legacy.to_string().parse().unwrap();
        assert_eq!(token.to_string(), legacy.to_string());
    }

    #[test]
    fn malformed_text_is_a_typed_error() {
        let good = SessionToken::generate(None).to_string();
        let mut bad_char = good.clone();
        bad_char.replace_range(0..1, "*");
        // The last of 43 characters carries 2 spare bits, always 0: setting one gives another
        // text for the same bytes, which must be refused.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = ALPHABET
            .iter()
            .position(|&c| c == good.as_bytes()[42])
            .unwrap();
        let mut non_canonical = good[..42].to_string();
        non_canonical.push(ALPHABET[last | 1] as char);
        for bad in [
            String::new(),
            "short".into(),
            format!("{good}x"),
            bad_char,
            "x".repeat(36),
            good[..42].to_string(),
        ] {
            assert!(
                matches!(bad.parse::<SessionToken>(), Err(Error::InvalidToken(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            non_canonical.parse::<SessionToken>(),
            Err(Error::InvalidToken(_))
        ));
    }

    #[test]
    fn only_tokens_signed_with_a_configured_key_verify() {
        let (old, new, other) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let keys = [new.clone(), old.clone()];
        assert!(SessionToken::generate(Some(&new)).verify(&keys, false));
        assert!(SessionToken::generate(Some(&old)).verify(&keys, false));
        assert!(!SessionToken::generate(Some(&other)).verify(&keys, false));
        assert!(!SessionToken::generate(None).verify(&keys, false));
        assert!(SessionToken::generate(None).verify(&[], false));
        let legacy: SessionToken = Uuid::new_v4().to_string().parse().unwrap();
        assert!(legacy.verify(&keys, true));
        assert!(!legacy.verify(&keys, false));
        // A tag moved to another secret does not verify.
        let tagged = |t: &SessionToken| match &t.repr {
            Repr::Secret { tag, .. } => tag.unwrap(),
            Repr::Legacy(_) | Repr::External(_) => unreachable!(),
        };
        let a = SessionToken::generate(Some(&new));
        let b = SessionToken::generate(Some(&new));
        let spliced = match a.repr {
            Repr::Secret { secret, .. } => SessionToken::new(Repr::Secret {
                secret,
                tag: Some(tagged(&b)),
            }),
            Repr::Legacy(_) | Repr::External(_) => unreachable!(),
        };
        assert!(!spliced.verify(&keys, false));
    }

    #[test]
    fn external_ids_hash_apart_from_native_tokens_of_the_same_bytes() {
        let bytes = [9u8; 16];
        let external = SessionToken::external(bytes);
        let mut secret = [0u8; SECRET_LEN];
        secret[..16].copy_from_slice(&bytes);
        let native = SessionToken::new(Repr::Secret { secret, tag: None });
        assert_ne!(external.id(), native.id());
        assert_ne!(external.id(), SessionToken::external([8u8; 16]).id());
        assert!(external.verify(&[SigningKey::generate()], false));
    }

    #[test]
    fn short_keys_are_refused_and_keys_are_not_printed() {
        assert!(matches!(
            SigningKey::from_bytes(&[7; 31]),
            Err(Error::InvalidConfig(_))
        ));
        let key = SigningKey::from_bytes(&[7; 32]).unwrap();
        assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
        let token = SessionToken::generate(Some(&key));
        let debug = format!("{token:?}");
        assert!(!debug.contains(&token.to_string()));
        assert!(debug.contains(&token.id().to_string()));
    }

    #[test]
    fn a_legacy_token_hashes_as_migration_3_converted_its_id() {
        let uuid = Uuid::parse_str("6f1d2c3b-4a59-4e8f-9a0b-1c2d3e4f5a6b").unwrap();
        let token: SessionToken = uuid.to_string().parse().unwrap();
        let digest: [u8; 32] = Sha256::digest(uuid.as_bytes()).into();
        assert_eq!(token.id(), SessionId::from_digest(&digest));
    }
}
