//! pydantic's lax mode, for the scalar types a schema names: the values
//! the reference converts before it validates (`"3"` and `3.0` are
//! integers, `"true"` a boolean...), and the one conversion it refuses
//! with an error of its own: a whole float too large for a 64-bit integer
//! (`int_parsing_size`).
//!
//! Numbers keep their text (serde_json's `arbitrary_precision`): an
//! integer of any size reaches the plugin exactly as sent, as Python's
//! integers reach the reference's function.

use serde_json::{Number, Value};

use super::error;

/// The one non-null type a schema slot asks for: `"integer"`, or the
/// non-null branch of `anyOf: [X, {"type": "null"}]`.
fn slot_type(schema: &Value) -> Option<(&str, &Value)> {
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        return Some((t, schema));
    }
    let any = schema.get("anyOf")?.as_array()?;
    let mut non_null = any
        .iter()
        .filter(|s| s.get("type").and_then(Value::as_str) != Some("null"));
    let only = non_null.next()?;
    if non_null.next().is_some() {
        return None;
    }
    only.get("type").and_then(Value::as_str).map(|t| (t, only))
}

/// Converts, in place, the values pydantic would accept in lax mode, and
/// adds to `errors` the conversions it refuses itself. `path` is where
/// `value` is, below the body.
pub fn coerce(schema: &Value, value: &mut Value, path: &mut Vec<Value>, errors: &mut Vec<Value>) {
    let Some((ty, schema)) = slot_type(schema) else {
        return;
    };
    match (ty, &mut *value) {
        ("object", Value::Object(map)) => {
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (k, v) in map.iter_mut() {
                    if let Some(p) = props.get(k) {
                        path.push(Value::from(k.as_str()));
                        coerce(p, v, path, errors);
                        path.pop();
                    }
                }
            }
        }
        ("array", Value::Array(items)) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    path.push(Value::from(i));
                    coerce(item_schema, v, path, errors);
                    path.pop();
                }
            }
        }
        ("integer", v) => match integer(v) {
            Ok(Some(c)) => *v = c,
            Ok(None) => {}
            Err(too_large) => errors.push(error(
                "int_parsing_size",
                path,
                "Unable to parse input string as an integer, exceeded maximum size",
                too_large,
            )),
        },
        ("number", v) => {
            let converted = match v {
                Value::String(s) => s
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(Value::from),
                Value::Bool(b) => Some(Value::from(*b as i64)),
                _ => None,
            };
            if let Some(c) = converted {
                *v = c;
            }
        }
        ("boolean", v) => {
            let converted = match v {
                Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "y" | "on" | "t" => Some(true),
                    "false" | "0" | "no" | "n" | "off" | "f" => Some(false),
                    _ => None,
                },
                Value::Number(n) => n.as_f64().and_then(|f| {
                    if f == 1.0 {
                        Some(true)
                    } else if f == 0.0 {
                        Some(false)
                    } else {
                        None
                    }
                }),
                _ => None,
            };
            if let Some(c) = converted {
                *v = Value::Bool(c);
            }
        }
        _ => {}
    }
}

/// `v` as pydantic's lax integer reads it, or `None` when it refuses it.
pub fn as_integer(v: &Value) -> Option<Value> {
    match integer(v) {
        Ok(Some(converted)) => Some(converted),
        Ok(None) => match v {
            Value::Number(n) if is_integer_literal(n) => Some(v.clone()),
            _ => None,
        },
        Err(_) => None,
    }
}

/// 2^63: a whole float at or past it is too large for pydantic's integers.
const INT_FLOAT_LIMIT: f64 = 9_223_372_036_854_775_808.0;

