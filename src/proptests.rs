//! Property tests of the code that turns untrusted bytes into answers:
//! request validation, envelope building, and the Python-compatible JSON
//! behind the plugin id. (cargo-fuzz needs a nightly toolchain; proptest
//! runs on the stable one, in `cargo test`.)

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use crate::envelope::{self, Outcome, Usage};
use crate::invocation::Collected;
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

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
                let v: Value = serde_json::from_slice(&input).unwrap();
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
            Ok(input) => prop_assert!(serde_json::from_slice::<Value>(&input).is_ok()),
            Err(rejection) => {
                let detail = rejection.body["detail"].as_array().cloned().unwrap_or_default();
                prop_assert!(!detail.is_empty());
                for d in detail {
                    prop_assert!(d["type"].is_string() && d["msg"].is_string() && d["loc"][0] == "body");
                }
            }
        }
    }

    #[test]
    fn envelopes_are_always_valid_json_with_every_key(
        names in prop::collection::vec(any::<String>(), 0..4),
        infos in prop::collection::vec(any::<String>(), 0..4),
        text in any::<String>(),
        output in json_value(),
        which in 0..3u8,
    ) {
        let c = Collected {
            usage: names.into_iter().enumerate().map(|(i, name)| Usage { name, value: i as i64 - 1 }).collect(),
            infos,
            ..Collected::default()
        };
        let raw = serde_json::value::to_raw_value(&output).unwrap();
        let outcome = match which {
            0 => Outcome::Ok(Some(&raw)),
            1 => Outcome::Failed { status: 418, text },
            _ => Outcome::Shutdown,
        };
        let v: Value = serde_json::from_slice(&envelope::write(&c, &outcome)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in ["usage", "status_code", "file_data", "filedata_meta", "status_code_text",
                  "failure_category", "plugin_error", "output", "message_channels"] {
            prop_assert!(keys.contains(&k), "missing {}", k);
        }
        if which == 0 {
            prop_assert_eq!(&v["output"], &output);
        }
        let p: Value = serde_json::from_slice(&envelope::precheck(&c, &outcome)).unwrap();
        prop_assert_eq!(&p["usage"], &v["usage"]);
    }
}
