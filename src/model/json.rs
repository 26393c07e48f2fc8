//! Attribute values as PostgreSQL will store them and every read will return them.
//!
//! A value is encoded once, when it is set, through a checking JSON formatter:
//!
//! * **Depth** is counted as containers open, so a value nested too deeply is refused after
//!   [`MAX_DEPTH`] levels of serialization, never by recursing through all of it (a value
//!   built in code 20 000 levels deep would otherwise overflow the stack).
//! * **NUL** (`\u0000`), which `jsonb` refuses, is refused in strings and keys at any depth.
//! * **Numbers** are written as PostgreSQL will print them back: `jsonb` keeps numbers as
//!   `numeric` and prints them in plain notation, so an integral float of 10^16 and more,
//!   which serde_json writes as `1e+16`, comes back as the integer `10000000000000000`; it is
//!   written as that integer here (the same number), and `-0.0` as `0.0`. With serde_json's
//!   `float_roundtrip` parsing, every other float reads back bit for bit.
//!
//! The value kept is the one parsed back from that text, so the copy a writer caches equals
//! what any node later reads from the database. Sizes are counted on the same text.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::Value;
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};

use crate::error::{Error, Result};

/// Deepest nesting accepted in an attribute value, the value itself counting as one level.
/// serde_json refuses to parse documents nested deeper than 128 levels, so a deeper value
/// would be stored and then be unreadable.
pub(crate) const MAX_DEPTH: usize = 100;

/// What the checking formatter refused, carried out of serde_json inside its I/O error.
#[derive(Debug)]
enum Problem {
    TooDeep,
    /// Deeper than [`ABYSS`]: serialization stopped there.
    Abyss,
    Nul,
}

/// Depth at which serialization stops: below it a value refused for its depth is still
/// serialized (and so dropped) to the end without danger to the stack, past it the value is
/// leaked rather than dropped. serde_json's parser stops at 128 levels, so only values built
/// in code get that deep.
const ABYSS: usize = 256;

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::TooDeep | Problem::Abyss => {
                write!(f, "nested deeper than {MAX_DEPTH} levels")
            }
            Problem::Nul => f.write_str(
                "strings cannot contain the NUL character (\\u0000): PostgreSQL's jsonb rejects it",
            ),
        }
    }
}

impl std::error::Error for Problem {}

/// A compact JSON formatter that refuses what PostgreSQL cannot store or give back, and
/// writes numbers in the form PostgreSQL prints them.
#[derive(Default)]
struct Checked {
    /// Containers open.
    depth: usize,
    /// A container opened past the limit: refused once the value is closed.
    too_deep: bool,
}

impl Checked {
    fn open(&mut self) -> io::Result<()> {
        self.depth += 1;
        if self.depth >= ABYSS {
            return Err(io::Error::other(Problem::Abyss));
        }
        // The value inside the deepest container sits one level below it.
        self.too_deep |= self.depth >= MAX_DEPTH;
        Ok(())
    }

    fn close(&mut self) -> io::Result<()> {
        self.depth -= 1;
        if self.depth == 0 && self.too_deep {
            return Err(io::Error::other(Problem::TooDeep));
        }
        Ok(())
    }
}

impl Formatter for Checked {
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open()?;
        w.write_all(b"[")
    }

    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b"]")?;
        self.close()
    }

    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open()?;
        w.write_all(b"{")
    }

    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b"}")?;
        self.close()
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        if let CharEscape::AsciiControl(0) = escape {
            return Err(io::Error::other(Problem::Nul));
        }
        CompactFormatter.write_char_escape(w, escape)
    }

    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        write_number_as_stored(w, value)
    }

    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        // Stored as the decimal text serde_json writes for it, which reads back as an f64.
        let mut text = Vec::with_capacity(24);
        CompactFormatter.write_f32(&mut text, value)?;
        let parsed: f64 = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(f64::from(value));
        write_number_as_stored(w, parsed)
    }
}

/// `value` in the form PostgreSQL prints it back: an integral value of magnitude 10^16 or
/// more that fits an `i64` or `u64` as that integer, zero without a sign.
fn write_number_as_stored<W: ?Sized + Write>(w: &mut W, value: f64) -> io::Result<()> {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    if value == 0.0 {
        return w.write_all(b"0.0");
    }
    if value.fract() == 0.0 && value.abs() >= 1e16 {
        if (-TWO_63..0.0).contains(&value) {
            return write!(w, "{}", value as i64);
        }
        if value > 0.0 && value < TWO_64 {
            return write!(w, "{}", value as u64);
        }
    }
    CompactFormatter.write_f64(w, value)
}

