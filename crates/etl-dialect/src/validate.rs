//! Turning a request body into the plugin's input, or a 422 that reads like
//! the reference host's (FastAPI and pydantic).
//!
//! The steps, in the reference's order:
//! 1. no body: the reserved-field check (which may require settings), then
//!    run with no inputs when every input is optional, else the "body
//!    missing" 422;
//! 2. the body decoded as text the way Python's `json.loads` decodes bytes
//!    (UTF-8 with or without a BOM, UTF-16 or UTF-32 by BOM or by where the
//!    zero bytes fall; any `charset` is ignored): a body that does not
//!    decode, or that nests arrays and objects deeper than [`MAX_DEPTH`],
//!    gets `400 {"detail":"There was an error parsing the body"}`;
//! 3. malformed JSON: `{"detail":"Invalid JSON body","reason":"malformed_envelope"}`;
//! 4. the reserved fields checked and set aside for the plugin (`reserved`),
//!    whatever the content type;
//! 5. JSON under a content type that is not JSON: the "not a dictionary"
//!    422 with the body as a string, since FastAPI does not parse it; then
//!    JSON that is not an object: the "not a dictionary" 422;
//! 6. pydantic's lax conversions (`"3"` and `3.0` are integers, `"true"` a
//!    boolean...), then JSON Schema validation, every error in FastAPI's
//!    `{"type","loc","msg","input"}` form;
//! 7. defaults for absent inputs filled in, unknown top-level fields dropped.

use jsonschema::Validator;
use serde_json::{json, Map, Value};

mod decode;
mod fast;
mod fastapi;
mod lax;

pub use decode::MAX_DEPTH;

use fastapi::{detail, error, not_a_dict, to_fastapi};
pub mod reserved;

/// Whether `schema` is a valid JSON Schema (draft 2020-12), with the
/// validator's reason when it is not.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    jsonschema::meta::validate(schema).map_err(|e| e.to_string())
}

/// The request's input model, compiled once from the inputs schema.
pub struct InputModel {
    schema: Value,
    validator: Validator,
    /// The fast path, when the schema is simple enough for it.
    plan: Option<fast::FlatPlan>,
    /// Some input is required, so an empty body is refused.
    body_required: bool,
    /// The schema is `{"type": "null"}`, the reference's for a function
    /// without parameters: the body is read only for its reserved fields,
    /// and the plugin gets `null`.
    takes_nothing: bool,
    /// The pod requires sealed settings (`reserved::REQUIRE_SEALED_ENV`).
    require_sealed: bool,
}

/// The reserved `/invoke` fields, as the plugin receives them: the settings
/// as sent, the context validated (see [`reserved`]).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reserved {
    pub settings: Option<String>,
    pub context: Option<String>,
}

/// A body that passed: the plugin's input, and the reserved fields.
#[derive(Debug)]
pub struct Prepared {
    /// The input as JSON bytes.
    pub input: Vec<u8>,
    pub reserved: Reserved,
}

impl Prepared {
    /// The input of a plugin that takes none: `null`.
    fn nothing(reserved: Reserved) -> Prepared {
        Prepared {
            input: b"null".to_vec(),
            reserved,
        }
    }
}

/// Why a body was refused: a 422 and its JSON body.
#[derive(Debug)]
pub struct Rejection {
    /// 422, or 400 for a body that cannot be decoded as text.
    pub status: u16,
    pub body: Value,
}

