//! The values pgsession hands around: identifiers and tokens, the session and its stored
//! record, attribute encoding, the clock and the expiry policy. No I/O happens here.

pub(crate) mod attributes;
pub(crate) mod clock;
pub(crate) mod expiry;
pub(crate) mod ids;
pub(crate) mod json;
pub(crate) mod options;
pub(crate) mod record;
pub(crate) mod session;
pub(crate) mod token;
