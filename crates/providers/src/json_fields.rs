//! Reading a few fields of a provider's JSON without building a tree of it.
//!
//! An inbound parser needs an event's id, type and a flag or two, and delivers the event
//! itself as bytes. [`JsonObject`] keeps each top-level field as its raw JSON text,
//! borrowed from the body: the document is checked in full, but only the fields read are
//! decoded, and an event's bytes are the ones the provider sent.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::inbound::Rejection;

/// The fields of one JSON object, each as raw JSON. A key that repeats keeps its last
/// value, as in `serde_json::Value`.
#[derive(Debug)]
pub(crate) struct JsonObject<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> JsonObject<'a> {
    /// A whole body: `Err` when it is not JSON, `None` when it is JSON but not an object.
    pub(crate) fn parse(body: &'a [u8]) -> Result<Option<Self>, Rejection> {
        Ok(match read(body)? {
            Shape::Object(fields) => Some(Self { fields }),
            _ => None,
        })
    }

    /// A value inside a document already read; `None` when it is not an object.
    pub(crate) fn of(raw: &'a RawValue) -> Option<Self> {
        Self::parse(raw.get().as_bytes()).ok().flatten()
    }

    /// A field's raw JSON.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// A string field, non-empty; `None` when missing, empty or not a string.
    pub(crate) fn str(&self, key: &str) -> Option<Cow<'a, str>> {
        let raw = self.get(key)?;
        if !raw.get().starts_with('"') {
            return None;
        }
        let Text(s) = serde_json::from_str(raw.get()).ok()?;
        (!s.is_empty()).then_some(s)
    }

    /// A boolean field; `None` when missing or not a boolean.
    pub(crate) fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)?.get() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// An object field.
    pub(crate) fn object(&self, key: &str) -> Option<JsonObject<'a>> {
        Self::of(self.get(key)?)
    }
}

/// The elements of a JSON array body: `Err` when it is not JSON, `None` when it is JSON but
/// not an array.
pub(crate) fn array(body: &[u8]) -> Result<Option<Vec<&RawValue>>, Rejection> {
    Ok(match read(body)? {
        Shape::Array(items) => Some(items),
        _ => None,
    })
}

/// The elements of an array inside a document already read; `None` when it is not one.
pub(crate) fn array_of(raw: &RawValue) -> Option<Vec<&RawValue>> {
    array(raw.get().as_bytes()).ok().flatten()
}

/// A value's bytes, owned (what an event's payload holds).
pub(crate) fn bytes(raw: &RawValue) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(raw.get().as_bytes())
}

fn read(json: &[u8]) -> Result<Shape<'_>, Rejection> {
    serde_json::from_slice(json).map_err(|_| Rejection::BadRequest("malformed json"))
}

/// The top level of a document: an object's fields, an array's elements, or anything else.
enum Shape<'a> {
    Object(Vec<(Cow<'a, str>, &'a RawValue)>),
    Array(Vec<&'a RawValue>),
    Other,
}

impl<'de> Deserialize<'de> for Shape<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(Text(key)) = map.next_key()? {
            fields.push((key, map.next_value()?));
        }
        Ok(Shape::Object(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(1));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Shape::Array(items))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Shape::Other)
    }
}

/// A JSON string, borrowed from the document unless it holds escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: &str) -> JsonObject<'_> {
        JsonObject::parse(json.as_bytes()).unwrap().unwrap()
    }

    #[test]
    fn reads_fields_without_copying_plain_strings() {
        let o = object(r#"{"id":"e1","n":3,"t":true,"f":false,"empty":"","x":null}"#);
        assert!(matches!(o.str("id"), Some(Cow::Borrowed("e1"))));
        assert_eq!(o.str("n"), None, "a number is not a string");
        assert_eq!(o.str("empty"), None);
        assert_eq!(o.str("missing"), None);
        assert_eq!(o.bool("t"), Some(true));
        assert_eq!(o.bool("f"), Some(false));
        assert_eq!(o.bool("x"), None);
        assert_eq!(o.bool("id"), None);
        assert_eq!(o.get("n").map(RawValue::get), Some("3"));
    }

    #[test]
    fn unescapes_strings_and_keys() {
        let o = object(r#"{"i\u0064":"a\"b\u00e9","k":"v"}"#);
        assert_eq!(o.str("id").as_deref(), Some("a\"bé"));
        assert_eq!(o.str("k").as_deref(), Some("v"));
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let o = object(r#"{"id":"first","id":"last"}"#);
        assert_eq!(o.str("id").as_deref(), Some("last"));
    }

    #[test]
    fn nested_objects_and_arrays_are_read_on_demand() {
        let o = object(r#"{"meta":{"type":"a.b"},"data":[{"id":1},2],"s":"x"}"#);
        assert_eq!(
            o.object("meta").unwrap().str("type").as_deref(),
            Some("a.b")
        );
        assert!(o.object("s").is_none());
        let items = array_of(o.get("data").unwrap()).unwrap();
        let raw: Vec<_> = items.iter().map(|i| i.get()).collect();
        assert_eq!(raw, [r#"{"id":1}"#, "2"]);
        assert!(array_of(o.get("meta").unwrap()).is_none());
    }

    #[test]
    fn an_element_keeps_the_bytes_it_was_sent_with() {
        let body = br#"[ {"b":1,  "a":"x"} , "s" ]"#;
        let items = array(body).unwrap().unwrap();
        assert_eq!(&bytes(items[0])[..], br#"{"b":1,  "a":"x"}"#);
        assert_eq!(&bytes(items[1])[..], br#""s""#);
    }

    #[test]
    fn tells_malformed_json_from_another_shape() {
        for bad in [&b"{"[..], b"", b"[1,", br#"{"a":1} x"#, b"\xff"] {
            assert_eq!(
                JsonObject::parse(bad).unwrap_err(),
                Rejection::BadRequest("malformed json"),
                "{bad:?}"
            );
            assert_eq!(
                array(bad).unwrap_err(),
                Rejection::BadRequest("malformed json")
            );
        }
        for other in [&b"[1]"[..], b"\"s\"", b"1", b"null", b"true"] {
            assert!(JsonObject::parse(other).unwrap().is_none(), "{other:?}");
        }
        for other in [&b"{}"[..], b"\"s\"", b"-7"] {
            assert!(array(other).unwrap().is_none(), "{other:?}");
        }
    }
}