impl InputModel {
    /// Compiles the validator for `schema` (already checked to be a valid
    /// JSON Schema when the plugin was loaded).
    ///
    /// # Errors
    /// The schema cannot be compiled (e.g. a `$ref` that does not resolve).
    pub fn new(schema: &Value) -> Result<InputModel, String> {
        let validator = jsonschema::options()
            .should_validate_formats(false)
            .build(schema)
            .map_err(|e| format!("cannot compile the inputs schema: {e}"))?;
        let body_required = schema
            .get("required")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty());
        Ok(InputModel {
            schema: schema.clone(),
            validator,
            plan: fast::FlatPlan::compile(schema),
            body_required,
            takes_nothing: schema == &json!({"type": "null"}),
            require_sealed: false,
        })
    }

    /// Makes the reserved-field check require sealed settings.
    #[must_use]
    pub fn requiring_sealed_settings(mut self, require: bool) -> InputModel {
        self.require_sealed = require;
        self
    }

    /// The same model without its fast path, to hold the fast path to the
    /// general one in tests.
    #[cfg(test)]
    pub fn without_fast_path(mut self) -> InputModel {
        self.plan = None;
        self
    }

    /// Whether the schema is simple enough for the fast path.
    #[cfg(test)]
    pub fn has_fast_path(&self) -> bool {
        self.plan.is_some()
    }

    /// The input for the plugin and the reserved fields, or the 4xx (or,
    /// for unusable reserved fields, 500) to answer.
    ///
    /// Parsing, checking and echoing a body recurse once per level of its
    /// nesting: at [`MAX_DEPTH`], that takes about 3 MiB of stack in a
    /// debug build and under 1 MiB in release.
    ///
    /// # Errors
    /// A [`Rejection`] carrying the answer, as the module docs list.
    pub fn prepare(&self, content_type: Option<&str>, body: &[u8]) -> Result<Prepared, Rejection> {
        if body.is_empty() {
            let reserved = reserved::check(None, None, self.require_sealed)?;
            if self.takes_nothing {
                return Ok(Prepared::nothing(reserved));
            }
            if self.body_required {
                return Err(detail(vec![error(
                    "missing",
                    &[],
                    "Field required",
                    Value::Null,
                )]));
            }
            return self.accept(Value::Object(Map::new()), reserved);
        }
        let json_type = is_json_content_type(content_type);
        if json_type {
            if let Some(fast) = self.plan.as_ref().and_then(|plan| plan.prepare(body)) {
                let parse = |raw: Option<&serde_json::value::RawValue>| {
                    raw.map(|raw| decode::parse(raw.get())).transpose()
                };
                // The fast path only skipped them; should they not parse
                // after all, the general path answers.
                if let (Ok(settings), Ok(context)) = (parse(fast.settings), parse(fast.context)) {
                    let reserved =
                        reserved::check(settings.as_ref(), context.as_ref(), self.require_sealed)?;
                    return Ok(Prepared {
                        input: fast.input,
                        reserved,
                    });
                }
            }
        }
        let text = decode::json_text(body).map_err(|()| Rejection {
            status: 400,
            body: json!({"detail": "There was an error parsing the body"}),
        })?;
        if decode::nests_deeper_than(&text, MAX_DEPTH) {
            // Where the reference's parser runs out of Python's recursion
            // limit.
            return Err(Rejection {
                status: 400,
                body: json!({"detail": "There was an error parsing the body"}),
            });
        }
        let mut value = decode::parse(&text).map_err(|_| Rejection {
            status: 422,
            body: json!({"detail": "Invalid JSON body", "reason": "malformed_envelope"}),
        })?;
        // The reference checks the reserved fields before the inputs, on
        // the body parsed as JSON whatever its content type.
        let settings = self.set_aside(&mut value, "invocation_settings");
        let context = self.set_aside(&mut value, "invocation_context");
        let reserved = reserved::check(settings.as_ref(), context.as_ref(), self.require_sealed)?;
        if self.takes_nothing {
            // Like the reference's route without a body parameter: whatever
            // JSON came, it is not an input.
            return Ok(Prepared::nothing(reserved));
        }
        // Valid JSON under another content type reaches the model as the
        // text it is, which is not an object.
        if !json_type {
            return Err(detail(vec![not_a_dict(Value::String(text.into_owned()))]));
        }
        if !value.is_object() {
            return Err(detail(vec![not_a_dict(value)]));
        }

        if out_of_range(&value) {
            // Beyond what a double holds (1e400): not a number JSON can
            // carry here.
            return Err(Rejection {
                status: 422,
                body: json!({"detail": "Invalid JSON body", "reason": "malformed_envelope"}),
            });
        }
        let mut refused = Vec::new();
        lax::coerce(&self.schema, &mut value, &mut Vec::new(), &mut refused);
        // Error reports are built only for input that fails: valid input,
        // the common case, is checked without them.
        if !refused.is_empty() || !self.validator.is_valid(&value) {
            let mut errors: Vec<Value> = self
                .validator
                .iter_errors(&value)
                .flat_map(|e| to_fastapi(&self.schema, &e))
                .collect();
            errors.append(&mut refused);
            if !errors.is_empty() {
                self.in_field_order(&mut errors);
                return Err(detail(errors));
            }
        }
        self.accept(value, reserved)
    }

    /// The answer for a body whose input `value` passed.
    fn accept(&self, value: Value, reserved: Reserved) -> Result<Prepared, Rejection> {
        let input = self.finish(value);
        Ok(Prepared {
            input: serde_json::to_vec(&input).expect("a Value always serialises"),
            reserved,
        })
    }

    /// Takes the reserved field `name` out of the body object, so that it is
    /// never validated or passed as an input; a plugin that declares an
    /// input of that name gets it both ways.
    fn set_aside(&self, body: &mut Value, name: &str) -> Option<Value> {
        let declared = self.schema["properties"].get(name).is_some();
        let body = body.as_object_mut()?;
        if declared {
            body.get(name).cloned()
        } else {
            body.shift_remove(name)
        }
    }

    /// Puts `errors` in the order of the fields they are about, at every
    /// depth, as pydantic reports them: a model's fields in the order they
    /// are declared, a list's items by index (errors about the same field
    /// keep their order).
    fn in_field_order(&self, errors: &mut [Value]) {
        errors.sort_by_key(|e| field_order(&self.schema, &e["loc"]));
    }

    /// Fills in defaults and drops the top-level fields the schema does not
    /// declare (the reference passes only declared parameters).
    fn finish(&self, value: Value) -> Value {
        let Value::Object(mut given) = value else {
            return value;
        };
        let Some(Value::Object(props)) = self.schema.get("properties") else {
            return Value::Object(given);
        };
        let open = self
            .schema
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(false));
        // The declared inputs come first, in the schema's order (as the
        // fast path writes them), whatever the client's order; then, for an
        // open schema, the others as sent.
        let mut input = Map::with_capacity(given.len().max(props.len()));
        for (name, prop) in props {
            match given.shift_remove(name) {
                Some(value) => {
                    input.insert(name.clone(), value);
                }
                None => {
                    if let Some(default) = prop.get("default") {
                        input.insert(name.clone(), default.clone());
                    }
                }
            }
        }
        if open {
            input.extend(given);
        }
        Value::Object(input)
    }
}

