//! JSON Schemas for `/schema`, generated from Rust types.
//!
//! The reference host writes schemas in a plain dialect: no `$schema`, no
//! `title`, no numeric `format`, and an optional value as
//! `{"anyOf": [{...}, {"type": "null"}]}`. The plugin id is a hash of the
//! schema, so a Rust plugin whose types mean the same as a Python plugin's
//! parameters gets the same id only if its schema is written the same way.
//! [`schema_for`] therefore normalises what schemars generates to that
//! dialect: it drops `$schema`, `title` and `description` (so doc comments
//! do not change the id), numeric `format`s, and `additionalProperties:
//! true`, and writes a nullable type as `anyOf`.
//!
//! How Rust types map, next to the Python annotation that gives the same
//! schema (and so the same id; the tests below hold the whole mapping to
//! what etl-uvicorn 0.1.0 generates):
//!
//! | Rust field | Python parameter | schema |
//! |---|---|---|
//! | `i64` | `int` | `{"type": "integer"}` |
//! | `f64` | `float` | `{"type": "number"}` |
//! | `String` | `str` | `{"type": "string"}` |
//! | `bool` | `bool` | `{"type": "boolean"}` |
//! | `Vec<T>` | `list[T]` | `{"type": "array", "items": T}` |
//! | `serde_json::Map<String, Value>` | `dict` | `{"type": "object"}` |
//! | `serde_json::Value` with `#[serde(default)]` | `Any = None` | `{"default": null}` |
//! | `Option<T>` with `#[serde(default)]` | `Optional[T] = None` | `{"anyOf": [T, {"type": "null"}], "default": null}`, not required |
//! | `#[serde(default = "f")] x: i64` | `x: int = 3` | `{"type": "integer", "default": 3}`, not required |
//! | a struct deriving `JsonSchema` | a `TypedDict`, dataclass or model | the object, inline |
//! | a unit-variant enum (`#[serde(rename_all = "lowercase")]`) | an `Enum` of strings | `{"type": "string", "enum": [...]}` |
//!
//! Where they differ, and the id with them:
//! - an unsigned integer (`u32`, `u64`...) adds `"minimum": 0`, which
//!   Python's `int` does not have: use `i64` for the same id;
//! - an `Option<S>` of a struct writes its `"default": null` only when `S`
//!   also derives `Serialize`;
//! - `Literal["a", "b"]` is a bare `{"type": "string"}` for the reference,
//!   while a Rust enum lists its values: use `String` for the same id;
//! - serde renames (`rename`, `rename_all`) change the property names, as
//!   they should; `#[serde(flatten)]` and untagged enums have no Python
//!   spelling.

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

/// The JSON Schema of an input type `T`, as the reference host writes a
/// function's parameters: like [`schema_for`], with `required` (when
/// there is one) before `properties` at the top, so that `/schema` is the
/// reference's text byte for byte.
pub fn inputs_schema_for<T: JsonSchema>() -> Value {
    let Value::Object(mut top) = schema_for::<T>() else {
        unreachable!("schemars writes an object schema for every type")
    };
    let mut ordered = Map::with_capacity(top.len());
    for key in ["type", "required", "properties"] {
        if let Some(value) = top.shift_remove(key) {
            ordered.insert(key.into(), value);
        }
    }
    ordered.extend(top);
    Value::Object(ordered)
}

const NUMERIC_FORMATS: &[&str] = &[
    "int8", "int16", "int32", "int64", "int", "uint8", "uint16", "uint32", "uint64", "uint",
    "float", "double",
];

