//! The envelope: the JSON object every `/invoke` answer (and every line of a
//! stream) is, with every key present and in the reference host's order:
//!
//! ```json
//! {"usage":[{"value":1,"name":"calls"}],"status_code":200,"file_data":null,
//!  "filedata_meta":{"terminate_current":false,"new_records":[]},
//!  "status_code_text":null,"failure_category":null,"plugin_error":null,
//!  "output":{...},"message_channels":{"infos":[],"warnings":[]}}
//! ```
//!
//! It is written by hand rather than through a derived struct so that the
//! plugin's output is copied through as the JSON text it emitted, without a
//! parse-and-reserialise round trip on the hot path.

use serde_json::value::RawValue;
use serde_json::Value;

use crate::invocation::{Class, Collected};

/// The usage records an invocation reported, kept as the text of the
/// envelope's `usage` list (without its brackets): a record costs no
/// allocation of its own, and the envelope copies them in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageList(Vec<u8>);

impl UsageList {
    /// Adds `{"value":value,"name":name}`.
    pub fn push(&mut self, name: &str, value: i64) {
        self.push_with(name, |out| write_int(out, value));
    }

    /// The same for an integer given as its text (see [`is_integer_text`]).
    pub fn push_text(&mut self, name: &str, value: &str) {
        self.push_with(name, |out| out.extend_from_slice(value.as_bytes()));
    }

    fn push_with(&mut self, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
        let out = &mut self.0;
        if out.is_empty() {
            out.reserve(64);
        } else {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"value\":");
        value(out);
        out.extend_from_slice(b",\"name\":");
        write_str(out, name);
        out.push(b'}');
    }
}

/// Whether `text` is a JSON integer: an optional minus, then `0` or digits
/// not starting with `0`.
pub fn is_integer_text(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

/// The `status_code_text` of a shutdown-abort.
pub const SHUTDOWN_TEXT: &str =
    "[PluginShutdown] the server is shutting down; retry the request on another instance";

/// The `plugin_error` of a shutdown-abort: what a controller keys on.
const SHUTDOWN_PLUGIN_ERROR: &str = r#"{"error_type":"shutdown","error_reason":"server_shutting_down","dependency":null,"audience":"platform","retryable":true}"#;

const DEFAULT_FILEDATA_META: &str = r#"{"terminate_current":false,"new_records":[]}"#;

/// How an invocation ended, as the envelope reports it.
pub enum Outcome<'a> {
    /// Success, with the plugin's output (`None` for a stream's end).
    Ok(Option<&'a RawValue>),
    /// A failure: the status, the `status_code_text`, and the
    /// classification the plugin gave (if any).
    Failed {
        status: u16,
        text: String,
        class: Option<&'a Class>,
    },
    /// The shutdown-abort.
    Shutdown,
}

impl Outcome<'_> {
    pub fn status_code(&self) -> u16 {
        match self {
            Outcome::Ok(_) => 200,
            Outcome::Failed { status, .. } => *status,
            Outcome::Shutdown => 503,
        }
    }
}

/// How `status_code_text` starts when the plugin broke the ABI contract.
pub const VIOLATION_PREFIX: &str = "[PluginContractError] ";

/// The failure reported when the plugin broke the ABI contract.
pub fn violation_text(why: &str) -> String {
    format!("{VIOLATION_PREFIX}{why}")
}

