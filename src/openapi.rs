//! `/openapi.json` and `/docs`, built from the plugin's schemas.
//!
//! The document describes the contract routes only; the probes are for the
//! platform, not for callers, and stay out of it.

use serde_json::{json, Value};

use crate::plugin::Manifest;

/// The OpenAPI 3.1 document for `m`.
pub fn document(m: &Manifest) -> Value {
    let body_required = m
        .request()
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty());
    let json_response = |description: &str, schema: Value| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let usage = json!({"type": "array", "items": {"type": "object",
        "properties": {"value": {"type": "integer"}, "name": {"type": "string"}}, "required": ["value", "name"]}});
    let nullable_string = json!({"anyOf": [{"type": "string"}, {"type": "null"}]});
    let plugin_error = json!({"anyOf": [{"type": "object", "properties": {
        "error_type": {"type": "string"}, "error_reason": {"type": "string"},
        "dependency": nullable_string, "audience": nullable_string, "retryable": {"type": "boolean"}}},
        {"type": "null"}]});
    let envelope = json!({
        "type": "object",
        "properties": {
            "usage": usage,
            "status_code": {"type": "integer"},
            "file_data": {},
            "filedata_meta": {"type": "object", "properties": {
                "terminate_current": {"type": "boolean"}, "new_records": {"type": "array"}}},
            "status_code_text": nullable_string,
            "failure_category": nullable_string,
            "plugin_error": plugin_error,
            "output": {"anyOf": [m.outputs(), {"type": "null"}]},
            "message_channels": {"type": "object", "properties": {
                "infos": {"type": "array", "items": {"type": "string"}},
                "warnings": {"type": "array", "items": {"type": "string"}}}}
        },
        "required": ["usage", "status_code", "file_data", "filedata_meta", "status_code_text",
                     "failure_category", "plugin_error", "output", "message_channels"]
    });
    // What etl-serve's own refusals carry (the reference's shape).
    let detail = json!({"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]});
    let invoke_content = if m.streaming {
        json!({"application/x-ndjson": {"schema": {"$ref": "#/components/schemas/InvokeResponse"}}})
    } else {
        json!({"application/json": {"schema": {"$ref": "#/components/schemas/InvokeResponse"}}})
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": m.name, "version": m.version,
                 "description": format!("Plugin `{}` served by etl-serve {}", m.name, env!("CARGO_PKG_VERSION"))},
        "paths": {
            "/invoke": {"post": {
                "summary": "Run the plugin",
                "operationId": "invoke",
                "requestBody": {"required": body_required,
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Inputs"}}}},
                "responses": {
                    "200": {"description": "The plugin ran; a plugin failure is reported inside the envelope",
                            "content": invoke_content},
                    "400": json_response("The body cannot be read or decoded, or X-ETL-Timeout-Ms is not a whole number of milliseconds", detail.clone()),
                    "408": json_response("The body stopped arriving (--body-read-timeout)", detail.clone()),
                    "413": json_response("The body is over the size limit", detail.clone()),
                    "422": json_response("The body is not valid for the plugin's inputs",
                                         json!({"$ref": "#/components/schemas/HTTPValidationError"})),
                    "4XX": json_response("The plugin refused its input itself (ABI 1.1 reject_request), with the status and JSON body it chose", json!({})),
                    "503": json_response("Shutdown-abort, an envelope: the server is shutting down, retry elsewhere; or, with a detail, no capacity now: retry later. Both carry Retry-After",
                                         json!({"anyOf": [{"$ref": "#/components/schemas/InvokeResponse"}, detail]}))
                }
            }},
            "/schema": {"get": {"summary": "The plugin's input and output schemas", "operationId": "schema",
                "responses": {"200": json_response("The schemas", json!({"type": "object",
                    "properties": {"inputs": {"type": "object"}, "outputs": {"type": "object"}},
                    "required": ["inputs", "outputs"]}))}}},
            "/id": {"get": {"summary": "The plugin id", "operationId": "id",
                "responses": {"200": json_response("The id", json!({"type": "string"}))}}},
            "/precheck": {"get": {"summary": "Check that the plugin can work", "operationId": "precheck",
                "responses": {"200": json_response("The precheck result", json!({"type": "object", "properties": {
                    "usage": usage, "status_code": {"type": "integer"}, "status_code_text": nullable_string,
                    "failure_category": nullable_string, "plugin_error": plugin_error}})),
                    "503": json_response("Shutdown-abort: the server is shutting down, retry elsewhere; or no plugin thread free now: retry later. Both carry Retry-After",
                                         json!({"type": "object"}))}}},
            "/metadata": {"get": {"summary": "Plugin metadata", "operationId": "metadata",
                "responses": {"200": json_response("The metadata", json!({"type": "object",
                    "properties": {"api_version": {"type": "string"}, "identifier": {"type": "string"},
                                   "capabilities": {"type": "array", "items": {"type": "string"}}}}))}}}
        },
        "components": {"schemas": {
            "Inputs": m.request(),
            "InvokeResponse": envelope,
            "HTTPValidationError": {"type": "object", "properties": {"detail": {"anyOf": [
                {"type": "array", "items": {"type": "object", "properties": {
                    "type": {"type": "string"}, "loc": {"type": "array"}, "msg": {"type": "string"}, "input": {}}}},
                {"type": "string"}]}}}
        }}
    })
}

/// A small self-contained page describing the plugin's API.
pub fn docs_page(m: &Manifest) -> String {
    let pretty = |v: &Value| html_escape(&serde_json::to_string_pretty(v).unwrap_or_default());
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{name} - etl-serve</title>\n\
         <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style>\n\
         </head><body>\n<h1>{name} {version}</h1>\n<p>Plugin id <code>{id}</code>, served by etl-serve {host}. \
         The machine-readable description is <a href=\"/openapi.json\">/openapi.json</a>.</p>\n\
         <h2>POST /invoke</h2><p>Request body (JSON Schema):</p><pre>{inputs}</pre>\n\
         <p>Each output (JSON Schema), inside the envelope's <code>output</code>{streaming}:</p><pre>{outputs}</pre>\n\
         <h2>Other routes</h2><ul><li><a href=\"/schema\">GET /schema</a></li><li><a href=\"/id\">GET /id</a></li>\
         <li><a href=\"/precheck\">GET /precheck</a></li><li><a href=\"/metadata\">GET /metadata</a></li></ul>\n\
         </body></html>\n",
        name = html_escape(&m.name),
        version = html_escape(&m.version),
        id = html_escape(&m.id),
        host = env!("CARGO_PKG_VERSION"),
        inputs = pretty(m.inputs()),
        outputs = pretty(m.outputs()),
        streaming = if m.streaming { ", one NDJSON line per item" } else { "" },
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