/// Counts bytes instead of keeping them.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Refuse a key PostgreSQL cannot store: one containing NUL. Every call taking an attribute
/// key checks it here.
pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.contains('\0') {
        return Err(Error::InvalidAttribute {
            key: key.to_owned(),
            reason:
                "keys cannot contain the NUL character (\\u0000): PostgreSQL's jsonb rejects it"
                    .into(),
        });
    }
    Ok(())
}

/// Serialize `value` through the checking formatter into `out`; on refusal, the problem if
/// the formatter found one, and the error.
fn write_checked<W: Write>(
    key: &str,
    value: &impl Serialize,
    out: W,
) -> std::result::Result<(), (Option<Problem>, Error)> {
    let mut ser = serde_json::Serializer::with_formatter(out, Checked::default());
    value.serialize(&mut ser).map_err(|e| {
        let problem = e
            .is_io()
            .then(|| io::Error::from(e))
            .and_then(|io| io.into_inner())
            .and_then(|inner| inner.downcast::<Problem>().ok())
            .map(|p| *p);
        let reason = match &problem {
            Some(p) => p.to_string(),
            None => "cannot serialize to JSON".to_owned(),
        };
        let error = Error::InvalidAttribute {
            key: key.to_owned(),
            reason,
        };
        (problem, error)
    })
}

/// The length of `key` as a JSON string.
fn key_len(key: &str) -> usize {
    let mut counter = Counter(0);
    // A string always serializes.
    let _ = serde_json::to_writer(&mut counter, key);
    counter.0
}

fn too_large(key: &str, size: usize, max_size: usize) -> Result<()> {
    if size > max_size {
        return Err(Error::AttributeTooLarge {
            key: key.to_owned(),
            size,
            limit: max_size,
        });
    }
    Ok(())
}

/// `value` for attribute `key`, checked (key, depth, NUL, `max_size` bytes of `"key":value`)
/// and in the form every read will return.
///
/// A value nested deeper than [`ABYSS`] levels is not dropped (dropping it would recurse as
/// deeply, and could overflow the stack): it is leaked. Only values built in code get that
/// deep; anything parsed by serde_json is dropped as usual.
pub(crate) fn encode(key: &str, value: impl Serialize, max_size: usize) -> Result<Value> {
    check_key(key)?;
    let value = std::mem::ManuallyDrop::new(value);
    let mut text = Vec::with_capacity(64);
    if let Err((problem, error)) = write_checked(key, &*value, &mut text) {
        if !matches!(problem, Some(Problem::Abyss)) {
            drop(std::mem::ManuallyDrop::into_inner(value));
        }
        return Err(error);
    }
    drop(std::mem::ManuallyDrop::into_inner(value));
    too_large(key, key_len(key) + 1 + text.len(), max_size)?;
    // Text this module wrote: valid JSON no deeper than MAX_DEPTH.
    serde_json::from_slice(&text).map_err(|e| Error::InvalidAttribute {
        key: key.to_owned(),
        reason: format!("cannot read back its JSON: {e}"),
    })
}

/// Check an attribute already encoded (a value another manager with other limits accepted):
/// the same checks as [`encode`], counting instead of keeping the text.
pub(crate) fn check(key: &str, value: &Value, max_size: usize) -> Result<()> {
    check_key(key)?;
    let mut counter = Counter(0);
    write_checked(key, value, &mut counter).map_err(|(_, e)| e)?;
    too_large(key, key_len(key) + 1 + counter.0, max_size)
}

/// The size of a session's attributes as PostgreSQL's `jsonb` prints them
/// (`octet_length(attributes::text)`), the measure of [`Config::max_session_size`]: the
/// compact JSON text with a space after every `:` and `,`.
///
/// [`Config::max_session_size`]: crate::Config::max_session_size
pub(crate) fn stored_size(attributes: &impl Serialize) -> usize {
    let mut counter = Counter(0);
    let mut ser = serde_json::Serializer::with_formatter(&mut counter, Spaced);
    // Writing a map of values to a counter cannot fail.
    let _ = attributes.serialize(&mut ser);
    counter.0
}

/// PostgreSQL's `jsonb` text form: `", "` and `": "` between items.
struct Spaced;

impl Formatter for Spaced {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        let mut text = Vec::with_capacity(24);
        write_number_as_stored(&mut text, value)?;
        w.write_all(&plain_decimal(&text))
    }
}

