//! The fast path of input validation, for the schemas most plugins have: an
//! object of named scalar inputs (strings, integers, numbers, booleans,
//! each maybe nullable), some required, some with defaults.
//!
//! For such a schema, [`FlatPlan::prepare`] checks the body straight from
//! its bytes, copies each accepted value's text into the plugin's input, and
//! builds no `Value` tree. It accepts only input that needs no conversion
//! and no error report, and writes the very bytes the general path would
//! (keys in the same order, defaults filled in, undeclared fields dropped).
//! Anything else (a string with escapes, `"3"` for an integer, a
//! missing required field, malformed JSON...) gets `None`, and the general
//! path in the parent module decides. So the fast path changes how quickly
//! an answer comes, never which answer: a property test holds it to that.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};

use super::decode::{nests_deeper_than, MAX_DEPTH};

/// At most this many declared inputs: a plan keeps what it found on the
/// stack.
const MAX_FIELDS: usize = 16;

/// Where the reserved fields' text is kept, after the declared inputs'.
const SETTINGS_SLOT: usize = MAX_FIELDS;
const CONTEXT_SLOT: usize = MAX_FIELDS + 1;

/// What the fast path vouches for: the plugin's input, and the reserved
/// fields' text as sent (checked by the caller).
pub struct FastInput<'a> {
    pub input: Vec<u8>,
    pub settings: Option<&'a RawValue>,
    pub context: Option<&'a RawValue>,
}

/// A compiled check of an object of scalar inputs.
pub struct FlatPlan {
    /// The declared inputs, in the order the general path writes them
    /// (the schema's order).
    fields: Vec<Field>,
}

struct Field {
    name: String,
    /// `"name":`, escaped once, at compile time.
    key: Vec<u8>,
    scalar: Scalar,
    nullable: bool,
    required: bool,
    /// The default's JSON text, written for an absent optional input.
    default: Option<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scalar {
    String,
    Integer,
    Number,
    Boolean,
}

impl FlatPlan {
    /// The plan for `schema`, or `None` when the schema uses anything the
    /// fast path does not check (then every body takes the general path).
    pub fn compile(schema: &Value) -> Option<FlatPlan> {
        let top = schema.as_object()?;
        // Only these keywords: anything else (additionalProperties, $defs,
        // allOf...) changes what is valid or what is kept.
        let known = ["type", "properties", "required", "title", "description"];
        if top.keys().any(|k| !known.contains(&k.as_str())) || top.get("type")? != "object" {
            return None;
        }
        let props = match top.get("properties") {
            Some(Value::Object(props)) => props,
            None => &Map::new(),
            Some(_) => return None,
        };
        let required: Vec<&str> = match top.get("required") {
            Some(Value::Array(names)) => names.iter().map(Value::as_str).collect::<Option<_>>()?,
            None => Vec::new(),
            Some(_) => return None,
        };
        if props.len() > MAX_FIELDS
            || required.iter().any(|r| !props.contains_key(*r))
            || props.keys().any(|name| super::reserved::is_reserved(name))
        {
            return None;
        }
        let fields = props
            .iter()
            .map(|(name, prop)| {
                let (scalar, nullable) = slot(prop)?;
                let default = match prop.get("default") {
                    Some(d) => Some(serde_json::to_vec(d).ok()?),
                    None => None,
                };
                let mut key = serde_json::to_vec(name).ok()?;
                key.push(b':');
                Some(Field {
                    name: name.clone(),
                    key,
                    scalar,
                    nullable,
                    required: required.contains(&name.as_str()),
                    default,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FlatPlan { fields })
    }

    /// The plugin's input for a JSON `body`, when the fast path can vouch
    /// for it; `None` sends the body to the general path.
    pub fn prepare<'b>(&self, body: &'b [u8]) -> Option<FastInput<'b>> {
        // One UTF-8 check of the whole body, rather than one per string.
        let text = std::str::from_utf8(body).ok()?;
        let mut de = serde_json::Deserializer::from_str(text);
        let mut found: Found<'_> = [None; MAX_FIELDS + 2];
        de.deserialize_map(Fields(self, &mut found)).ok()?;
        de.end().ok()?;
        let mut out = Vec::with_capacity(body.len() + 16);
        out.push(b'{');
        for (field, raw) in self.fields.iter().zip(&found) {
            let text = match raw {
                Some(raw) => Some(field.accept(raw.get())?),
                None if field.required => return None,
                None => field.default.as_deref().map(Text::Verbatim),
            };
            let Some(text) = text else { continue };
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(&field.key);
            match text {
                Text::Verbatim(t) => out.extend_from_slice(t),
                Text::Number(n) => serde_json::to_writer(&mut out, &n).ok()?,
            }
        }
        out.push(b'}');
        Some(FastInput {
            input: out,
            settings: found[SETTINGS_SLOT],
            context: found[CONTEXT_SLOT],
        })
    }
}

/// A value's text for the plugin's input.
enum Text<'a> {
    /// Copied as it came.
    Verbatim(&'a [u8]),
    /// Written the way the general path writes a number it parsed.
    Number(Number),
}

impl Field {
    /// How `raw` (one value's JSON text) goes into the input, or `None`
    /// when it needs the general path: a conversion, a 422, or text that
    /// serde_json would write differently.
    fn accept<'a>(&self, raw: &'a str) -> Option<Text<'a>> {
        if raw == "null" {
            return self.nullable.then_some(Text::Verbatim(b"null"));
        }
        match self.scalar {
            // Without escapes, a string's text is what serde_json writes.
            // (A plain loop: these strings are short, shorter than a call
            // to memchr is worth.)
            Scalar::String => (raw.starts_with('"') && !raw.bytes().any(|b| b == b'\\'))
                .then_some(Text::Verbatim(raw.as_bytes())),
            Scalar::Boolean => {
                (raw == "true" || raw == "false").then_some(Text::Verbatim(raw.as_bytes()))
            }
            Scalar::Integer => {
                // Digits only: `2.0` and `1e3` are conversions.
                let digits = raw.strip_prefix('-').unwrap_or(raw);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                // `-0` is written `0` for the plugin, and integers past 64
                // bits are the general path's: it passes them on exactly.
                if raw == "-0" {
                    return None;
                }
                let n: Number = serde_json::from_str(raw).ok()?;
                (n.is_i64() || n.is_u64()).then_some(Text::Number(n))
            }
            Scalar::Number => {
                let first = raw.bytes().next()?;
                if first != b'-' && !first.is_ascii_digit() {
                    return None;
                }
                serde_json::from_str::<Number>(raw).ok().map(Text::Number)
            }
        }
    }
}