/// Writes the whole envelope for `collected` ending as `outcome`.
pub fn write(collected: &Collected, outcome: &Outcome<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(320);
    write_usage_and_status(&mut out, collected, outcome);
    out.extend_from_slice(b",\"file_data\":");
    match &collected.more().file_data {
        Some(raw) => out.extend_from_slice(raw.get().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"filedata_meta\":");
    match &collected.more().filedata_meta {
        Some(meta) => serde_json::to_writer(&mut out, meta).expect("a Value always serialises"),
        None => out.extend_from_slice(DEFAULT_FILEDATA_META.as_bytes()),
    }
    write_failure_fields(&mut out, outcome);
    out.extend_from_slice(b",\"output\":");
    match outcome {
        Outcome::Ok(Some(raw)) => out.extend_from_slice(raw.get().as_bytes()),
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"message_channels\":{\"infos\":");
    write_strings(&mut out, &collected.more().infos);
    out.extend_from_slice(b",\"warnings\":");
    write_strings(&mut out, &collected.more().warnings);
    out.extend_from_slice(b"}}");
    out
}

/// One NDJSON line of a stream: the item with what was reported so far.
pub fn item_line(collected: &Collected, item: &RawValue) -> bytes::Bytes {
    let mut line = write(collected, &Outcome::Ok(Some(item)));
    line.push(b'\n');
    line.into()
}

/// The `/precheck` answer: the envelope's usage, status and failure fields.
pub fn precheck(collected: &Collected, outcome: &Outcome<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_usage_and_status(&mut out, collected, outcome);
    write_failure_fields(&mut out, outcome);
    out.push(b'}');
    out
}

/// `{"usage":[...],"status_code":N`
fn write_usage_and_status(out: &mut Vec<u8>, collected: &Collected, outcome: &Outcome<'_>) {
    out.extend_from_slice(b"{\"usage\":");
    write_usage(out, &collected.usage);
    out.extend_from_slice(b",\"status_code\":");
    write_int(out, outcome.status_code());
}

/// `,"status_code_text":...,"failure_category":null,"plugin_error":...`
fn write_failure_fields(out: &mut Vec<u8>, outcome: &Outcome<'_>) {
    out.extend_from_slice(b",\"status_code_text\":");
    match outcome {
        Outcome::Ok(_) => out.extend_from_slice(b"null"),
        Outcome::Failed { text, .. } => write_str(out, text),
        Outcome::Shutdown => write_str(out, SHUTDOWN_TEXT),
    }
    let class = match outcome {
        Outcome::Failed { class, .. } => *class,
        _ => None,
    };
    out.extend_from_slice(b",\"failure_category\":");
    match class.and_then(|c| c.category.as_deref()) {
        Some(category) => write_str(out, category),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"plugin_error\":");
    match (outcome, class.and_then(|c| c.plugin_error.as_deref())) {
        (Outcome::Shutdown, _) => out.extend_from_slice(SHUTDOWN_PLUGIN_ERROR.as_bytes()),
        (_, Some(json)) => out.extend_from_slice(json.as_bytes()),
        _ => out.extend_from_slice(b"null"),
    }
}

/// Checks what a plugin passed to `set_file_data`: a JSON object, kept as
/// its text, or `null` (`None`).
pub fn file_data_from_json(text: &str) -> Result<Option<Box<RawValue>>, String> {
    let raw: Box<RawValue> = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    match raw.get().as_bytes().first() {
        Some(b'{') => Ok(Some(raw)),
        Some(b'n') => Ok(None),
        _ => Err("neither a JSON object nor null".into()),
    }
}

/// Checks and normalises what a plugin passed to `set_filedata_meta`.
pub fn filedata_meta_from_json(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(mut map) = value else {
        return Err("not a JSON object".into());
    };
    let terminate = match map.remove("terminate_current") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err("terminate_current is not a boolean".into()),
    };
    let records = match map.remove("new_records") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("new_records is not an array".into()),
    };
    if let Some(key) = map.keys().next() {
        return Err(format!("unknown key `{key}`"));
    }
    Ok(serde_json::json!({ "terminate_current": terminate, "new_records": records }))
}

fn write_usage(out: &mut Vec<u8>, usage: &UsageList) {
    out.push(b'[');
    out.extend_from_slice(&usage.0);
    out.push(b']');
}