/// Rewrites one schema, and every schema inside it, in the reference's
/// dialect. Only schemas are touched: a property that happens to be named
/// `title`, or a default value with a `description` key, is data and stays.
fn normalise(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    // The reference writes none of these: a doc comment on a Rust type or
    // field would otherwise change the plugin id.
    for keyword in ["$schema", "title", "description"] {
        map.remove(keyword);
    }
    // What every object allows anyway; the reference writes a `dict` as a
    // bare `{"type": "object"}`.
    if map.get("additionalProperties") == Some(&Value::Bool(true)) {
        map.remove("additionalProperties");
    }
    if map
        .get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| NUMERIC_FORMATS.contains(&f))
    {
        map.remove("format");
    }
    nullable_type_to_any_of(map);
    for (key, value) in map.iter_mut() {
        match (key.as_str(), value) {
            // Maps from names to schemas.
            ("properties" | "patternProperties" | "$defs" | "definitions", Value::Object(subs)) => {
                subs.values_mut().for_each(normalise);
            }
            // Lists of schemas.
            ("anyOf" | "oneOf" | "allOf" | "prefixItems", Value::Array(subs)) => {
                subs.iter_mut().for_each(normalise);
            }
            // One schema (or, for an old-style `items`, a list of them).
            (
                "items"
                | "additionalProperties"
                | "additionalItems"
                | "not"
                | "contains"
                | "if"
                | "then"
                | "else"
                | "propertyNames"
                | "unevaluatedProperties"
                | "unevaluatedItems",
                sub,
            ) => match sub {
                Value::Array(subs) => subs.iter_mut().for_each(normalise),
                sub => normalise(sub),
            },
            _ => {}
        }
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

    /// The Rust spelling of every parameter of this Python function, for
    /// which etl-uvicorn 0.1.0 writes [`PYTHON_F`]:
    ///
    /// ```python
    /// class Color(enum.Enum): red = "red"; blue = "blue"
    /// class Inner(TypedDict): x: int
    /// @dataclass
    /// class Point: x: int; y: float = 0.0
    /// def f(i: int, f: float, s: str, b: bool, l: list[str], d: dict, c: Color,
    ///       o: Optional[int] = None, dflt: int = 3, inner: Optional[Inner] = None,
    ///       p: Optional[Point] = None, a: Any = None): ...
    /// ```
    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct F {
        i: i64,
        f: f64,
        s: String,
        b: bool,
        l: Vec<String>,
        d: serde_json::Map<String, serde_json::Value>,
        c: Color,
        #[serde(default)]
        o: Option<i64>,
        #[serde(default = "three")]
        dflt: i64,
        #[serde(default)]
        inner: Option<TypedInner>,
        #[serde(default)]
        p: Option<Point>,
        #[serde(default)]
        a: serde_json::Value,
    }

    #[allow(dead_code)]
    #[derive(Deserialize, serde::Serialize, JsonSchema)]
    #[serde(rename_all = "lowercase")]
    enum Color {
        Red,
        Blue,
    }

    // Serialize too, so that the `None` default can be written: without
    // it schemars leaves `"default": null` out, and the id differs.
    #[allow(dead_code)]
    #[derive(Deserialize, serde::Serialize, JsonSchema)]
    struct TypedInner {
        x: i64,
    }

    #[allow(dead_code)]
    #[derive(Deserialize, serde::Serialize, JsonSchema)]
    struct Point {
        x: i64,
        #[serde(default)]
        y: f64,
    }

    fn three() -> i64 {
        3
    }

    /// Recorded from etl-uvicorn 0.1.0's schema generation.
    const PYTHON_F: &str = r#"{"type": "object", "required": ["i", "f", "s", "b", "l", "d", "c"], "properties": {"i": {"type": "integer"}, "f": {"type": "number"}, "s": {"type": "string"}, "b": {"type": "boolean"}, "l": {"type": "array", "items": {"type": "string"}}, "d": {"type": "object"}, "c": {"type": "string", "enum": ["red", "blue"]}, "o": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null}, "dflt": {"type": "integer", "default": 3}, "inner": {"anyOf": [{"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}, {"type": "null"}], "default": null}, "p": {"anyOf": [{"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "number", "default": 0.0}}, "required": ["x"]}, {"type": "null"}], "default": null}, "a": {"default": null}}}"#;

    #[test]
    fn the_rust_spelling_of_a_python_signature_gives_its_schema() {
        let python: serde_json::Value = serde_json::from_str(PYTHON_F).unwrap();
        // Compared as JSON values: key order does not enter the id.
        assert_eq!(schema_for::<F>(), python);
    }

    /// A documented type with a field named like a keyword.
    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Named {
        /// The document's title.
        title: String,
        #[serde(default = "meta")]
        meta: serde_json::Value,
    }

    fn meta() -> serde_json::Value {
        serde_json::json!({"description": "kept", "title": "kept"})
    }

    #[test]
    fn doc_comments_go_but_fields_and_defaults_named_like_keywords_stay() {
        assert_eq!(
            schema_for::<Named>(),
            serde_json::json!({
                "type": "object",
                "required": ["title"],
                "properties": {
                    "title": {"type": "string"},
                    "meta": {"default": {"description": "kept", "title": "kept"}}
                }
            })
        );
    }

    #[allow(dead_code)]
    #[derive(Deserialize, JsonSchema)]
    struct Unsigned {
        n: u32,
    }

    #[test]
    fn inputs_are_written_in_the_references_key_order() {
        #[allow(dead_code)]
        #[derive(Deserialize, JsonSchema)]
        struct Wordcount {
            text: String,
            #[serde(default = "one")]
            repeat: i64,
        }
        // What etl-uvicorn 0.1.0 serves for `wordcount(text: str, repeat: int = 1)`.
        assert_eq!(
            inputs_schema_for::<Wordcount>().to_string(),
            r#"{"type":"object","required":["text"],"properties":{"text":{"type":"string"},"repeat":{"type":"integer","default":1}}}"#
        );
    }

    #[test]
    fn an_unsigned_integer_adds_a_minimum_python_int_does_not_have() {
        assert_eq!(
            schema_for::<Unsigned>()["properties"]["n"],
            serde_json::json!({"type": "integer", "minimum": 0})
        );
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