/// Whether a number in `v` is beyond a double (its text is kept, so the
/// parser took it).
/// Where the field `loc` (`["body", field, ...]`) names comes in `schema`:
/// its position among its object's declared properties at each depth (a
/// list index as it is). A field the schema does not declare comes last.
fn field_order(schema: &Value, loc: &Value) -> Vec<usize> {
    let mut order = Vec::new();
    let mut at = schema;
    for step in loc.as_array().into_iter().flatten().skip(1) {
        // Optional[T] is {"anyOf": [T, {"type": "null"}]}: look into T.
        if let Some(Value::Array(members)) = at.get("anyOf") {
            at = members
                .iter()
                .find(|m| m.get("type") != Some(&Value::from("null")))
                .unwrap_or(at);
        }
        let next = match step {
            Value::String(field) => at
                .get("properties")
                .and_then(Value::as_object)
                .and_then(|props| Some((props.keys().position(|k| k == field)?, &props[field]))),
            Value::Number(index) => index
                .as_u64()
                .map(|i| (usize::try_from(i).unwrap_or(usize::MAX), &at["items"])),
            _ => None,
        };
        let Some((position, inner)) = next else {
            order.push(usize::MAX);
            break;
        };
        order.push(position);
        at = inner;
    }
    order
}

fn out_of_range(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_none_or(|f| !f.is_finite()),
        Value::Array(items) => items.iter().any(out_of_range),
        Value::Object(map) => map.values().any(out_of_range),
        _ => false,
    }
}

