//! Validation errors as FastAPI writes them: the 422 body, and each JSON
//! Schema error turned into the `{"type","loc","msg","input"}` item (with
//! `ctx` where pydantic has one) that pydantic reports for the same input.

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::LocationSegment;
use jsonschema::JsonType;
use serde_json::{json, Value};

use super::Rejection;

pub(super) fn detail(errors: Vec<Value>) -> Rejection {
    Rejection {
        status: 422,
        body: json!({ "detail": errors }),
    }
}

pub(super) fn error(kind: &str, path: &[Value], msg: &str, input: Value) -> Value {
    let mut loc = vec![Value::from("body")];
    loc.extend_from_slice(path);
    json!({ "type": kind, "loc": loc, "msg": msg, "input": input })
}

pub(super) fn not_a_dict(input: Value) -> Value {
    error(
        "model_attributes_type",
        &[],
        "Input should be a valid dictionary or object to extract fields from",
        input,
    )
}

// ---------------------------------------------------------------------------
// JSON Schema errors in FastAPI's words.
// ---------------------------------------------------------------------------

/// A JSON Schema error as the FastAPI items pydantic would report for the
/// same input: usually one, more for an optional value whose own schema
/// failed several ways.
///
/// `root` is the schema validated against, where a union's members are
/// looked up.
pub(super) fn to_fastapi(root: &Value, e: &jsonschema::ValidationError<'_>) -> Vec<Value> {
    if let ValidationErrorKind::AnyOf { context } = e.kind() {
        if let Some(items) = union_errors(root, e, context) {
            return items;
        }
    }
    to_fastapi_item(root, e).into_iter().collect()
}

