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
pub(super) fn to_fastapi(e: &jsonschema::ValidationError<'_>) -> Vec<Value> {
    if let ValidationErrorKind::AnyOf { context } = e.kind() {
        // `Optional[X]` (anyOf [X, null]): pydantic reports X's own error
        // (`int_from_float`, `int_parsing`...), not the union's.
        let mut members = context
            .iter()
            .filter(|errors| !errors.iter().all(is_null_type_error));
        if let (Some(only), None) = (members.next(), members.next()) {
            let items: Vec<Value> = only.iter().flat_map(to_fastapi).collect();
            if !items.is_empty() {
                return items;
            }
        }
    }
    to_fastapi_item(e).into_iter().collect()
}

/// Whether `e` is the null branch of an optional value refusing a value.
fn is_null_type_error(e: &jsonschema::ValidationError<'_>) -> bool {
    matches!(
        e.kind(),
        ValidationErrorKind::Type {
            kind: TypeKind::Single(JsonType::Null)
        }
    )
}

fn to_fastapi_item(e: &jsonschema::ValidationError<'_>) -> Option<Value> {
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
