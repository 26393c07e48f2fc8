//! actix-session's JSON texts as pgsession attributes, and back.

use std::collections::HashMap;

use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::{Error, Session};

use super::TEXT_MEMBER;

/// The attribute that stores `text` for key `name`: the JSON value it denotes when that value
/// reads back as exactly `text`, otherwise `{TEXT_MEMBER: text}`.
pub(super) fn attribute(name: &str, text: &str) -> Result<Value, Error> {
    if let Ok(parsed) = serde_json::from_str::<Value>(text)
        && wrapped_text(&parsed).is_none()
        // As pgsession will store it (numbers in the form PostgreSQL prints back), or a value
        // it refuses (`\u0000`, too deep), which then goes in as text.
        && let Ok(stored) = crate::model::json::encode(name, &parsed, usize::MAX)
        && text_of(&stored) == text
    {
        return Ok(stored);
    }
    let mut wrapped = serde_json::Map::new();
    wrapped.insert(TEXT_MEMBER.to_owned(), Value::String(text.to_owned()));
    Ok(Value::Object(wrapped))
}

/// The text an attribute stands for.
pub(super) fn text_of(value: &Value) -> String {
    match wrapped_text(value) {
        Some(text) => text.to_owned(),
        None => serde_json::to_string(&Canonical(value)).expect("a JSON value always serializes"),
    }
}

/// The text of a value stored as `{TEXT_MEMBER: text}`.
pub(super) fn wrapped_text(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get(TEXT_MEMBER)?.as_str(),
        _ => None,
    }
}

/// Every attribute of `session` as its text.
pub(super) fn texts(session: &Session) -> HashMap<String, String> {
    session
        .attribute_entries()
        .map(|(name, value)| (name.to_owned(), text_of(value)))
        .collect()
}

/// A value serialized compactly with object keys in byte order, whatever order serde_json's
/// map keeps (insertion order, with its `preserve_order` feature, would make a value read from
/// `jsonb` print differently from the same value cached by the writer).
pub(super) struct Canonical<'a>(&'a Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Array(items) => serializer.collect_seq(items.iter().map(Canonical)),
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
                    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                }
                serializer.collect_map(entries.into_iter().map(|(k, v)| (k, Canonical(v))))
            }
            other => other.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> (Value, String) {
        let stored = attribute("k", text).unwrap();
        let back = text_of(&stored);
        (stored, back)
    }

    #[test]
    fn canonical_texts_are_stored_as_the_json_they_denote() {
        for (text, value) in [
            (r#""alice""#, serde_json::json!("alice")),
            ("42", serde_json::json!(42)),
            ("-1.5", serde_json::json!(-1.5)),
            ("true", serde_json::json!(true)),
            ("null", Value::Null),
            (
                r#"{"a":1,"b":[1,"x"]}"#,
                serde_json::json!({"a": 1, "b": [1, "x"]}),
            ),
            (r#""caf\u00e9 \"q\"""#, serde_json::json!("café \"q\"")),
        ] {
            let (stored, back) = round_trip(text);
            // serde_json writes é as itself, so the escaped form is not canonical.
            if text.contains("\\u00e9") {
                assert_eq!(wrapped_text(&stored), Some(text));
            } else {
                assert_eq!(stored, value, "{text}");
            }
            assert_eq!(back, text);
        }
    }

    #[test]
    fn every_other_text_is_stored_as_text_and_comes_back_byte_for_byte() {
        for text in [
            "not json",
            "",
            "{ \"a\": 1 }",
            r#"{"b":1,"a":2}"#,
            "1.0e3",
            "1e16",
            "-0.0",
            r#""a\u0000b""#,
            r#"{"actix-session.text":"x"}"#,
            r#"{"actix-session.text":"x","other":1}"#,
        ] {
            let (stored, back) = round_trip(text);
            assert_eq!(back, text, "{text:?} stored as {stored}");
        }
        // An object that merely contains the member, among others, is real JSON.
        let (stored, _) = round_trip(r#"{"actix-session.text":"x","other":1}"#);
        assert_eq!(stored["other"], 1);
    }
}