/// A union's errors as pydantic reports them, or `None` to report the
/// union as a whole. `Optional[X]` (anyOf [X, null]) reports X's own
/// errors (`int_from_float`, `int_parsing`...). A union of several types
/// reports each member's errors in turn, its `loc` naming the member
/// (`["body", "value", "int"]`); only members whose name pydantic would
/// give is known from the schema (scalars, and lists of them) are named.
fn union_errors(
    root: &Value,
    e: &jsonschema::ValidationError<'_>,
    context: &[Vec<jsonschema::ValidationError<'_>>],
) -> Option<Vec<Value>> {
    let Value::Array(schemas) = root.pointer(e.schema_path().as_str())? else {
        return None;
    };
    let members: Vec<(&Vec<jsonschema::ValidationError<'_>>, &Value)> = context
        .iter()
        .zip(schemas)
        .filter(|(_, schema)| schema.get("type") != Some(&Value::from("null")))
        .collect();
    let depth = e.instance_path().iter().count() + 1;
    match members.as_slice() {
        [] => None,
        [(only, _)] => {
            let items: Vec<Value> = only.iter().flat_map(|e| to_fastapi(root, e)).collect();
            (!items.is_empty()).then_some(items)
        }
        several => {
            let mut items = Vec::new();
            for (errors, schema) in several {
                let tag = union_tag(schema)?;
                for mut item in errors.iter().flat_map(|e| to_fastapi(root, e)) {
                    if let Some(loc) = item["loc"].as_array_mut() {
                        loc.insert(depth.min(loc.len()), Value::from(tag.clone()));
                    }
                    items.push(item);
                }
            }
            (!items.is_empty()).then_some(items)
        }
    }
}

/// How pydantic names a union member in an error's `loc`, when the schema
/// says: `int`, `str`, `float`, `bool`, `list[int]`...
fn union_tag(schema: &Value) -> Option<String> {
    let keys_known = schema.as_object()?.keys().all(|k| {
        matches!(
            k.as_str(),
            "type" | "items" | "default" | "title" | "description"
        )
    });
    if !keys_known {
        return None;
    }
    Some(match schema.get("type")?.as_str()? {
        "integer" => "int".into(),
        "string" => "str".into(),
        "number" => "float".into(),
        "boolean" => "bool".into(),
        "array" => format!("list[{}]", union_tag(schema.get("items")?)?),
        _ => return None,
    })
}

/// Whether the schema whose keyword failed in `e` is a `pathlib.Path`
/// (the reference marks it `"is_path": true`).
fn is_path(root: &Value, e: &jsonschema::ValidationError<'_>) -> bool {
    let keyword = e.schema_path().as_str();
    let parent = keyword.rsplit_once('/').map_or("", |(parent, _)| parent);
    root.pointer(parent)
        .and_then(|s| s.get("is_path"))
        .is_some_and(|v| v == &Value::Bool(true))
}

fn to_fastapi_item(root: &Value, e: &jsonschema::ValidationError<'_>) -> Option<Value> {
    let path: Vec<Value> = e
        .instance_path()
        .iter()
        .map(|seg| match seg {
            LocationSegment::Property(p) => Value::from(p.as_ref()),
            LocationSegment::Index(i) => Value::from(i),
        })
        .collect();
    let input = e.instance().clone().into_owned();
    let (kind, msg): (&str, String) = match e.kind() {
        ValidationErrorKind::Required { property } => {
            let mut p = path.clone();
            p.push(property.clone());
            return Some(error("missing", &p, "Field required", input));
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let mut p = path.clone();
            p.push(Value::from(unexpected.first().cloned().unwrap_or_default()));
            return Some(error(
                "extra_forbidden",
                &p,
                "Extra inputs are not permitted",
                input,
            ));
        }
        ValidationErrorKind::Type { .. } if is_path(root, e) => (
            "path_type",
            "Input is not a valid path for <class 'pathlib.Path'>".to_owned(),
        ),
        ValidationErrorKind::Type { kind } => type_error(kind, &input),
        ValidationErrorKind::AnyOf { .. } => (
            "value_error",
            "Input does not match any of the allowed types".to_owned(),
        ),
        ValidationErrorKind::Enum { options } => {
            ("enum", format!("Input should be {}", one_of(options)))
        }
        ValidationErrorKind::Constant { expected_value } => (
            "literal_error",
            format!("Input should be {}", py_repr(expected_value)),
        ),
        ValidationErrorKind::Minimum { limit } => (
            "greater_than_equal",
            format!("Input should be greater than or equal to {limit}"),
        ),
        ValidationErrorKind::Maximum { limit } => (
            "less_than_equal",
            format!("Input should be less than or equal to {limit}"),
        ),
        ValidationErrorKind::ExclusiveMinimum { limit } => (
            "greater_than",
            format!("Input should be greater than {limit}"),
        ),
        ValidationErrorKind::ExclusiveMaximum { limit } => {
            ("less_than", format!("Input should be less than {limit}"))
        }
        ValidationErrorKind::MinLength { limit } => (
            "string_too_short",
            format!(
                "String should have at least {limit} {}",
                plural(*limit, "character")
            ),
        ),
        ValidationErrorKind::MaxLength { limit } => (
            "string_too_long",
            format!(
                "String should have at most {limit} {}",
                plural(*limit, "character")
            ),
        ),
        ValidationErrorKind::MinItems { limit } => (
            "too_short",
            format!(
                "List should have at least {limit} {}",
                plural(*limit, "item")
            ),
        ),
        ValidationErrorKind::MaxItems { limit } => (
            "too_long",
            format!(
                "List should have at most {limit} {}",
                plural(*limit, "item")
            ),
        ),
        ValidationErrorKind::Pattern { pattern } => (
            "string_pattern_mismatch",
            format!("String should match pattern '{pattern}'"),
        ),
        _ => ("value_error", e.to_string()),
    };
    Some(error(kind, &path, &msg, input))
}

fn type_error(kind: &TypeKind, input: &Value) -> (&'static str, String) {
    let wanted = match kind {
        TypeKind::Single(t) => Some(*t),
        TypeKind::Multiple(set) => set.iter().find(|t| *t != JsonType::Null),
    };
    let is_str = input.is_string();
    let (k, m) = match wanted {
        Some(JsonType::Integer) if is_str => (
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        Some(JsonType::Integer) if input.as_f64().is_some_and(|f| f.fract() != 0.0) => (
            "int_from_float",
            "Input should be a valid integer, got a number with a fractional part",
        ),
        Some(JsonType::Integer) => ("int_type", "Input should be a valid integer"),
        Some(JsonType::Number) if is_str => (
            "float_parsing",
            "Input should be a valid number, unable to parse string as a number",
        ),
        Some(JsonType::Number) => ("float_type", "Input should be a valid number"),
        Some(JsonType::Boolean) if is_str => (
            "bool_parsing",
            "Input should be a valid boolean, unable to interpret input",
        ),
        Some(JsonType::Boolean) => ("bool_type", "Input should be a valid boolean"),
        Some(JsonType::String) => ("string_type", "Input should be a valid string"),
        Some(JsonType::Object) => ("dict_type", "Input should be a valid dictionary"),
        Some(JsonType::Array) => ("list_type", "Input should be a valid list"),
        Some(JsonType::Null) | None => ("none_required", "Input should be None"),
    };
    (k, m.to_owned())
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// `'a', 'b' or 'c'`, as pydantic lists enum members.
fn one_of(options: &Value) -> String {
    let items: Vec<String> = options
        .as_array()
        .map(|a| a.iter().map(py_repr).collect())
        .unwrap_or_default();
    match items.len() {
        0 => String::new(),
        1 => items[0].clone(),
        n => format!("{} or {}", items[..n - 1].join(", "), items[n - 1]),
    }
}

fn py_repr(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}
