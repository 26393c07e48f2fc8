//! A session's attributes as a cached record holds them: one sorted slice of pairs.
//!
//! serde_json's `Map` is a `BTreeMap`, whose first node has room for eleven pairs: about 630
//! bytes for a session of two attributes, over half of what a cached session cost. A session
//! is read far more often than written and holds a handful of keys, so a sorted slice (one
//! allocation, exactly as long as its pairs, found by binary search) suits it; a change
//! rebuilds it. The order is the `Map`'s (bytes of the key), so both serialize alike.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Attributes by key, sorted, each key once.
#[derive(Clone, Default, PartialEq)]
pub(crate) struct Attributes(Box<[(Box<str>, Value)]>);

impl Attributes {
    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Set `key`, returning the value it replaces.
    pub(crate) fn insert(&mut self, key: String, value: Value) -> Option<Value> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                let mut pairs = std::mem::take(&mut self.0).into_vec();
                pairs.insert(i, (key.into_boxed_str(), value));
                self.0 = pairs.into_boxed_slice();
                None
            }
        }
    }

    /// Remove `key`, returning its value.
    pub(crate) fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.find(key).ok()?;
        let mut pairs = std::mem::take(&mut self.0).into_vec();
        let (_, value) = pairs.remove(i);
        self.0 = pairs.into_boxed_slice();
        Some(value)
    }

    /// The pairs in key order.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The same pairs as a serde_json map.
    pub(crate) fn to_map(&self) -> Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect()
    }

    /// Built from pairs in any order; of a key given twice, the last value is kept (as a
    /// `Map` would).
    fn from_pairs(mut pairs: Vec<(Box<str>, Value)>) -> Attributes {
        // Stable, so that equal keys keep their order and the last one can be kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(Box<str>, Value)> = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            match kept.last_mut() {
                Some(last) if last.0 == key => last.1 = value,
                _ => kept.push((key, value)),
            }
        }
        Attributes(kept.into_boxed_slice())
    }
}

impl From<Map<String, Value>> for Attributes {
    fn from(map: Map<String, Value>) -> Attributes {
        Attributes::from_pairs(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v))
                .collect(),
        )
    }
}

impl FromIterator<(String, Value)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Attributes {
        Attributes::from_pairs(
            iter.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v))
                .collect(),
        )
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Attributes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Attributes, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Attributes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Attributes, A::Error> {
                let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0).min(256));
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    pairs.push((key.into_boxed_str(), value));
                }
                Ok(Attributes::from_pairs(pairs))
            }
        }
        deserializer.deserialize_map(Pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn attributes_behave_as_a_json_map_and_serialize_alike() {
        let text = r#"{"theme":"dark","b":[1,2],"a":{"z":1,"y":null},"":0}"#;
        let map: Map<String, Value> = serde_json::from_str(text).unwrap();
        let attributes: Attributes = serde_json::from_str(text).unwrap();
        assert_eq!(
            serde_json::to_string(&attributes).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
        assert_eq!(attributes, Attributes::from(map.clone()));
        assert_eq!(attributes.to_map(), map);
        assert_eq!(attributes.len(), 4);

        let mut a = attributes.clone();
        let mut m = map.clone();
        for (k, v) in [("b", json!(3)), ("c", json!("new")), ("", json!(null))] {
            assert_eq!(a.insert(k.into(), v.clone()), m.insert(k.into(), v));
        }
        for k in ["theme", "missing", "a"] {
            assert_eq!(a.remove(k), m.remove(k));
            assert_eq!(a.contains_key(k), m.contains_key(k));
        }
        assert_eq!(a.to_map(), m);
        for k in ["", "b", "c", "zz"] {
            assert_eq!(a.get(k), m.get(k));
        }
        let keys: Vec<&str> = a.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["", "b", "c"], "in key order");
    }

    #[test]
    fn of_a_key_given_twice_the_last_value_is_kept() {
        let a: Attributes = serde_json::from_str(r#"{"k":1,"j":0,"k":2}"#).unwrap();
        assert_eq!(a.get("k"), Some(&json!(2)));
        assert_eq!(a.len(), 2);
        let b: Attributes = [("k".to_string(), json!(1)), ("k".to_string(), json!(3))]
            .into_iter()
            .collect();
        assert_eq!(b.get("k"), Some(&json!(3)));
    }
}
