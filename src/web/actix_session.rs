//! A store for actix-session 0.11 (cargo feature `actix-session`): being written.
