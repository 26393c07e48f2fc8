//! Names of the database objects for one schema and table prefix, and the one renderer that
//! puts them into SQL templates (migrations and statements alike).

/// Database object names derived from a validated configuration. Built only by
/// [`Config::validate`](crate::Config), which admits only `[a-z0-9_]` in the schema and
/// prefix, so no name can break out of a quoted identifier or a string literal.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    /// Quoted schema, e.g. `"public"`.
    pub schema: String,
    /// Unquoted schema name, for catalog lookups.
    pub schema_raw: String,
    /// Unquoted table prefix.
    pub prefix: String,
    /// Quoted, schema-qualified sessions table.
    pub sessions: String,
    /// Quoted, schema-qualified migrations bookkeeping table.
    pub migrations: String,
    /// Quoted, schema-qualified cache-epoch table.
    pub cache_epoch: String,
    /// Quoted, schema-qualified invalidation outbox.
    pub outbox: String,
    /// Quoted, schema-qualified sequence of the outbox.
    pub outbox_seq: String,
    /// Quoted, schema-qualified create function.
    pub create_fn: String,
    /// Quoted, schema-qualified rotate/login function.
    pub rotate_fn: String,
    /// NOTIFY channel, unique per schema and prefix.
    pub channel: String,
    /// Advisory-lock class for this table (first key of the two-key lock functions).
    pub lock_class: i32,
}

impl Names {
    /// Names for a validated `schema` and `prefix`.
    pub(crate) fn new(schema: &str, prefix: &str) -> Names {
        let channel = channel(schema, prefix);
        Names {
            schema: format!("\"{schema}\""),
            schema_raw: schema.to_owned(),
            prefix: prefix.to_owned(),
            sessions: format!("\"{schema}\".\"{prefix}sessions\""),
            migrations: format!("\"{schema}\".\"{prefix}sessions_migrations\""),
            cache_epoch: format!("\"{schema}\".\"{prefix}sessions_cache_epoch\""),
            outbox: format!("\"{schema}\".\"{prefix}sessions_outbox\""),
            outbox_seq: format!("\"{schema}\".\"{prefix}sessions_outbox_seq\""),
            create_fn: format!("\"{schema}\".\"{prefix}create_session\""),
            rotate_fn: format!("\"{schema}\".\"{prefix}rotate_session\""),
            lock_class: lock_class(&channel),
            channel,
        }
    }

    /// `template` with every `{{name}}` replaced: the object names above, then `extra`
    /// (constants a template needs).
    pub(crate) fn render(&self, template: &str, extra: &[(&str, &str)]) -> String {
        let lock_class = self.lock_class.to_string();
        let names = [
            ("sessions", self.sessions.as_str()),
            ("cache_epoch", self.cache_epoch.as_str()),
            ("outbox_seq", self.outbox_seq.as_str()),
            ("outbox", self.outbox.as_str()),
            ("migrations", self.migrations.as_str()),
            ("create_fn", self.create_fn.as_str()),
            ("rotate_fn", self.rotate_fn.as_str()),
            ("schema_raw", self.schema_raw.as_str()),
            ("prefix", self.prefix.as_str()),
            ("channel", self.channel.as_str()),
            ("lock_class", lock_class.as_str()),
        ];
        let mut out = template.to_owned();
        for (name, value) in names.iter().chain(extra) {
            out = out.replace(&format!("{{{{{name}}}}}"), value);
        }
        debug_assert!(
            !out.contains("{{"),
            "unknown placeholder left in a template: {out}"
        );
        out
    }
}

/// The application name a node's listener connection carries, `<prefix><node tag>`, and the
/// prefix alone (which names the table: its lock class), by which `status` finds the nodes.
impl Names {
    pub(crate) fn listener_application_prefix(&self) -> String {
        format!("pgsession-listener {:08x} ", self.lock_class as u32)
    }
}

/// The NOTIFY channel of a schema and prefix.
pub(crate) fn channel(schema: &str, prefix: &str) -> String {
    format!("pgsession.{schema}.{prefix}sessions")
}

/// A stable 32-bit key derived from the channel (FNV-1a), so that different schemas and prefixes
/// use different advisory locks and none collide with the application's single-key locks.
fn lock_class(channel: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in channel.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_and_extra_constants() {
        let names = Names::new("app", "x_");
        assert_eq!(
            names.render(
                "SELECT {{n}} FROM {{sessions}} -- {{channel}} {{lock_class}}",
                &[("n", "7")]
            ),
            format!(
                "SELECT 7 FROM \"app\".\"x_sessions\" -- pgsession.app.x_sessions {}",
                names.lock_class
            )
        );
    }
}
