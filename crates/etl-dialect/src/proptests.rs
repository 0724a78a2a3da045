//! Property tests of the code that turns untrusted bytes into answers:
//! request validation, and the Python-compatible JSON behind the plugin
//! id. (cargo-fuzz needs a nightly toolchain; proptest
//! runs on the stable one, in `cargo test`.)

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::plugin_id::python_dumps_sorted;
use crate::validate::InputModel;

/// JSON values: every kind, strings with any Unicode, floats in the range
/// where Python's repr and Rust's `{:?}` both print fixed notation.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (1e-3f64..1e15).prop_map(|f| Value::from(if f.fract() == 0.0 { f + 0.5 } else { f })),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A straightforward second implementation of `json.dumps(v, sort_keys=True)`:
/// serde_json does the escaping, and everything outside printable ASCII
/// (which serde_json leaves as is) is escaped afterwards.
fn reference_dumps(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(reference_dumps)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}: {}", escape(k), reference_dumps(&map[k])))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::String(s) => escape(s),
        Value::Number(n) if n.is_f64() => format!("{:?}", n.as_f64().unwrap()),
        other => other.to_string(),
    }
}

fn escape(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap();
    let mut out = String::new();
    for c in quoted.chars() {
        if c == '\u{7f}' || !c.is_ascii() {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The schema the fast-path property runs against: every scalar type,
/// nullable and not, required and defaulted.
fn flat_schema() -> Value {
    json!({
        "type": "object", "required": ["text", "n"],
        "properties": {
            "text": {"type": "string"},
            "n": {"type": "integer", "title": "N"},
            "x": {"type": "number", "default": 1.5},
            "flag": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": null},
            "opt": {"type": "string", "default": "d\u{e9}\"q"},
            "k": {"anyOf": [{"type": "null"}, {"type": "integer"}]}
        }
    })
}

/// The JSON text of one body value: what each declared type accepts, what
/// needs a conversion, escapes, and every other kind.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        "[a-z ]{0,12}".prop_map(|s| format!("\"{s}\"")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        prop::sample::select(vec![
            "true",
            "false",
            "null",
            "0",
            "-0",
            "2.0",
            "2.5",
            "1e3",
            "-1E-2",
            "0.10",
            "123456789012345678901234567890",
            "\"3\"",
            "\" 4 \"",
            "\"true\"",
            "\"yes\"",
            "\"a\\/b\"",
            "\"\\u00e9\"",
            "\"\\ud83d\\ude00\"",
            "[]",
            "{}",
            "[1,2]",
            "{\"a\":1}",
            "\"\"",
        ])
        .prop_map(str::to_owned),
        json_value().prop_map(|v| v.to_string()),
    ]
}

/// A body object's JSON text: declared keys (some spelt with escapes),
/// unknown keys, the reserved fields, repeats, and spacing.
fn flat_body() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "text",
        "n",
        "x",
        "flag",
        "opt",
        "k",
        "t\\u0065xt",
        "extra",
        "",
        "N",
        "invocation_settings",
        "invocation_context",
        "invocation_\\u0063ontext",
    ]);
    let members = prop::collection::vec((key, value_text(), any::<bool>()), 0..8);
    // Half of the bodies start with well-typed required inputs, so that
    // many reach the end of the fast path.
    let required = prop_oneof![
        Just(Vec::new()),
        ("[a-z ]{0,8}", any::<i32>())
            .prop_map(|(t, n)| vec![format!("\"text\":\"{t}\""), format!("\"n\":{n}")]),
    ];
    (required, members).prop_map(|(required, members)| {
        let parts: Vec<String> = members
            .into_iter()
            .map(|(k, v, spaced)| {
                if spaced {
                    format!(" \"{k}\" : {v} ")
                } else {
                    format!("\"{k}\":{v}")
                }
            })
            .collect();
        format!("{{{}}}", [required, parts].concat().join(","))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The fast path answers exactly as the general path, byte for byte,
    /// for every body.
    #[test]
    fn the_validation_fast_path_answers_as_the_general_path(body in flat_body()) {
        let fast = InputModel::new(&flat_schema()).unwrap();
        prop_assert!(fast.has_fast_path());
        let general = InputModel::new(&flat_schema()).unwrap().without_fast_path();
        let ct = Some("application/json");
        match (fast.prepare(ct, body.as_bytes()), general.prepare(ct, body.as_bytes())) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(String::from_utf8(a.input).unwrap(), String::from_utf8(b.input).unwrap());
                prop_assert_eq!(a.reserved, b.reserved);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a.body, b.body),
            (a, b) => prop_assert!(false, "fast {:?}, general {:?}", a, b),
        }
    }

    #[test]
    fn python_dumps_matches_the_reference(v in json_value()) {
        prop_assert_eq!(python_dumps_sorted(&v), reference_dumps(&v));
    }

    #[test]
    fn validation_never_panics_and_always_answers(
        body in prop::collection::vec(any::<u8>(), 0..256),
        json_ct in any::<bool>(),
    ) {
        let model = InputModel::new(&json!({
            "type": "object", "required": ["text"],
            "properties": {"text": {"type": "string"}, "repeat": {"type": "integer", "default": 1},
                           "flag": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}}
        })).unwrap();
        let ct = if json_ct { Some("application/json") } else { None };
        match model.prepare(ct, &body) {
            Ok(input) => {
                let v: Value = serde_json::from_slice(&input.input).unwrap();
                prop_assert!(v["text"].is_string());
                prop_assert!(v["repeat"].is_i64() || v["repeat"].is_u64() || v["repeat"].is_f64());
            }
            Err(rejection) => prop_assert!(rejection.body.get("detail").is_some()),
        }
    }

    #[test]
    fn validation_of_any_object_is_a_clean_answer(v in json_value()) {
        let model = InputModel::new(&json!({
            "type": "object", "required": ["text"],
            "properties": {"text": {"type": "string"}, "repeat": {"type": "integer", "default": 1}}
        })).unwrap();
        let body = serde_json::to_vec(&json!({"text": v.clone(), "repeat": v})).unwrap();
        match model.prepare(Some("application/json"), &body) {
            Ok(input) => prop_assert!(serde_json::from_slice::<Value>(&input.input).is_ok()),
            Err(rejection) => {
                let detail = rejection.body["detail"].as_array().cloned().unwrap_or_default();
                prop_assert!(!detail.is_empty());
                for d in detail {
                    prop_assert!(d["type"].is_string() && d["msg"].is_string() && d["loc"][0] == "body");
                }
            }
        }
    }
}
