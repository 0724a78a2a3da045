//! The reserved `/invoke` fields, `invocation_settings` and
//! `invocation_context`: outside every plugin's schema, checked by the
//! reference host's transport rules after the inputs, and handed to the
//! plugin on their own (ABI 1.1), never as inputs.
//!
//! `invocation_settings` (what the plugin is configured with):
//! - absent: none, unless the pod requires sealed settings
//!   (`FF_INVOCATION_SETTINGS`), then a 500 `sealed_dag_node_settings_required`;
//! - present but not an object (`null` included): 422 `malformed_envelope`;
//! - an object with a `dag_node_settings` member: the member must declare the
//!   sealed settings document format, else 500 `malformed_dag_node_settings`;
//!   a document that does is passed on unopened (decrypting it is the
//!   plugin's; see `ETL_CAP_SEALED_SETTINGS_V2`);
//! - a bare sealed envelope (a `format` in the settings namespace, outside
//!   `dag_node_settings`): 500 `malformed_dag_node_settings`;
//! - any other object is the plaintext settings, passed on as sent, unless
//!   the pod requires sealed settings (500, as for absence).
//!
//! `invocation_context` (who the invocation is for): checked as the
//! reference's pydantic model checks it (identity strings, an integer
//! `attempt` in pydantic's lax sense, index-aligned batch lists, unknown keys
//! kept); an unknown `schema_version` string is the platform's version skew,
//! a 500 `unsupported_context_version`; anything else wrong is the caller's
//! 422 `malformed_envelope`.

use serde_json::{json, Map, Value};

use super::{lax, Rejection, Reserved};

const SETTINGS: &str = "invocation_settings";
const CONTEXT: &str = "invocation_context";
const DAG_NODE_SETTINGS: &str = "dag_node_settings";
/// The `format` of the one sealed settings document accepted.
const SEALED_DOCUMENT_FORMAT: &str = "u10d.invocation-settings.v2";
/// Every sealed settings format starts with this.
const SEALED_NAMESPACE: &str = "u10d.invocation-settings.";

/// The environment variable that makes a pod require sealed settings, read
/// as the reference reads it (`1`, `true`, `yes`, `on`, any case, trimmed).
pub const REQUIRE_SEALED_ENV: &str = "FF_INVOCATION_SETTINGS";

/// Whether `value` of [`REQUIRE_SEALED_ENV`] turns the requirement on.
pub fn requires_sealed(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        ["1", "true", "yes", "on"].contains(&v.trim().to_ascii_lowercase().as_str())
    })
}

/// Whether a top-level key is one of the reserved fields.
pub fn is_reserved(key: &str) -> bool {
    key == SETTINGS || key == CONTEXT
}

/// Checks the reserved fields of a body that passed input validation
/// (`None` for a field the body lacks) and returns them for the plugin.
///
/// # Errors
/// The reference's answer for an unusable field, as the module docs list.
pub fn check(
    settings: Option<&Value>,
    context: Option<&Value>,
    require_sealed: bool,
) -> Result<Reserved, Rejection> {
    let settings = check_settings(settings, require_sealed)?;
    let context = context.map(check_context).transpose()?;
    Ok(Reserved { settings, context })
}

fn check_settings(
    settings: Option<&Value>,
    require_sealed: bool,
) -> Result<Option<String>, Rejection> {
    let Some(settings) = settings else {
        return if require_sealed {
            Err(sealed_required())
        } else {
            Ok(None)
        };
    };
    let Value::Object(map) = settings else {
        return Err(invalid_field(SETTINGS));
    };
    if let Some(member) = map.get(DAG_NODE_SETTINGS) {
        let declared = member.get("format").and_then(Value::as_str);
        if !member.is_object() || declared != Some(SEALED_DOCUMENT_FORMAT) {
            return Err(unusable_settings(
                "MalformedDagNodeSettingsError",
                "malformed_dag_node_settings",
            ));
        }
    } else if map
        .get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| f.starts_with(SEALED_NAMESPACE))
    {
        return Err(unusable_settings(
            "MalformedDagNodeSettingsError",
            "malformed_dag_node_settings",
        ));
    } else if require_sealed {
        return Err(sealed_required());
    }
    Ok(Some(settings.to_string()))
}

/// The identity facets: each a string or null.
const CONTEXT_STRINGS: [&str; 11] = [
    "invocation_id",
    "job_id",
    "workflow_id",
    "attribution_id",
    "tenant_id",
    "org_id",
    "dag_node_id",
    "dag_node_type",
    "dag_node_subtype",
    "record_id",
    "job_created_timestamp",
];