/// An integer's digits, without a temporary string.
fn write_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn write_strings(out: &mut Vec<u8>, items: &[String]) {
    serde_json::to_writer(out, items).expect("strings always serialise");
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a string always serialises");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_texts_are_json_integers_of_any_size() {
        for ok in ["0", "-7", "1000000000000000000000000000000"] {
            assert!(is_integer_text(ok), "{ok}");
        }
        for bad in ["", "-", "01", "1.0", "1e3", " 1", "+1", "NaN"] {
            assert!(!is_integer_text(bad), "{bad}");
        }
    }

    #[test]
    fn success_envelope_has_every_key_in_order() {
        let mut c = Collected::default();
        c.usage.push("chars", 15);
        let out: Box<RawValue> = serde_json::from_str(r#"{"words":3,"chars":15}"#).unwrap();
        let text = String::from_utf8(write(&c, &Outcome::Ok(Some(&out)))).unwrap();
        assert_eq!(
            text,
            r#"{"usage":[{"value":15,"name":"chars"}],"status_code":200,"file_data":null,"filedata_meta":{"terminate_current":false,"new_records":[]},"status_code_text":null,"failure_category":null,"plugin_error":null,"output":{"words":3,"chars":15},"message_channels":{"infos":[],"warnings":[]}}"#
        );
    }

    #[test]
    fn shutdown_envelope_is_distinct_and_keeps_usage() {
        let mut c = Collected::default();
        c.usage.push("units_done", 7);
        c.more_mut().infos.push("stopped".into());
        let v: Value = serde_json::from_slice(&write(&c, &Outcome::Shutdown)).unwrap();
        assert_eq!(v["status_code"], 503);
        assert_eq!(v["plugin_error"]["error_type"], "shutdown");
        assert_eq!(v["plugin_error"]["retryable"], true);
        assert_eq!(v["usage"][0]["value"], 7);
        assert_eq!(v["message_channels"]["infos"][0], "stopped");
        assert_eq!(v["output"], Value::Null);
    }

    #[test]
    fn filedata_meta_is_checked() {
        assert_eq!(
            filedata_meta_from_json(r#"{"terminate_current":true}"#).unwrap(),
            serde_json::json!({"terminate_current": true, "new_records": []})
        );
        assert!(filedata_meta_from_json(r#"{"terminate_current":1}"#).is_err());
        assert!(filedata_meta_from_json(r#"[]"#).is_err());
        assert!(filedata_meta_from_json(r#"{"other":1}"#).is_err());
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{json, Value};

        use super::super::*;

        /// A plugin's output: an object of strings (any Unicode) and
        /// integers, or a bare string.
        fn plugin_output() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                any::<String>().prop_map(Value::String),
                any::<i64>().prop_map(Value::from),
            ];
            prop_oneof![
                prop::collection::btree_map(any::<String>(), leaf, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                any::<String>().prop_map(Value::String),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn envelopes_are_always_valid_json_with_every_key(
                names in prop::collection::vec(any::<String>(), 0..4),
                infos in prop::collection::vec(any::<String>(), 0..4),
                text in any::<String>(),
                output in plugin_output(),
                which in 0..3u8,
            ) {
                let mut c = Collected::default();
                for (i, name) in names.iter().enumerate() {
                    c.usage.push(name, i as i64 - 1);
                }
                c.more_mut().infos.clone_from(&infos);
                let raw = serde_json::value::to_raw_value(&output).unwrap();
                let outcome = match which {
                    0 => Outcome::Ok(Some(&raw)),
                    1 => Outcome::Failed { status: 418, text, class: None },
                    _ => Outcome::Shutdown,
                };
                let v: Value = serde_json::from_slice(&write(&c, &outcome)).unwrap();
                let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
                for k in ["usage", "status_code", "file_data", "filedata_meta", "status_code_text",
                          "failure_category", "plugin_error", "output", "message_channels"] {
                    prop_assert!(keys.contains(&k), "missing {}", k);
                }
                if which == 0 {
                    prop_assert_eq!(&v["output"], &output);
                }
                let usage: Vec<Value> = names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| json!({"value": i as i64 - 1, "name": name}))
                    .collect();
                prop_assert_eq!(&v["usage"], &Value::Array(usage));
                prop_assert_eq!(&v["message_channels"]["infos"], &json!(infos));
                let p: Value = serde_json::from_slice(&precheck(&c, &outcome)).unwrap();
                prop_assert_eq!(&p["usage"], &v["usage"]);
            }
        }
    }
}
