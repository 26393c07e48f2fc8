//! Tracing: every public operation opens one span named for it, carrying the public
//! `session.id` and `user.id` where known (never a token), and the hot path logs nothing at
//! info level or above. One test: the subscriber is process-wide.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::*;
use pgsession::{SessionToken, SigningKey};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::Registry;

/// A span as opened: its name and the fields recorded on it (at creation or later).
#[derive(Clone, Debug)]
struct Opened {
    name: String,
    fields: BTreeMap<String, String>,
}

#[derive(Default)]
struct Seen {
    spans: Vec<Opened>,
    by_id: BTreeMap<u64, usize>,
    /// pgsession's own events at info level or above: (level, message and fields).
    loud: Vec<(Level, String)>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Seen>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if !attrs.metadata().target().starts_with("pgsession") {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut seen = self.0.lock().unwrap();
        let at = seen.spans.len();
        seen.spans.push(Opened {
            name: attrs.metadata().name().to_string(),
            fields,
        });
        seen.by_id.insert(id.into_u64(), at);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut seen = self.0.lock().unwrap();
        if let Some(&at) = seen.by_id.get(&id.into_u64()) {
            values.record(&mut Fields(&mut seen.spans[at].fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if meta.target().starts_with("pgsession") && *meta.level() <= Level::INFO {
            let mut fields = BTreeMap::new();
            event.record(&mut Fields(&mut fields));
            self.0
                .lock()
                .unwrap()
                .loud
                .push((*meta.level(), format!("{fields:?}")));
        }
    }
}

impl Recorder {
    /// The spans opened and the loud events logged while `work` ran.
    async fn during<T>(&self, work: impl Future<Output = T>) -> (T, Vec<Opened>, Vec<String>) {
        let (spans, loud) = {
            let seen = self.0.lock().unwrap();
            (seen.spans.len(), seen.loud.len())
        };
        let out = work.await;
        let seen = self.0.lock().unwrap();
        let opened = seen.spans[spans..].to_vec();
        let logged = seen.loud[loud..]
            .iter()
            .map(|(l, m)| format!("{l} {m}"))
            .collect();
        (out, opened, logged)
    }
}

/// The one span `opened` holds for `operation`, with its fields.
fn only_span<'a>(opened: &'a [Opened], operation: &str) -> &'a BTreeMap<String, String> {
    let named: Vec<_> = opened.iter().filter(|s| s.name == operation).collect();
    assert_eq!(named.len(), 1, "one {operation} span: {opened:?}");
    &named[0].fields
}

#[tokio::test]
async fn every_operation_has_one_span_with_public_ids_and_the_hot_path_stays_quiet() {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(Registry::default().with(recorder.clone()))
        .expect("the only subscriber of this test binary");

    let db = TestDatabase::create().await;
    let m = node(
        &db,
        pgsession::Config {
            signing_keys: vec![SigningKey::generate()],
            ..config()
        },
    )
    .await;
    let mut tokens: Vec<SessionToken> = Vec::new();

    let ((mut s, token), opened, _) = recorder
        .during(async { m.create_session("alice", [("k", 1)]).await.unwrap() })
        .await;
    tokens.push(token.clone());
    let id = s.id().to_string();
    assert_eq!(
        only_span(&opened, "create_session").get("user.id"),
        Some(&"alice".to_string()),
        "{opened:?}"
    );

    // A miss (cleared cache) and then hits: the same span, with the public id.
    m.clear_cache().await.unwrap();
    for round in 0..3 {
        let (found, opened, loud) = recorder
            .during(async { m.get_session(&token).await.unwrap() })
            .await;
        assert!(found.is_some());
        assert_eq!(
            only_span(&opened, "get_session").get("session.id"),
            Some(&id),
            "round {round}"
        );
        assert!(loud.is_empty(), "a read logged at info or above: {loud:?}");
    }

    let (_, opened, _) = recorder
        .during(async { m.get_session_fresh(&token).await.unwrap().unwrap() })
        .await;
    assert_eq!(
        only_span(&opened, "get_session_fresh").get("session.id"),
        Some(&id)
    );

    s.set("k", 2).unwrap();
    let (_, opened, loud) = recorder
        .during(async { m.update_session(&mut s).await.unwrap() })
        .await;
    let update = only_span(&opened, "update_session");
    assert_eq!(update.get("session.id"), Some(&id));
    assert_eq!(update.get("user.id"), Some(&"alice".to_string()));
    assert!(
        loud.is_empty(),
        "an update logged at info or above: {loud:?}"
    );

    let (_, opened, loud) = recorder
        .during(async { m.touch_session(s.id()).unwrap() })
        .await;
    assert_eq!(
        only_span(&opened, "touch_session").get("session.id"),
        Some(&id)
    );
    assert!(loud.is_empty(), "a touch logged at info or above: {loud:?}");

    let (fresh, opened, _) = recorder
        .during(async { m.rotate_session(&mut s).await.unwrap() })
        .await;
    tokens.push(fresh);
    assert_eq!(
        only_span(&opened, "rotate_session").get("session.id"),
        Some(&id),
        "the span names the id the session had when asked"
    );

    let ((mut visitor, t), _, _) = recorder
        .during(async { m.create_anonymous_session([("cart", 1)]).await.unwrap() })
        .await;
    tokens.push(t);
    let visitor_id = visitor.id().to_string();
    let (t, opened, _) = recorder
        .during(async { m.log_in(&mut visitor, "alice").await.unwrap() })
        .await;
    tokens.push(t);
    let login = only_span(&opened, "log_in");
    assert_eq!(login.get("session.id"), Some(&visitor_id));
    assert_eq!(login.get("user.id"), Some(&"alice".to_string()));

    let (_, opened, _) = recorder
        .during(async { m.delete_session(visitor.id()).await.unwrap() })
        .await;
    assert_eq!(
        only_span(&opened, "delete_session").get("session.id"),
        Some(&visitor.id().to_string())
    );

    let (_, opened, _) = recorder
        .during(async { m.delete_all_user_sessions("alice").await.unwrap() })
        .await;
    assert_eq!(
        only_span(&opened, "delete_all_user_sessions").get("user.id"),
        Some(&"alice".to_string())
    );

    // No span or event field anywhere holds a token.
    let everything = {
        let seen = recorder.0.lock().unwrap();
        format!("{:?} {:?}", seen.spans, seen.loud)
    };
    for token in &tokens {
        assert!(
            !everything.contains(&token.to_string()),
            "a token was traced"
        );
    }
    m.shutdown().await.unwrap();
}
