//! Being written: an actix-web app with pgsession::actix_session.
fn main() {}
