//! Rows as records: the decoders of every statement that returns sessions.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

use crate::error::Result;
use crate::model::attributes::Attributes;
use crate::model::ids::UserId;
use crate::model::record::{Client, Lean, Record};
use crate::storage::AttributeExpiry;

/// A whole session row (the columns of `{{cols}}`).
pub(super) fn record(row: &PgRow) -> Result<Record> {
    let Json(attributes): Json<Attributes> = row.try_get("attributes")?;
    let Json(expiry): Json<Map<String, Value>> = row.try_get("attribute_expiry")?;
    let mut record = without_attributes(row, row.try_get("id")?)?;
    record.attributes = Arc::new(attributes);
    record.attribute_expiry = Lean::new(expiry_from_json(&expiry));
    Ok(record)
}

/// The state an update or rotation returned, under `id`: it sends the attributes (and their
/// expiry) back only when someone else wrote since the caller read them; otherwise they are
/// `base`'s, the caller's copy with its own changes applied.
pub(super) fn written(row: &PgRow, id: Uuid, base: &Record) -> Result<Record> {
    let attributes: Option<Json<Attributes>> = row.try_get("attributes")?;
    let expiry: Option<Json<Map<String, Value>>> = row.try_get("attribute_expiry")?;
    let mut record = without_attributes(row, id)?;
    match attributes {
        Some(Json(attributes)) => {
            record.attributes = Arc::new(attributes);
            record.attribute_expiry = Lean::new(
                expiry
                    .map(|Json(e)| expiry_from_json(&e))
                    .unwrap_or_default(),
            );
        }
        None => {
            record.attributes = base.attributes.clone();
            record.attribute_expiry = base.attribute_expiry.clone();
        }
    }
    Ok(record)
}

/// Every column but the attributes and their expiry (left empty).
fn without_attributes(row: &PgRow, id: Uuid) -> Result<Record> {
    let ip: Option<String> = row.try_get("ip")?;
    let group: Option<String> = row.try_get("group_id")?;
    let user: Option<String> = row.try_get("user_id")?;
    Ok(Record {
        id,
        user_id: user.map(UserId::from),
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_accessed_at: row.try_get("last_accessed_at")?,
        expires_at: row.try_get("expires_at")?,
        attributes: Arc::default(),
        attribute_expiry: Lean::default(),
        group_id: group.map(Arc::from),
        client: Lean::new(Client {
            // Written by pgsession from an IpAddr; anything else (a hand edit) is not one.
            ip: ip.and_then(|ip| ip.parse().ok()),
            user_agent: row.try_get("user_agent")?,
        }),
        reads: row.try_get("reads")?,
        writes: row.try_get("writes")?,
    })
}

/// Attribute expiry as stored: key -> microseconds since 1970.
pub(super) fn expiry_json(expiry: &AttributeExpiry) -> Map<String, Value> {
    expiry
        .iter()
        .map(|(k, at)| (k.clone(), Value::from(at.timestamp_micros())))
        .collect()
}

fn expiry_from_json(json: &Map<String, Value>) -> AttributeExpiry {
    json.iter()
        .filter_map(|(k, v)| {
            let at = DateTime::<Utc>::from_timestamp_micros(v.as_i64()?)?;
            Some((k.clone(), at))
        })
        .collect()
}
