//! The plugin id: how the reference host names a plugin by its schema.
//!
//! Unless a plugin names its own id, the id is the first 32 hex digits of
//! SHA-256 over the `/schema` document serialised as Python's
//! `json.dumps(schema, sort_keys=True)` writes it. Getting the same id for
//! the same schema under both hosts requires reproducing that serialisation
//! byte for byte: sorted keys, `", "` and `": "` separators, every character
//! outside printable ASCII escaped as `\uXXXX` (lowercase hex, UTF-16
//! surrogate pairs above U+FFFF), and floats as Python's `repr`.

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

/// The id the reference host derives for `schema` (`{"inputs", "outputs"}`).
pub fn derive(schema: &Value) -> String {
    let digest = Sha256::digest(python_dumps_sorted(schema).as_bytes());
    let mut hex = String::with_capacity(32);
    for byte in &digest[..16] {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// `json.dumps(value, sort_keys=True)` as CPython writes it.
pub fn python_dumps_sorted(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Python compares str by code point; UTF-8 byte order is the same.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&python_float_repr(f));
    }
}

/// `repr(float)` in CPython: the shortest digits that round-trip, in fixed
/// notation when the decimal exponent is in -4..16, else scientific with a
/// signed two-digit-minimum exponent; whole numbers keep a trailing `.0`.
pub(crate) fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e-7", "-2e20".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = mantissa
        .strip_prefix('-')
        .map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();

    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn id_of_the_contract_example() {
        let schema: Value = serde_json::from_str(
            r#"{"inputs":{"type":"object","properties":{"a":{"type":"integer","default":1},"b":{"anyOf":[{"type":"string"},{"type":"null"}],"default":null}}},"outputs":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}"#,
        )
        .unwrap();
        assert_eq!(derive(&schema), "26a5b5e2c24c29c1baad7d2c783d15de");
    }

    #[test]
    fn id_of_wordcount_matches_the_reference_host() {
        // The schema and id the reference host serves for the Python
        // function `wordcount(usage: list, text: str, repeat: int = 1)`.
        let schema = json!({
            "inputs": {"type": "object", "required": ["text"],
                       "properties": {"text": {"type": "string"}, "repeat": {"type": "integer", "default": 1}}},
            "outputs": {"type": "object",
                        "properties": {"words": {"type": "integer"}, "chars": {"type": "integer"}},
                        "required": ["words", "chars"]}
        });
        assert_eq!(derive(&schema), "995355281551620c1e2a7cab3da49c91");
    }

    #[test]
    fn the_dialect_example_in_the_abi_docs_has_the_id_they_give() {
        // docs/abi.md, "The dialect, by example": the schema and id the
        // reference host serves for its Python `count`, checked there
        // against etl-uvicorn 0.1.0.
        let docs = include_str!("../../../docs/abi.md");
        let section = &docs[docs.find("### The dialect, by example").unwrap()..];
        let block = section.split("```json\n").nth(1).unwrap();
        let schema: Value = serde_json::from_str(block.split("```").next().unwrap()).unwrap();
        let id = derive(&schema);
        assert_eq!(id, "714b0efb2ec413ca5db1e30acc3b8aba");
        assert!(section.contains(&format!("`{id}`")));
    }

    #[test]
    fn serialises_like_python_json_dumps() {
        let v = json!({"b": [1, -2, true, null], "a": "é😀\"\\\n\u{7f}~", "c": {"z": 1.5, "y": 1e20, "x": 0.0001}});
        assert_eq!(
            python_dumps_sorted(&v),
            r#"{"a": "\u00e9\ud83d\ude00\"\\\n\u007f~", "b": [1, -2, true, null], "c": {"x": 0.0001, "y": 1e+20, "z": 1.5}}"#
        );
    }

    #[test]
    fn floats_follow_python_repr() {
        let cases = [
            (1.0, "1.0"),
            (-0.5, "-0.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.125, "123456789.125"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (2.5e300, "2.5e+300"),
            (0.0, "0.0"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "repr({f})");
        }
    }
}
