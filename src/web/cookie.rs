//! The session cookie's value and how it is found in a request, shared by the web layers.
//!
//! The value is `<token>.<version>`: the token, and the version of the session the client last
//! saw written (see [`SessionManager::get_session_with_version`](crate::SessionManager::get_session_with_version)),
//! so that whichever node the client's next request reaches serves at least that version.
//! A bare token (a cookie set before versions travelled with it) reads as version 0.

use crate::SessionToken;

/// Candidates for the session cookie tried per request; more are ignored (a browser sends
/// one per matching path and domain, so a handful at most).
pub(crate) const MAX_CANDIDATES: usize = 4;

/// A session cookie found in a request: the token and the least version to serve.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub(crate) token: SessionToken,
    pub(crate) version: i64,
}

/// The cookie value for `token` at `version`.
pub(crate) fn value(token: &SessionToken, version: i64) -> String {
    format!("{token}.{version}")
}

/// Parse one cookie value, with or without the double quotes RFC 6265 allows.
pub(crate) fn parse(value: &[u8]) -> Option<Candidate> {
    let value = match value {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    let text = std::str::from_utf8(value).ok()?;
    let (token, version) = match text.rsplit_once('.') {
        Some((token, version)) => (token, parse_version(version)?),
        None => (text, 0),
    };
    Some(Candidate {
        token: token.parse().ok()?,
        version,
    })
}

/// Decimal digits only (no sign, no `+`), within `i64`.
fn parse_version(text: &str) -> Option<i64> {
    if text.is_empty() || text.len() > 18 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Every well-formed cookie named `name` in the `Cookie` header values given, in order.
///
/// Read pair by pair as bytes: a cookie of another application that is not ASCII (or not even
/// UTF-8) is skipped, not taken as a reason to ignore the whole header; a pair without `=`
/// is skipped too. A value that is not a token is no candidate.
#[cfg_attr(not(feature = "axum"), allow(dead_code))]
pub(crate) fn candidates<'a>(
    headers: impl IntoIterator<Item = &'a [u8]>,
    name: &str,
) -> Vec<Candidate> {
    let mut found = Vec::new();
    for header in headers {
        for pair in header.split(|&b| b == b';') {
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if trim(&pair[..eq]) != name.as_bytes() {
                continue;
            }
            if let Some(candidate) = parse(trim(&pair[eq + 1..])) {
                found.push(candidate);
                if found.len() == MAX_CANDIDATES {
                    return found;
                }
            }
        }
    }
    found
}

#[cfg_attr(not(feature = "axum"), allow(dead_code))]
fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Checks of a cookie name's prefix against the cookie's attributes, as browsers apply them
/// (RFC 6265bis 4.1.3): a cookie breaking them is dropped by the browser without a word, so
/// a layer set up that way could never keep a session.
#[cfg_attr(not(feature = "axum"), allow(dead_code))]
pub(crate) fn check_prefix(name: &str, secure: bool, path: &str, domain: Option<&str>) {
    if name.starts_with("__Host-") {
        assert!(
            secure && path == "/" && domain.is_none(),
            "a cookie named __Host-… must be Secure, with Path=/ and no Domain \
             (browsers refuse it otherwise): {name:?}"
        );
    } else if name.starts_with("__Secure-") {
        assert!(
            secure,
            "a cookie named __Secure-… must be Secure (browsers refuse it otherwise): {name:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SessionToken {
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY"
            .parse()
            .unwrap()
    }

    #[test]
    fn a_foreign_cookie_that_is_not_ascii_does_not_hide_ours() {
        let header = format!("theme=caf\u{e9}; id={}.7", token());
        let found = candidates([header.as_bytes()], "id");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].token, token());
        assert_eq!(found[0].version, 7);
        let latin1 = [
            b"x=\xff\xfe; id=".as_slice(),
            token().to_string().as_bytes(),
        ]
        .concat();
        assert_eq!(candidates([latin1.as_slice()], "id").len(), 1);
    }

    #[test]
    fn every_cookie_of_our_name_is_a_candidate_in_order_and_malformed_ones_are_none() {
        let other: SessionToken = "ZZJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY"
            .parse()
            .unwrap();
        let header = format!("id=junk; idx={other}; id=\"{other}\";id={}", token());
        let found = candidates([header.as_bytes(), b"id=".as_slice()], "id");
        let tokens: Vec<_> = found.iter().map(|c| c.token.clone()).collect();
        assert_eq!(tokens, [other, token()]);
        assert!(found.iter().all(|c| c.version == 0));
    }

    #[test]
    fn a_version_is_plain_decimal_digits() {
        for bad in ["-1", "+1", "", "1e3", "99999999999999999999", " 1"] {
            assert!(
                parse(format!("{}.{bad}", token()).as_bytes()).is_none(),
                "{bad:?}"
            );
        }
        let c = parse(value(&token(), 42).as_bytes()).unwrap();
        assert_eq!((c.token, c.version), (token(), 42));
    }

    #[test]
    #[should_panic(expected = "__Host-")]
    fn a_host_prefixed_cookie_cannot_have_a_domain() {
        check_prefix("__Host-id", true, "/", Some("example.com"));
    }

    #[test]
    #[should_panic(expected = "__Secure-")]
    fn a_secure_prefixed_cookie_must_be_secure() {
        check_prefix("__Secure-id", false, "/", None);
    }
}