/// What an integer slot makes of `v`: a conversion, nothing to do (the
/// validator then accepts or reports it), or `Err` with the input to
/// report for a float too large to convert.
fn integer(v: &Value) -> Result<Option<Value>, Value> {
    match v {
        Value::String(s) => Ok(integer_text(s.trim()).map(Value::Number)),
        Value::Bool(b) => Ok(Some(Value::from(i64::from(*b)))),
        // `-0` is Python's 0.
        Value::Number(n) if n.to_string() == "-0" => Ok(Some(Value::from(0))),
        Value::Number(n) if is_integer_literal(n) => Ok(None),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() && f.fract() == 0.0 => {
                if f.abs() < INT_FLOAT_LIMIT {
                    Ok(Some(Value::from(f as i64)))
                } else {
                    Err(python_float(f))
                }
            }
            // A fraction is the validator's `int_from_float`.
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

/// Whether `n` was written as an integer (no fraction, no exponent),
/// whatever its size.
fn is_integer_literal(n: &Number) -> bool {
    !n.to_string().contains(['.', 'e', 'E'])
}

/// An integer in a string as pydantic reads one: an optional sign, digits
/// with single underscores between them, and an optional fraction of
/// zeros (`"1_000"`, `"3.0"`); of any size.
fn integer_text(s: &str) -> Option<Number> {
    let (sign, rest) = match s.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", s.strip_prefix('+').unwrap_or(s)),
    };
    let (whole, fraction) = rest.split_once('.').unwrap_or((rest, ""));
    if !fraction.bytes().all(|b| b == b'0') {
        return None;
    }
    let bytes = whole.as_bytes();
    let well_placed = |i: usize| {
        bytes[i] != b'_'
            || (i > 0 && i + 1 < bytes.len() && bytes[i - 1] != b'_' && bytes[i + 1] != b'_')
    };
    if bytes.is_empty()
        || !bytes.iter().all(|b| b.is_ascii_digit() || *b == b'_')
        || !(0..bytes.len()).all(well_placed)
    {
        return None;
    }
    let digits: String = whole.chars().filter(|c| *c != '_').collect();
    let digits = digits.trim_start_matches('0');
    let text = match (sign, digits.is_empty()) {
        (_, true) => "0".to_owned(),
        (sign, false) => format!("{sign}{digits}"),
    };
    serde_json::from_str(&text).ok()
}

/// `f` as the reference echoes a float input: Python's `repr`.
fn python_float(f: f64) -> Value {
    let text = crate::plugin_id::python_float_repr(f);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lax(v: Value) -> Result<Option<Value>, Value> {
        integer(&v)
    }

    fn text(v: &Value) -> String {
        serde_json::to_string(v).unwrap()
    }

    // Each case is what etl-uvicorn 0.1.0 made of it.
    #[test]
    fn integers_as_pydantic_reads_them() {
        for (input, want) in [
            (r#""3.0""#, "3"),
            (r#""1_000""#, "1000"),
            (r#"" 7 ""#, "7"),
            (r#""99999999999999999999999""#, "99999999999999999999999"),
            ("1e3", "1000"),
            ("1e18", "1000000000000000000"),
            ("9.2e18", "9200000000000000000"),
            ("true", "1"),
            ("-0", "0"),
        ] {
            let v: Value = serde_json::from_str(input).unwrap();
            let got = lax(v).unwrap().map(|c| text(&c));
            assert_eq!(got.as_deref(), Some(want), "{input}");
        }
        // Left to the validator: integers as written, and fractions.
        for input in ["1000000000000000000000000000000", "2", "2.5"] {
            let v: Value = serde_json::from_str(input).unwrap();
            assert_eq!(lax(v), Ok(None), "{input}");
        }
        for input in [r#""1e3""#, r#""_1""#, r#""1__0""#, r#""3.5""#, r#""""#] {
            let v: Value = serde_json::from_str(input).unwrap();
            assert_eq!(lax(v), Ok(None), "{input} is the validator's int_parsing");
        }
        // Too large: the error's input is Python's repr of the float.
        assert_eq!(lax(json!(1e20)).map_err(|v| text(&v)), Err("1e+20".into()));
        let v: Value = serde_json::from_str("-1e30").unwrap();
        assert_eq!(lax(v).map_err(|v| text(&v)), Err("-1e+30".into()));
    }
}
