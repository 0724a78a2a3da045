//! JSON Schemas for `/schema`, generated from Rust types.
//!
//! The reference host writes schemas in a plain dialect: no `$schema`, no
//! `title`, no numeric `format`, and an optional value as
//! `{"anyOf": [{...}, {"type": "null"}]}`. The plugin id is a hash of the
//! schema, so a Rust plugin whose types mean the same as a Python plugin's
//! parameters gets the same id only if its schema is written the same way.
//! [`schema_for`] therefore normalises what schemars generates to that
//! dialect.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{Map, Value};

/// The JSON Schema of `T`, in the reference host's dialect.
pub fn schema_for<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    normalise(&mut schema);
    schema
}

const NUMERIC_FORMATS: &[&str] = &[
    "int8", "int16", "int32", "int64", "int", "uint8", "uint16", "uint32", "uint64", "uint",
    "float", "double",
];

fn normalise(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("$schema");
            map.remove("title");
            if map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| NUMERIC_FORMATS.contains(&f))
            {
                map.remove("format");
            }
            nullable_type_to_any_of(map);
            for child in map.values_mut() {
                normalise(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise),
        _ => {}
    }
}

/// `{"type": ["string", "null"], ...}` becomes
/// `{"anyOf": [{"type": "string", ...}, {"type": "null"}]}`.
fn nullable_type_to_any_of(map: &mut Map<String, Value>) {
    let Some(Value::Array(types)) = map.get("type") else {
        return;
    };
    if types.len() != 2 || !types.contains(&Value::from("null")) {
        return;
    }
    let Some(inner) = types.iter().find(|t| *t != "null").cloned() else {
        return;
    };
    // Keywords that describe the value, not the schema slot, move inside.
    let outer_keys = ["default", "description"];
    let mut inner_schema = Map::new();
    inner_schema.insert("type".into(), inner);
    let keys: Vec<String> = map
        .keys()
        .filter(|k| *k != "type" && !outer_keys.contains(&k.as_str()))
        .cloned()
        .collect();
    for k in keys {
        if let Some(val) = map.remove(&k) {
            inner_schema.insert(k, val);
        }
    }
    map.remove("type");
    let mut null = Map::new();
    null.insert("type".into(), Value::from("null"));
    map.insert(
        "anyOf".into(),
        Value::Array(vec![Value::Object(inner_schema), Value::Object(null)]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Input {
        a: Option<String>,
        #[serde(default = "one")]
        b: i64,
        c: Option<Inner>,
    }

    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Inner {
        x: u32,
    }

    fn one() -> i64 {
        1
    }

    // `Option` fields are not required: serde reads a missing one as `None`.
    #[test]
    fn schemas_use_the_reference_dialect() {
        let s = schema_for::<Input>();
        assert_eq!(
            s,
            serde_json::json!({
                "type": "object",
                "properties": {
                    "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "b": {"type": "integer", "default": 1},
                    "c": {"anyOf": [
                        {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0}}, "required": ["x"]},
                        {"type": "null"}
                    ]}
                }
            })
        );
    }
}