/// A number's text in PostgreSQL's `numeric` output form: plain notation, as many decimals as
/// the text had (`1.5e-7` is `0.00000015`, `1e+300` a 301-digit integer).
fn plain_decimal(text: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(text).unwrap_or("0");
    let Some((mantissa, exponent)) = text.split_once(['e', 'E']) else {
        return text.as_bytes().to_vec();
    };
    let exponent: i64 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int}{frac}");
    // The decimal point sits after `point` digits of `digits` (possibly before or past them).
    let point = int.len() as i64 + exponent;
    let mut out = String::from(sign);
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-point) as usize));
        out.push_str(&digits);
    } else if point as usize >= digits.len() {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', point as usize - digits.len()));
    } else {
        out.push_str(&digits[..point as usize]);
        out.push('.');
        out.push_str(&digits[point as usize..]);
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;
    use serde_json::json;

    #[test]
    fn nesting_is_refused_past_the_limit_without_recursing_through_the_value() {
        // Built by hand: json!([v]) would serialize v, recursing through it.
        let wrap = |v: Value| Value::Array(vec![v]);
        let mut ok = json!(1);
        for _ in 0..MAX_DEPTH - 1 {
            ok = wrap(ok);
        }
        encode("deep", &ok, usize::MAX).unwrap();
        let deeper = wrap(ok);
        assert!(matches!(
            encode("deep", &deeper, usize::MAX),
            Err(Error::InvalidAttribute { reason, .. }) if reason.contains("deeper")
        ));
        // Deeper than serde_json parses, yet dropped normally.
        let mut parsed_depth = json!(1);
        for _ in 0..200 {
            parsed_depth = wrap(parsed_depth);
        }
        assert!(encode("deep", parsed_depth, usize::MAX).is_err());
        // Far deeper than any stack could recurse through: refused at the limit.
        let mut abyss = json!(1);
        for _ in 0..50_000 {
            abyss = wrap(abyss);
        }
        assert!(matches!(
            encode("abyss", abyss, usize::MAX),
            Err(Error::InvalidAttribute { .. })
        ));
    }

    #[test]
    fn nul_is_refused_in_keys_strings_and_nested_keys() {
        for (key, value) in [
            ("k\0", json!(1)),
            ("k", json!("a\0b")),
            ("k", json!({"x": [1, {"y\0": 2}]})),
        ] {
            assert!(
                matches!(
                    encode(key, &value, usize::MAX),
                    Err(Error::InvalidAttribute { .. })
                ),
                "{key:?} {value}"
            );
        }
    }

    #[test]
    fn integral_floats_of_1e16_and_more_become_the_integers_postgres_prints() {
        let cases = [
            (1e16, json!(10_000_000_000_000_000u64)),
            (-1e16, json!(-10_000_000_000_000_000i64)),
            (
                9_223_372_036_854_775_808.0,
                json!(9_223_372_036_854_775_808u64),
            ),
            (-9_223_372_036_854_775_808.0, json!(i64::MIN)),
            (1e20, json!(1e20)),
            (1.5, json!(1.5)),
            (-0.0, json!(0.0)),
            (1e15, json!(1e15)),
        ];
        for (input, expected) in cases {
            let got = encode("n", input, usize::MAX).unwrap();
            assert_eq!(got, expected, "{input:e}");
            assert_eq!(got.to_string(), expected.to_string(), "{input:e}");
        }
        assert_eq!(encode("f", 0.1f32, usize::MAX).unwrap(), json!(0.1));
    }

    #[test]
    fn sizes_count_the_key_and_the_compact_value() {
        let err = encode("big", "x".repeat(40), 32).unwrap_err();
        // "big":"xxx…" is 6 + 42 bytes.
        assert!(matches!(
            err,
            Error::AttributeTooLarge {
                size: 48,
                limit: 32,
                ..
            }
        ));
        check("big", &json!("x".repeat(24)), 32).unwrap();
        assert!(check("big", &json!("x".repeat(25)), 32).is_err());
    }

    #[test]
    fn stored_size_is_the_jsonb_text_length() {
        let map: Map<String, Value> = serde_json::from_value(json!({
            "a": [1, 2, {"b": null}],
            "big": 1.5e300,
            "small": 1.5e-7,
            "s": "x\ny"
        }))
        .unwrap();
        let expected = format!(
            "{{\"a\": [1, 2, {{\"b\": null}}], \"s\": \"x\\ny\", \"big\": 15{}, \"small\": 0.00000015}}",
            "0".repeat(299)
        );
        assert_eq!(stored_size(&map), expected.len());
        assert_eq!(plain_decimal(b"5e-324").len(), 326);
        assert_eq!(plain_decimal(b"-1.25e+2"), b"-125");
        assert_eq!(plain_decimal(b"1.2345e+2"), b"123.45");
    }
}