/// The scalar type a property asks for, and whether it may be null:
/// `{"type": T}` or `{"anyOf": [{"type": T}, {"type": "null"}]}`, with only
/// annotations beside.
fn slot(prop: &Value) -> Option<(Scalar, bool)> {
    let prop = prop.as_object()?;
    let known = ["type", "anyOf", "title", "description", "default"];
    if prop.keys().any(|k| !known.contains(&k.as_str())) {
        return None;
    }
    match (prop.get("type"), prop.get("anyOf")) {
        (Some(t), None) => Some((scalar(t.as_str()?)?, false)),
        (None, Some(Value::Array(any))) if any.len() == 2 => {
            let (a, b) = (only_type(&any[0])?, only_type(&any[1])?);
            match (a, b) {
                ("null", t) | (t, "null") => Some((scalar(t)?, true)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `T` of a schema that is exactly `{"type": T}`.
fn only_type(schema: &Value) -> Option<&str> {
    let o = schema.as_object()?;
    if o.len() != 1 {
        return None;
    }
    o.get("type")?.as_str()
}

fn scalar(t: &str) -> Option<Scalar> {
    Some(match t {
        "string" => Scalar::String,
        "integer" => Scalar::Integer,
        "number" => Scalar::Number,
        "boolean" => Scalar::Boolean,
        _ => return None,
    })
}

/// Reads a body object into the second field: each declared input's raw
/// text, by field index (written in place rather than returned, as the
/// array is a few hundred bytes). A repeated key keeps its last value, as
/// serde_json's map does.
struct Fields<'p, 'f, 'de>(&'p FlatPlan, &'f mut Found<'de>);

/// By field index, then the reserved fields at their slots.
type Found<'de> = [Option<&'de RawValue>; MAX_FIELDS + 2];

impl<'de> Visitor<'de> for Fields<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(index) = map.next_key_seed(Key(self.0))? {
            let raw: &RawValue = map.next_value()?;
            // Skipping a value checks less than parsing it. What the
            // general path may refuse goes there: nesting deeper than the
            // body may (less the body's own object), and a `\u` escape
            // outside the declared inputs (their strings take no escapes
            // here), which may be a lone surrogate.
            let text = raw.get();
            let declared = index.is_some_and(|i| i < MAX_FIELDS);
            if (text.starts_with(['[', '{']) && nests_deeper_than(text, MAX_DEPTH - 1))
                || (!declared && text.contains("\\u"))
            {
                return Err(de::Error::custom("for the general path"));
            }
            if let Some(i) = index {
                self.1[i] = Some(raw);
            }
        }
        Ok(())
    }
}

/// A key of the body object: the index of the declared input it names.
struct Key<'p>(&'p FlatPlan);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(match key {
            "invocation_settings" => Some(SETTINGS_SLOT),
            "invocation_context" => Some(CONTEXT_SLOT),
            _ => self.0.fields.iter().position(|f| f.name == key),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(schema: Value) -> Option<FlatPlan> {
        FlatPlan::compile(&schema)
    }

    fn wordcount() -> FlatPlan {
        plan(json!({
            "type": "object", "required": ["text"],
            "properties": {"text": {"type": "string"}, "repeat": {"type": "integer", "default": 1}}
        }))
        .unwrap()
    }

    fn prepared(plan: &FlatPlan, body: &str) -> Option<String> {
        plan.prepare(body.as_bytes())
            .map(|b| String::from_utf8(b.input).unwrap())
    }

    #[test]
    fn plain_input_takes_the_fast_path() {
        let p = wordcount();
        assert_eq!(
            prepared(&p, r#"{"text":"hello big world"}"#).as_deref(),
            Some(r#"{"text":"hello big world","repeat":1}"#)
        );
        assert_eq!(
            prepared(
                &p,
                r#" { "repeat" : 3 , "text" : "a", "extra": [1, {"b": 2}] } "#
            )
            .as_deref(),
            Some(r#"{"text":"a","repeat":3}"#)
        );
        // A repeated key keeps its last value, as serde_json's map does.
        assert_eq!(
            prepared(&p, r#"{"text":"a","text":"b"}"#).as_deref(),
            Some(r#"{"text":"b","repeat":1}"#)
        );
    }

    #[test]
    fn anything_needing_a_conversion_or_a_422_goes_to_the_general_path() {
        let p = wordcount();
        for body in [
            r#"{"repeat":2}"#,
            r#"{"text":"a","repeat":"3"}"#,
            r#"{"text":"a","repeat":2.0}"#,
            r#"{"text":"a","repeat":-0}"#,
            r#"{"text":"a","repeat":true}"#,
            r#"{"text":"a","repeat":null}"#,
            r#"{"text":"a","repeat":99999999999999999999999}"#,
            r#"{"text":"caf\u00e9"}"#,
            r#"{"text":5}"#,
            r#"{"text":"a"} x"#,
            r#"{"text":"a""#,
            r#"["text"]"#,
            "null",
        ] {
            assert_eq!(prepared(&p, body), None, "{body}");
        }
    }

    #[test]
    fn only_flat_schemas_of_scalars_compile() {
        let nullable = json!({"anyOf": [{"type": "null"}, {"type": "number"}], "default": null});
        assert!(plan(json!({"type": "object", "properties": {"x": nullable}})).is_some());
        assert!(plan(json!({"type": "object"})).is_some());
        for schema in [
            json!({"type": "object", "additionalProperties": false, "properties": {}}),
            json!({"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}}),
            json!({"type": "object", "properties": {"x": {"enum": ["a", "b"]}}}),
            json!({"type": "object", "properties": {"x": {"type": "object"}}}),
            json!({"type": "object", "properties": {"x": {"type": "array", "items": {}}}}),
            json!({"type": "object", "properties": {"x": {"type": ["string", "null"]}}}),
            json!({"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {}}),
            json!({"type": "object", "required": ["y"], "properties": {"x": {"type": "string"}}}),
            json!({"type": "array"}),
        ] {
            assert!(plan(schema.clone()).is_none(), "{schema}");
        }
        let many: Map<String, Value> = (0..=MAX_FIELDS)
            .map(|i| (format!("f{i}"), json!({"type": "string"})))
            .collect();
        assert!(plan(json!({"type": "object", "properties": many})).is_none());
    }
}