/// The validated context as JSON text: the object as sent, with its
/// `schema_version` filled in and `attempt` as an integer.
fn check_context(context: &Value) -> Result<String, Rejection> {
    let Value::Object(given) = context else {
        return Err(invalid_field(CONTEXT));
    };
    match given.get("schema_version") {
        None => {}
        Some(Value::String(v)) if v == "1" => {}
        Some(Value::String(_)) => {
            return Err(Rejection {
                status: 500,
                body: json!({
                    "detail": "Unusable invocation_context: UnsupportedContextVersionError",
                    "reason": "unsupported_context_version",
                }),
            })
        }
        Some(_) => return Err(invalid_field(CONTEXT)),
    }
    let mut out = Map::with_capacity(given.len() + 1);
    if !given.contains_key("schema_version") {
        out.insert("schema_version".into(), Value::from("1"));
    }
    for (key, value) in given {
        let ok = match key.as_str() {
            k if CONTEXT_STRINGS.contains(&k) => value.is_string() || value.is_null(),
            "attempt" if value.is_null() => true,
            "attempt" => match lax::as_integer(value) {
                Some(n) => {
                    out.insert(key.clone(), n);
                    continue;
                }
                None => false,
            },
            "record_ids" => value.is_null() || list_of(value, |item| item.is_string()),
            "invocation_ids" => {
                value.is_null() || list_of(value, |item| item.is_string() || item.is_null())
            }
            _ => true,
        };
        if !ok {
            return Err(invalid_field(CONTEXT));
        }
        out.insert(key.clone(), value.clone());
    }
    if let (Some(Value::Array(records)), Some(Value::Array(ids))) =
        (given.get("record_ids"), given.get("invocation_ids"))
    {
        if records.len() != ids.len() {
            return Err(invalid_field(CONTEXT));
        }
    }
    Ok(Value::Object(out).to_string())
}

fn list_of(value: &Value, item: impl Fn(&Value) -> bool) -> bool {
    value.as_array().is_some_and(|items| items.iter().all(item))
}

/// A reserved field the caller got wrong: 422.
fn invalid_field(field: &str) -> Rejection {
    Rejection {
        status: 422,
        body: json!({"detail": format!("Invalid field: {field}"), "reason": "malformed_envelope"}),
    }
}

/// Settings that arrived but cannot be used, and whose fault is not the
/// caller's: 500.
fn unusable_settings(class: &str, reason: &str) -> Rejection {
    Rejection {
        status: 500,
        body: json!({"detail": format!("Unusable invocation settings: {class}"), "reason": reason}),
    }
}

fn sealed_required() -> Rejection {
    unusable_settings(
        "SealedDagNodeSettingsRequiredError",
        "sealed_dag_node_settings_required",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(v: Value, sealed: bool) -> Result<Option<String>, (u16, Value)> {
        check_settings(Some(&v), sealed).map_err(|r| (r.status, r.body))
    }

    fn context(v: Value) -> Result<Value, (u16, String)> {
        check_context(&v)
            .map(|t| serde_json::from_str(&t).unwrap())
            .map_err(|r| (r.status, r.body["reason"].as_str().unwrap().to_owned()))
    }

    #[test]
    fn settings_follow_the_transport_rules() {
        assert_eq!(
            settings(json!({"a": 1}), false),
            Ok(Some(r#"{"a":1}"#.into()))
        );
        assert_eq!(settings(json!(null), false).unwrap_err().0, 422);
        assert_eq!(settings(json!([1]), false).unwrap_err().0, 422);
        let bare = settings(json!({"format": "u10d.invocation-settings.v1"}), false);
        assert_eq!(bare.unwrap_err().1["reason"], "malformed_dag_node_settings");
        let wrong_member = settings(json!({"dag_node_settings": {"format": "x"}}), false);
        assert_eq!(wrong_member.unwrap_err().0, 500);
        let sealed = json!({"dag_node_settings": {"format": "u10d.invocation-settings.v2"}});
        assert!(settings(sealed.clone(), true).unwrap().is_some());
        let plain = settings(json!({"a": 1}), true).unwrap_err();
        assert_eq!(plain.1["reason"], "sealed_dag_node_settings_required");
        assert_eq!(check_settings(None, false).unwrap(), None);
        assert_eq!(check_settings(None, true).unwrap_err().status, 500);
    }

    #[test]
    fn the_context_is_checked_as_pydantic_checks_it() {
        assert_eq!(context(json!({})), Ok(json!({"schema_version": "1"})));
        assert_eq!(
            context(json!({"attempt": " 7 ", "x": [1]})),
            Ok(json!({"schema_version": "1", "attempt": 7, "x": [1]}))
        );
        assert_eq!(context(json!({"attempt": true})).unwrap()["attempt"], 1);
        assert_eq!(context(json!({"attempt": 3.0})).unwrap()["attempt"], 3);
        let malformed = (422, "malformed_envelope".to_owned());
        assert_eq!(context(json!({"attempt": 3.5})), Err(malformed.clone()));
        assert_eq!(context(json!({"tenant_id": 5})), Err(malformed.clone()));
        assert_eq!(context(json!({"record_ids": [1]})), Err(malformed.clone()));
        assert_eq!(
            context(json!({"schema_version": 2})),
            Err(malformed.clone())
        );
        assert_eq!(context(json!(null)), Err(malformed.clone()));
        let unaligned = json!({"record_ids": ["a"], "invocation_ids": []});
        assert_eq!(context(unaligned), Err(malformed));
        assert!(context(json!({"invocation_ids": [null, "a"]})).is_ok());
        let skew = context(json!({"schema_version": "2", "tenant_id": 5}));
        assert_eq!(skew, Err((500, "unsupported_context_version".to_owned())));
    }

    #[test]
    fn the_requirement_reads_as_the_reference_reads_it() {
        for on in ["1", "true", " YES ", "On"] {
            assert!(requires_sealed(Some(on)), "{on}");
        }
        for off in ["", "0", "false", "enabled"] {
            assert!(!requires_sealed(Some(off)), "{off}");
        }
        assert!(!requires_sealed(None));
    }
}