fn is_json_content_type(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else { return false };
    // What nearly every client sends, checked before any splitting.
    if ct == "application/json" {
        return true;
    }
    let mime = ct.split(';').next().unwrap_or("").trim().as_bytes();
    let (kind, suffix) = ("application/".as_bytes(), "+json".as_bytes());
    mime.eq_ignore_ascii_case(b"application/json")
        || (mime.len() >= kind.len() + suffix.len()
            && mime[..kind.len()].eq_ignore_ascii_case(kind)
            && mime[mime.len() - suffix.len()..].eq_ignore_ascii_case(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn wordcount() -> InputModel {
        InputModel::new(&json!({
            "type": "object", "required": ["text"],
            "properties": {"text": {"type": "string"}, "repeat": {"type": "integer", "default": 1}}
        }))
        .unwrap()
    }

    pub(super) const JSON: Option<&str> = Some("application/json");

    pub(super) fn reject(m: &InputModel, ct: Option<&str>, body: &str) -> Value {
        m.prepare(ct, body.as_bytes()).unwrap_err().body
    }

    pub(super) fn accept(m: &InputModel, body: &str) -> Value {
        serde_json::from_slice(&m.prepare(JSON, body.as_bytes()).unwrap().input).unwrap()
    }

    #[test]
    fn integers_beyond_64_bits_reach_the_plugin_exactly() {
        let m = wordcount();
        let big = "1000000000000000000000000000000";
        let input = m
            .prepare(JSON, format!(r#"{{"text":"a","repeat":{big}}}"#).as_bytes())
            .unwrap()
            .input;
        assert_eq!(
            String::from_utf8(input).unwrap(),
            format!(r#"{{"text":"a","repeat":{big}}}"#)
        );
    }

    // Each expected body below is what the reference host answered.
    #[test]
    fn matches_the_reference_422s() {
        let m = wordcount();
        assert_eq!(
            reject(&m, JSON, r#"{"text":"a","repeat":"abc"}"#),
            json!({"detail":[{"type":"int_parsing","loc":["body","repeat"],"msg":"Input should be a valid integer, unable to parse string as an integer","input":"abc"}]})
        );
        assert_eq!(
            reject(&m, JSON, r#"{"text":"a","repeat":2.5}"#),
            json!({"detail":[{"type":"int_from_float","loc":["body","repeat"],"msg":"Input should be a valid integer, got a number with a fractional part","input":2.5}]})
        );
        assert_eq!(
            reject(&m, JSON, r#"{"text":5}"#),
            json!({"detail":[{"type":"string_type","loc":["body","text"],"msg":"Input should be a valid string","input":5}]})
        );
        assert_eq!(
            reject(&m, JSON, r#"{}"#),
            json!({"detail":[{"type":"missing","loc":["body","text"],"msg":"Field required","input":{}}]})
        );
        assert_eq!(
            reject(&m, JSON, r#"{"text":"a","repeat":null}"#),
            json!({"detail":[{"type":"int_type","loc":["body","repeat"],"msg":"Input should be a valid integer","input":null}]})
        );
        assert_eq!(
            reject(&m, JSON, "[1,2]"),
            json!({"detail":[{"type":"model_attributes_type","loc":["body"],"msg":"Input should be a valid dictionary or object to extract fields from","input":[1,2]}]})
        );
        assert_eq!(
            reject(&m, JSON, "null"),
            json!({"detail":[{"type":"model_attributes_type","loc":["body"],"msg":"Input should be a valid dictionary or object to extract fields from","input":null}]})
        );
        assert_eq!(
            reject(&m, Some("text/plain"), r#"{"text":"a b"}"#),
            json!({"detail":[{"type":"model_attributes_type","loc":["body"],"msg":"Input should be a valid dictionary or object to extract fields from","input":"{\"text\":\"a b\"}"}]})
        );
        assert_eq!(
            reject(&m, None, ""),
            json!({"detail":[{"type":"missing","loc":["body"],"msg":"Field required","input":null}]})
        );
        assert_eq!(
            reject(&m, JSON, r#"{"text":"#),
            json!({"detail":"Invalid JSON body","reason":"malformed_envelope"})
        );
    }

    #[test]
    fn lax_conversions_defaults_and_extras_match_the_reference() {
        let m = wordcount();
        assert_eq!(
            accept(&m, r#"{"text":"a","repeat":"3"}"#),
            json!({"text":"a","repeat":3})
        );
        assert_eq!(
            accept(&m, r#"{"text":"a","repeat":2.0}"#),
            json!({"text":"a","repeat":2})
        );
        assert_eq!(
            accept(&m, r#"{"text":"a","repeat":true}"#),
            json!({"text":"a","repeat":1})
        );
        assert_eq!(
            accept(&m, r#"{"text":"a","extra":1}"#),
            json!({"text":"a","repeat":1})
        );
    }

    #[test]
    fn a_plugin_without_inputs_ignores_the_body_but_not_its_reserved_fields() {
        let m = InputModel::new(&json!({"type": "null"})).unwrap();
        for body in ["", "{}", "[1]", r#"{"a":1}"#] {
            let prepared = m
                .prepare(Some("application/json"), body.as_bytes())
                .unwrap();
            assert_eq!(prepared.input, b"null", "{body:?}");
        }
        let r = m
            .prepare(Some("application/json"), br#"{"invocation_settings":"x"}"#)
            .unwrap_err();
        assert_eq!(r.body["reason"], "malformed_envelope");
        let r = m
            .prepare(Some("application/json"), b"not json")
            .unwrap_err();
        assert_eq!(r.body["detail"], "Invalid JSON body");
    }

    #[test]
    fn nested_errors_come_in_the_order_of_their_fields() {
        let m = InputModel::new(&json!({
            "type": "object", "required": ["f"],
            "properties": {"f": {"anyOf": [{"type": "object", "required": ["a", "b", "c"],
                "properties": {"a": {"type": "string"}, "b": {"type": "string"},
                               "c": {"type": "array", "items": {"type": "integer"}}}},
                {"type": "null"}]}}
        }))
        .unwrap();
        let r = reject(&m, Some("application/json"), r#"{"f":{"a":1,"c":[1,"x"]}}"#);
        let locs: Vec<&Value> = r["detail"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["loc"])
            .collect();
        assert_eq!(
            locs,
            [
                &json!(["body", "f", "a"]),
                &json!(["body", "f", "b"]),
                &json!(["body", "f", "c", 1])
            ]
        );
    }

    #[test]
    fn a_union_reports_each_member_and_a_path_its_own_type() {
        let m = InputModel::new(&json!({
            "type": "object",
            "properties": {
                "value": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                "path": {"type": "string", "is_path": true}
            }
        }))
        .unwrap();
        let r = reject(&m, Some("application/json"), r#"{"value":1.5,"path":3}"#);
        let items: Vec<(&Value, &Value)> = r["detail"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (&e["type"], &e["loc"]))
            .collect();
        assert_eq!(
            items,
            [
                (&json!("int_from_float"), &json!(["body", "value", "int"])),
                (&json!("string_type"), &json!(["body", "value", "str"])),
                (&json!("path_type"), &json!(["body", "path"])),
            ]
        );
    }

    #[test]
    fn an_all_optional_body_may_be_absent() {
        let m = InputModel::new(
            &json!({"type":"object","properties":{"n":{"type":"integer","default":4}}}),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&m.prepare(None, b"").unwrap().input).unwrap(),
            json!({"n": 4})
        );
    }
}
