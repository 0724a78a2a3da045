//! The etl plugin contract, checked against the real binary serving real
//! plugin libraries over loopback: every route, every error case, for the
//! Rust and the C `wordcount` alike.

use crate::support;

use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use support::{fixture, plugin, Server};

/// The id the reference host gives `wordcount(usage: list, text: str, repeat: int = 1)`.
const WORDCOUNT_ID: &str = "995355281551620c1e2a7cab3da49c91";

fn wordcounts() -> [Server; 2] {
    [
        Server::start(&plugin("wordcount"), &[]),
        Server::start(&plugin("wordcount_c"), &[]),
    ]
}

fn envelope(usage: Value, output: Value) -> Value {
    json!({
        "usage": usage, "status_code": 200, "file_data": null,
        "filedata_meta": {"terminate_current": false, "new_records": []},
        "status_code_text": null, "failure_category": null, "plugin_error": null,
        "output": output, "message_channels": {"infos": [], "warnings": []}
    })
}

#[test]
fn invoke_answers_the_envelope_in_the_reference_key_order() {
    for s in wordcounts() {
        let r = s.post_json("/invoke", r#"{"text":"hello big world"}"#);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        // Byte for byte what the reference host answers.
        assert_eq!(
            r.text(),
            r#"{"usage":[{"value":15,"name":"chars"}],"status_code":200,"file_data":null,"filedata_meta":{"terminate_current":false,"new_records":[]},"status_code_text":null,"failure_category":null,"plugin_error":null,"output":{"words":3,"chars":15},"message_channels":{"infos":[],"warnings":[]}}"#
        );
    }
}

#[test]
fn rust_and_c_wordcount_agree_on_every_input() {
    let [rust, c] = wordcounts();
    let bodies = [
        r#"{"text":"hello big world","repeat":3}"#,
        r#"{"text":""}"#,
        r#"{"text":"  leading and   trailing  ","repeat":"2"}"#,
        r#"{"text":"tab\there\nnewline\u00a0nbsp\u3000ideographic"}"#,
        r#"{"text":"é😀 \ud83d\ude00 \"quoted\" back\\slash","repeat":2.0}"#,
        r#"{"repeat":0,"text":"ignored","extra":{"nested":[1,"two"]}}"#,
        r#"{"text":"negative","repeat":-2}"#,
        r#"{"text":"nul\u0000inside"}"#,
    ];
    for body in bodies {
        let a = rust.post_json("/invoke", body);
        let b = c.post_json("/invoke", body);
        assert_eq!(a.status, 200, "{body}");
        assert_eq!(a.json(), b.json(), "rust and C differ on {body}");
    }
    let r = rust.post_json("/invoke", bodies[3]).json();
    // tab here newline nbsp ideographic: Unicode whitespace splits words.
    assert_eq!(r["output"], json!({"words": 5, "chars": 36}));
    assert_eq!(r["usage"], json!([{"value": 36, "name": "chars"}]));
}

#[test]
fn schema_id_and_metadata_are_identical_for_rust_and_c() {
    let [rust, c] = wordcounts();
    for s in [&rust, &c] {
        let schema = s.get("/schema").json();
        assert_eq!(
            schema,
            json!({
                "inputs": {"type": "object", "required": ["text"],
                           "properties": {"text": {"type": "string"}, "repeat": {"type": "integer", "default": 1}}},
                "outputs": {"type": "object", "properties": {"words": {"type": "integer"}, "chars": {"type": "integer"}},
                            "required": ["words", "chars"]}
            })
        );
        assert_eq!(s.get("/id").json(), json!(WORDCOUNT_ID));
        let meta = s.get("/metadata");
        assert_eq!(
            meta.text(),
            format!(
                r#"{{"api_version":"3","identifier":"{WORDCOUNT_ID}","capabilities":["invocation_settings","invocation_context"]}}"#
            )
        );
    }
}

/// Answers of etl-uvicorn 0.1.0 for the reference `wordcount` function,
/// recorded byte for byte.
const REFERENCE_SCHEMA: &str = r#"{"inputs":{"type":"object","required":["text"],"properties":{"text":{"type":"string"},"repeat":{"type":"integer","default":1}}},"outputs":{"type":"object","properties":{"words":{"type":"integer"},"chars":{"type":"integer"}},"required":["words","chars"]}}"#;
const REFERENCE_422S: [(&str, &str); 2] = [
    (
        r#"{"text":5,"repeat":"x"}"#,
        r#"{"detail":[{"type":"string_type","loc":["body","text"],"msg":"Input should be a valid string","input":5},{"type":"int_parsing","loc":["body","repeat"],"msg":"Input should be a valid integer, unable to parse string as an integer","input":"x"}]}"#,
    ),
    (
        r#"{"repeat":2.5}"#,
        r#"{"detail":[{"type":"missing","loc":["body","text"],"msg":"Field required","input":{"repeat":2.5}},{"type":"int_from_float","loc":["body","repeat"],"msg":"Input should be a valid integer, got a number with a fractional part","input":2.5}]}"#,
    ),
];

#[test]
fn a_plugin_declaring_the_reference_schema_answers_byte_for_byte() {
    // The C wordcount declares the reference's schema text: /schema keeps
    // its key order, and 422 items carry the reference's keys in its order.
    let s = Server::start(&plugin("wordcount_c"), &[]);
    assert_eq!(s.get("/schema").text(), REFERENCE_SCHEMA);
    for (body, answer) in REFERENCE_422S {
        let r = s.post_json("/invoke", body);
        assert_eq!(r.status, 422);
        assert_eq!(r.text(), answer, "{body}");
    }
}

#[test]
fn validation_errors_are_fastapi_shaped() {
    for s in wordcounts() {
        let cases: [(&str, Value); 5] = [
            (
                r#"{"text":"a","repeat":"abc"}"#,
                json!([{"type":"int_parsing","loc":["body","repeat"],"msg":"Input should be a valid integer, unable to parse string as an integer","input":"abc"}]),
            ),
            (
                r#"{"text":"a","repeat":2.5}"#,
                json!([{"type":"int_from_float","loc":["body","repeat"],"msg":"Input should be a valid integer, got a number with a fractional part","input":2.5}]),
            ),
            (
                r#"{}"#,
                json!([{"type":"missing","loc":["body","text"],"msg":"Field required","input":{}}]),
            ),
            (
                r#"{"text":5}"#,
                json!([{"type":"string_type","loc":["body","text"],"msg":"Input should be a valid string","input":5}]),
            ),
            (
                r#"[1,2]"#,
                json!([{"type":"model_attributes_type","loc":["body"],"msg":"Input should be a valid dictionary or object to extract fields from","input":[1,2]}]),
            ),
        ];
        for (body, detail) in cases {
            let r = s.post_json("/invoke", body);
            assert_eq!(r.status, 422, "{body}");
            assert_eq!(r.json(), json!({ "detail": detail }), "{body}");
        }
    }
}

#[test]
fn malformed_json_missing_body_and_wrong_content_type() {
    let s = Server::start(&plugin("wordcount"), &[]);
    let r = s.post_json("/invoke", r#"{"text":"#);
    assert_eq!(
        (r.status, r.json()),
        (
            422,
            json!({"detail":"Invalid JSON body","reason":"malformed_envelope"})
        )
    );

    let r = s.post_json("/invoke", "");
    assert_eq!(
        (r.status, r.json()),
        (
            422,
            json!({"detail":[{"type":"missing","loc":["body"],"msg":"Field required","input":null}]})
        )
    );

    // As with FastAPI, a body that is not declared JSON is not parsed.
    let r = s.post(
        "/invoke",
        Some("application/x-www-form-urlencoded"),
        br#"{"text":"a b"}"#,
    );
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["detail"][0]["type"], "model_attributes_type");
    assert_eq!(r.json()["detail"][0]["input"], r#"{"text":"a b"}"#);

    // A media type is read however its parameters are spelt: a byte past
    // ASCII in one (UTF-8 or not) leaves the body JSON, as with FastAPI.
    for charset in [&b"\"\xc3\xbf\""[..], b"\"\xff\""] {
        let raw = [
            &b"POST /invoke HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 12\r\nContent-Type: application/json; charset="[..],
            charset,
            b"\r\n\r\n{\"text\":\"a\"}",
        ]
        .concat();
        let r = support::request(s.addr, &raw);
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // A raw control character: a clean 422.
    let r = s.post_json("/invoke", "{\"text\":\"\u{0}\"}");
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (422, json!("malformed_envelope"))
    );
}

#[test]
fn a_body_nests_as_deep_as_the_reference_parses_and_deeper_gets_its_400() {
    let s = Server::start(&plugin("wordcount"), &[]);
    // `levels` arrays, one in the other, inside the body's object.
    let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let inner = 999; // with the body's object: 1000 levels, the limit
    for text in [r#""a""#, r#""a\n""#] {
        // (An escape sends the body past the validation fast path.)
        for body in [
            format!(r#"{{"text":{text},"extra":{}}}"#, nested(inner)),
            format!(
                r#"{{"text":{text},"invocation_settings":{{"k":{}}}}}"#,
                nested(inner - 1)
            ),
        ] {
            let r = s.post_json("/invoke", &body);
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["output"]["words"], 1);
            let deeper = body.replacen('[', "[[", 1).replacen(']', "]]", 1);
            let r = s.post_json("/invoke", &deeper);
            assert_eq!(
                (r.status, r.text()),
                (
                    400,
                    r#"{"detail":"There was an error parsing the body"}"#.into()
                )
            );
        }
    }
    // A declared input nested past serde_json's own 128 levels is checked
    // like any other value, and echoed whole in the 422.
    let r = s.post_json("/invoke", &format!(r#"{{"text":{}}}"#, nested(inner)));
    assert_eq!(r.status, 422);
    let expected = format!(
        r#"{{"detail":[{{"type":"string_type","loc":["body","text"],"msg":"Input should be a valid string","input":{}}}]}}"#,
        nested(inner)
    );
    assert_eq!(r.text(), expected);
}

#[test]
fn a_lone_surrogate_anywhere_in_a_body_is_the_invalid_json_422() {
    let s = Server::start(&plugin("wordcount"), &[]);
    for field in ["text", "extra", "invocation_settings", "invocation_context"] {
        let value = r#"{"tenant_id":"\ud800"}"#;
        let body = match field {
            "text" => r#"{"text":"a\ud800"}"#.to_owned(),
            _ => format!(r#"{{"text":"a","{field}":{value}}}"#),
        };
        let r = s.post_json("/invoke", &body);
        assert_eq!(
            (r.status, r.json()),
            (
                422,
                json!({"detail":"Invalid JSON body","reason":"malformed_envelope"})
            ),
            "{field}"
        );
        // A pair is one character.
        let r = s.post_json("/invoke", &body.replace(r"\ud800", r"\ud83d\ude00"));
        assert_eq!(r.status, 200, "{field}: {}", r.text());
    }
}

#[test]
fn bodies_decode_as_the_reference_decodes_them() {
    // Recorded from etl-uvicorn 0.1.0: bytes that do not decode are a 400,
    // whatever the charset says; a UTF-8 BOM and UTF-16 or UTF-32 (with
    // or without a BOM) are read; text that is not JSON is the "Invalid
    // JSON body" 422 under any content type.
    let s = Server::start(&plugin("wordcount_c"), &[]);
    let text = r#"{"text":"héllo wörld"}"#;
    let utf16le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let utf32be: Vec<u8> = text
        .chars()
        .flat_map(|c| (c as u32).to_be_bytes())
        .collect();
    for (name, body, content_type) in [
        (
            "UTF-8 BOM",
            [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat(),
            "application/json",
        ),
        ("UTF-16LE", utf16le.clone(), "application/json"),
        (
            "UTF-16 BOM",
            [&[0xFF, 0xFE][..], &utf16le].concat(),
            "application/json; charset=utf-16",
        ),
        ("UTF-32BE", utf32be, "application/json"),
    ] {
        let r = s.post("/invoke", Some(content_type), &body);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.json()["output"]["words"], 2, "{name}");
    }
    for body in [&b"{\"text\":\"\xff\xfe\"}"[..], b"{\"text\":\"caf\xe9\"}"] {
        for content_type in ["application/json", "application/json; charset=latin-1"] {
            let r = s.post("/invoke", Some(content_type), body);
            assert_eq!(r.status, 400);
            assert_eq!(
                r.text(),
                r#"{"detail":"There was an error parsing the body"}"#
            );
        }
    }
    for content_type in [None, Some("text/plain")] {
        let r = s.post("/invoke", content_type, b"hello");
        assert_eq!(r.status, 422);
        assert_eq!(
            r.text(),
            r#"{"detail":"Invalid JSON body","reason":"malformed_envelope"}"#
        );
    }
}

#[test]
fn an_all_optional_body_may_be_absent_and_defaults_apply() {
    let s = Server::start(&fixture(None), &["--plugin-config", "cfg-value"]);
    for body in ["", "{}"] {
        let r = s.post_json("/invoke", body);
        assert_eq!(r.status, 200, "{body:?}: {}", r.text());
        // mode defaulted to "ok": the fixture echoes its configuration.
        assert_eq!(r.json()["output"]["config"], "cfg-value");
    }
}

#[test]
fn static_routes_and_errors() {
    let s = Server::start(&plugin("wordcount"), &[]);
    let r = s.get("/");
    assert_eq!((r.status, r.header("location")), (307, Some("/docs")));
    let r = s.get("/docs");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.text().contains("wordcount") && r.text().contains(WORDCOUNT_ID));

    let r = s.get("/nope");
    assert_eq!((r.status, r.json()), (404, json!({"detail": "Not Found"})));
    let r = s.get("/invoke");
    assert_eq!(
        (r.status, r.json()),
        (405, json!({"detail": "Method Not Allowed"}))
    );
    assert_eq!(r.header("allow"), Some("POST"));
    let r = s.post_json("/schema", "{}");
    assert_eq!(r.status, 405);

    let p = s.get("/precheck");
    assert_eq!(
        (p.status, p.json()),
        (
            200,
            json!({"usage": [], "status_code": 200, "status_code_text": null, "failure_category": null, "plugin_error": null})
        )
    );
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.get("/readyz").status, 200);
}

#[test]
fn openapi_describes_the_plugin() {
    let s = Server::start(&plugin("wordcount"), &[]);
    let doc = s.get("/openapi.json").json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "wordcount");
    assert_eq!(
        doc["components"]["schemas"]["Inputs"],
        s.get("/schema").json()["inputs"]
    );
    assert_eq!(
        doc["paths"]["/invoke"]["post"]["requestBody"]["required"],
        true
    );
    for path in ["/invoke", "/schema", "/id", "/precheck", "/metadata"] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    for probe in ["/healthz", "/readyz"] {
        assert!(
            doc["paths"][probe].is_null(),
            "{probe} must not be in the OpenAPI document"
        );
    }
}

/// Every status a client's request alone can draw from `/invoke` is in the
/// OpenAPI document, with the body's shape: a generated client, or a
/// schemathesis run, finds none undocumented.
#[test]
fn the_openapi_document_lists_what_invoke_answers() {
    let s = Server::start(&plugin("wordcount"), &["--max-body-size", "64"]);
    let doc = s.get("/openapi.json").json();
    let responses = &doc["paths"]["/invoke"]["post"]["responses"];
    let timeout_header = format!(
        "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nX-ETL-Timeout-Ms: 1.5\r\nContent-Length: 12\r\n\r\n{}",
        r#"{"text":"a"}"#
    );
    let answers = [
        s.post_json("/invoke", r#"{"text":"a"}"#),
        s.post("/invoke", Some("application/json"), b"\xff\xfe\xfd"),
        support::request(s.addr, timeout_header.as_bytes()),
        s.post_json("/invoke", &format!(r#"{{"text":"{}"}}"#, "a".repeat(100))),
        s.post_json("/invoke", r#"{"text":3}"#),
    ];
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 400, 400, 413, 422]);
    for r in &answers[1..] {
        let shape = &responses[r.status.to_string()]["content"]["application/json"]["schema"];
        assert!(
            shape.is_object(),
            "{} is not documented: {responses}",
            r.status
        );
        if r.status != 422 {
            assert_eq!(
                shape["required"],
                serde_json::json!(["detail"]),
                "{}",
                r.status
            );
            assert!(
                r.json()["detail"].is_string(),
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    // The 503s: the shutdown-abort's envelope, or a detail for want of
    // capacity (the shutdown and limit tests pin those bodies).
    let docs_503 = &responses["503"]["content"]["application/json"]["schema"]["anyOf"];
    assert_eq!(docs_503[0]["$ref"], "#/components/schemas/InvokeResponse");
    assert_eq!(docs_503[1]["required"], serde_json::json!(["detail"]));
    // And a plugin's own refusal (ABI 1.1), any 4xx of its choosing.
    assert!(responses["4XX"].is_object(), "{responses}");
}

#[test]
fn streaming_sends_one_envelope_per_item_then_the_failure_line() {
    let s = Server::start(&plugin("ticker"), &[]);
    let r = s.post_json("/invoke", r#"{"count":3,"interval_ms":0}"#);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let lines = r.lines();
    assert_eq!(lines.len(), 3);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line, &envelope(json!([]), json!({"i": i})));
    }

    let lines = s
        .post_json("/invoke", r#"{"count":5,"fail_at":2,"interval_ms":0}"#)
        .lines();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["output"], json!({"i": 1}));
    assert_eq!(lines[2]["status_code"], 500);
    assert_eq!(
        lines[2]["status_code_text"],
        "[TickerError] failed after 2 items"
    );
    assert_eq!(lines[2]["output"], Value::Null);

    // A failure before the first item is still a stream of one line.
    let r = s.post_json("/invoke", r#"{"count":5,"fail_at":0}"#);
    assert_eq!((r.status, r.lines().len()), (200, 1));
    assert_eq!(r.lines()[0]["status_code"], 500);
}

#[test]
fn plugin_failures_are_reported_inside_the_envelope() {
    let s = Server::start(&fixture(None), &[]);
    let r = s.post_json("/invoke", r#"{"mode":"fail_status"}"#);
    assert_eq!(r.status, 200);
    let e = r.json();
    assert_eq!(e["status_code"], 418);
    assert_eq!(e["status_code_text"], "[TeapotError] short and stout");
    assert_eq!(e["usage"], json!([{"value": 2, "name": "attempts"}]));
    assert_eq!(e["message_channels"]["warnings"], json!(["kettle is hot"]));
    assert_eq!(e["output"], Value::Null);

    let e = s.post_json("/invoke", r#"{"mode":"fail_silent"}"#).json();
    assert_eq!(e["status_code"], 500);
    assert_eq!(
        e["status_code_text"],
        "[PluginError] the plugin reported a failure without describing it"
    );

    let e = s.post_json("/invoke", r#"{"mode":"meta"}"#).json();
    assert_eq!(
        e["filedata_meta"],
        json!({"terminate_current": true, "new_records": [{"k": 1}]})
    );
    assert_eq!(e["message_channels"]["infos"], json!(["hello"]));
}

#[test]
fn contract_violations_get_a_clean_500_envelope() {
    let s = Server::start(&fixture(None), &[]);
    let cases = [
        (
            "invalid_json",
            "[PluginContractError] the plugin emitted output that is not valid JSON",
        ),
        (
            "invalid_utf8",
            "[PluginContractError] the plugin emitted output that is not valid UTF-8",
        ),
        (
            "emit_twice",
            "[PluginContractError] the plugin emitted more than one output but does not stream",
        ),
        (
            "no_emit",
            "[PluginContractError] the plugin returned ok without emitting an output",
        ),
        (
            "bad_code",
            "[PluginContractError] the plugin returned the unknown result code 7",
        ),
    ];
    for (mode, text) in cases {
        let r = s.post_json("/invoke", &format!(r#"{{"mode":"{mode}"}}"#));
        assert_eq!(r.status, 200, "{mode}");
        let e = r.json();
        assert_eq!(e["status_code"], 500, "{mode}");
        assert!(
            e["status_code_text"].as_str().unwrap().starts_with(text),
            "{mode}: {}",
            e["status_code_text"]
        );
    }
    // And the server keeps serving.
    assert_eq!(s.post_json("/invoke", "{}").json()["status_code"], 200);
}

#[test]
fn a_callback_after_invoke_returned_is_refused_harmlessly() {
    let s = Server::start(&fixture(None), &[]);
    assert_eq!(
        s.post_json("/invoke", r#"{"mode":"late"}"#).json()["status_code"],
        200
    );
    // The fixture's thread calls add_info with the stale handle after 200 ms.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let rc = s.post_json("/invoke", "{}").json()["output"]["late_rc"].clone();
        if rc != 1 {
            assert_eq!(rc, -3, "a late callback answers ETL_CB_CLOSED");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late call never happened"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn callbacks_from_a_plugin_thread_reach_the_running_invocation() {
    let s = Server::start(&fixture(None), &[]);
    for _ in 0..3 {
        let e = s.post_json("/invoke", r#"{"mode":"helper_thread"}"#).json();
        assert_eq!(e["status_code"], 200, "{e}");
        assert_eq!(e["output"], json!({"from": "helper"}));
        assert_eq!(e["usage"], json!([{"value": 5, "name": "helper"}]));
    }
}

#[test]
fn a_handle_kept_from_an_earlier_call_is_closed() {
    let s = Server::start(&fixture(None), &[]);
    let stale = || s.post_json("/invoke", r#"{"mode":"stale"}"#).json();
    assert_eq!(stale()["output"]["stale_rc"], 1, "no earlier handle yet");
    // Enough calls that both worker threads make some, inline or not.
    for _ in 0..100 {
        let e = stale();
        assert_eq!(e["output"]["stale_rc"], -3, "ETL_CB_CLOSED: {e}");
        assert_eq!(e["usage"], json!([]));
    }
}

/// Outside a shutdown too: the host takes the plugin at its word, and the
/// connection stays open, since the server is not draining.
#[test]
fn a_plugin_bailing_out_answers_the_shutdown_abort() {
    let s = Server::start(&fixture(None), &[]);
    let mut conn = s.connect();
    let r = conn
        .send("POST", "/invoke", Some(r#"{"mode":"shutdown"}"#))
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), None);
    assert_eq!(conn.send("GET", "/id", None).unwrap().status, 200);
    let e = r.json();
    assert_eq!(e["status_code"], 503);
    assert_eq!(e["plugin_error"]["error_type"], "shutdown");
    assert_eq!(e["plugin_error"]["retryable"], true);
    assert_eq!(e["usage"], json!([{"value": 3, "name": "pages"}]));
}

#[test]
fn precheck_runs_the_plugins_hook() {
    let ok = Server::start(&fixture(None), &[]);
    let p = ok.get("/precheck").json();
    assert_eq!(p["status_code"], 200);
    assert_eq!(p["usage"], json!([{"value": 1, "name": "probes"}]));

    let failing = Server::start(&fixture(None), &["--plugin-config", "precheck_fails"]);
    let r = failing.get("/precheck");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"usage": [{"value": 1, "name": "probes"}], "status_code": 424,
               "status_code_text": "[DependencyError] upstream is down", "failure_category": null, "plugin_error": null})
    );
}

#[test]
fn a_panicking_rust_plugin_answers_a_500_envelope_and_keeps_serving() {
    let s = Server::start(&plugin("panicky"), &[]);
    for _ in 0..3 {
        let e = s.post_json("/invoke", r#"{"panic":true}"#).json();
        assert_eq!(e["status_code"], 500);
        assert_eq!(
            e["status_code_text"],
            "[PluginPanic] the plugin lost its temper"
        );
        assert_eq!(e["usage"], json!([{"value": 1, "name": "before_panic"}]));
    }
    let p = s.get("/precheck").json();
    assert_eq!(p["status_code"], 500);
    assert_eq!(p["status_code_text"], "[PluginPanic] precheck panicked too");
    // Its Precheck impl is what makes the table's precheck hook non-NULL.
    let check = support::etl_serve()
        .arg("--plugin")
        .arg(plugin("panicky"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("precheck:     yes"));
    assert_eq!(
        s.post_json("/invoke", r#"{"panic":false}"#).json()["output"],
        json!({"calm": true})
    );
}

#[test]
fn a_rust_plugin_takes_an_input_as_deep_as_the_host_accepts() {
    let s = Server::start(&plugin("panicky"), &[]);
    // The body is a level more: 1000 at most, the host's limit. serde_json
    // on its own stops at 128, which the SDK lifts.
    for levels in [1, 129, 999] {
        let nested = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let body = format!(r#"{{"panic":false,"nested":{nested}}}"#);
        let e = s.post_json("/invoke", &body).json();
        assert_eq!(e["output"], json!({"calm": true, "levels": levels}), "{e}");
    }
}

#[test]
fn an_explicit_id_is_served_as_is() {
    let s = Server::start(&fixture(None), &[]);
    assert_eq!(s.get("/id").json(), json!("faulty-explicit-id"));
}

/// Sends `pieces` on one connection with a pause between them, so that
/// the server reads them as separate frames, and reads the answer. Stops
/// sending when the server has answered and closed early.
fn send_in_pieces(s: &Server, pieces: &[String]) -> support::Response {
    let mut c = s.connect();
    for piece in pieces {
        if c.stream_mut().write_all(piece.as_bytes()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    support::read_response(&mut std::io::BufReader::new(
        c.stream_mut().try_clone().unwrap(),
    ))
    .unwrap()
}

#[test]
fn a_body_that_arrives_in_pieces_is_read_whole() {
    let s = Server::start(&plugin("wordcount"), &["--max-body-size", "1KiB"]);
    let head = "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n";
    let chunk = |t: &str| format!("{:x}\r\n{t}\r\n", t.len());

    // Chunked, one chunk per write.
    let chunked = format!("{head}Transfer-Encoding: chunked\r\n\r\n");
    let r = send_in_pieces(
        &s,
        &[
            chunked.clone() + &chunk(r#"{"text":"one "#),
            chunk("two three "),
            chunk(r#"four","repeat":2}"#) + "0\r\n\r\n",
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["output"], json!({"words": 8, "chars": 36}));

    // With a Content-Length, split across writes.
    let body = r#"{"text":"alpha beta gamma"}"#;
    let r = send_in_pieces(
        &s,
        &[
            format!(
                "{head}Content-Length: {}\r\n\r\n{}",
                body.len(),
                &body[..10]
            ),
            body[10..20].to_owned(),
            body[20..].to_owned(),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["output"], json!({"words": 3, "chars": 16}));

    // Chunks that pass the cap only together are refused.
    let filler = "x".repeat(600);
    let r = send_in_pieces(
        &s,
        &[
            chunked + &chunk(&format!(r#"{{"text":"{filler}"#)),
            chunk(&filler),
            chunk(r#""}"#) + "0\r\n\r\n",
        ],
    );
    assert_eq!(r.status, 413, "{}", r.text());
}

#[test]
fn bodies_over_the_cap_are_refused_before_they_are_read() {
    let s = Server::start(&plugin("wordcount"), &["--max-body-size", "1KiB"]);
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(2000));
    let r = s.post_json("/invoke", &big);
    assert_eq!(r.status, 413);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("over the limit of 1024 bytes"));

    // Chunked, so the size is only known while reading.
    let mut raw = b"POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len()).as_bytes());
    assert_eq!(support::request(s.addr, &raw).status, 413);

    // Under the cap is fine.
    assert_eq!(s.post_json("/invoke", r#"{"text":"small"}"#).status, 200);
}

#[test]
fn a_document_larger_than_16_mib_is_served_by_default() {
    // etl-uvicorn has no body limit; the default here is 256 MiB.
    let s = Server::start(&plugin("wordcount"), &[]);
    let body = format!(r#"{{"text":"{}"}}"#, "ab ".repeat(6 << 20));
    assert!(body.len() > 16 << 20);
    let r = s.post_json("/invoke", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["output"]["words"], 6 << 20);
}

#[test]
fn routes_are_matched_as_the_reference_matches_them() {
    // Recorded from etl-uvicorn 0.1.0: a trailing slash on one of its routes
    // is a 307 to the route, absolute from the Host header, query kept;
    // percent-escapes are decoded; a fragment is ignored; /redoc exists.
    let s = Server::start(&plugin("wordcount"), &[]);
    let get = |target: &str, method: &str| {
        support::request(
            s.addr,
            format!("{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
    };
    for (target, method, location) in [
        ("/id/", "GET", "http://t/id"),
        ("/schema/", "GET", "http://t/schema"),
        ("/invoke/", "POST", "http://t/invoke"),
        ("/docs/", "GET", "http://t/docs"),
        ("/id/?x=1", "GET", "http://t/id?x=1"),
    ] {
        let r = get(target, method);
        assert_eq!(r.status, 307, "{method} {target}");
        assert_eq!(r.header("location"), Some(location), "{method} {target}");
        assert!(r.body.is_empty());
    }
    for target in ["/%69d", "/id#fragment", "/id?x=1"] {
        let r = get(target, "GET");
        assert_eq!(
            (r.status, r.text()),
            (200, format!("\"{WORDCOUNT_ID}\"")),
            "{target}"
        );
    }
    let r = get("/redoc", "GET");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    // Not one of the reference's routes, or not a route at all: 404.
    for target in ["/healthz/", "/nothere/", "//id"] {
        assert_eq!(get(target, "GET").status, 404, "{target}");
    }
}

#[test]
fn a_redirect_location_is_built_as_the_reference_builds_it() {
    // Recorded from etl-uvicorn 0.1.0 (Starlette): a Host header it takes
    // as valid is kept as sent; any other, or none (HTTP/1.0), gives way
    // to the address the connection came in on. Every trailing slash goes.
    let s = Server::start(&plugin("wordcount"), &[]);
    let here = format!("http://{}", s.addr);
    for (head, location) in [
        (
            "GET /id/ HTTP/1.1\r\nHost: x:0080",
            "http://x:0080/id".to_owned(),
        ),
        (
            "GET /id/ HTTP/1.1\r\nHost: [::1]:8080",
            "http://[::1]:8080/id".into(),
        ),
        (
            "GET /id/ HTTP/1.1\r\nHost: [v1.x:y]",
            "http://[v1.x:y]/id".into(),
        ),
        (
            "GET /id/ HTTP/1.1\r\nHost: T.Example.COM",
            "http://T.Example.COM/id".into(),
        ),
        ("GET /id/// HTTP/1.1\r\nHost: t", "http://t/id".into()),
        (
            "GET /docs//?a HTTP/1.1\r\nHost: t",
            "http://t/docs?a".into(),
        ),
        ("GET /id/ HTTP/1.1\r\nHost: ", format!("{here}/id")),
        ("GET /id/ HTTP/1.1\r\nHost: a b", format!("{here}/id")),
        ("GET /id/ HTTP/1.1\r\nHost: x:65536", format!("{here}/id")),
        ("GET /id/ HTTP/1.1\r\nHost: [V1.x]", format!("{here}/id")),
        ("GET /schema/?q=1 HTTP/1.0", format!("{here}/schema?q=1")),
        (
            "GET /id/ HTTP/1.0\r\nX-Forwarded-Proto: https",
            format!("https://{}/id", s.addr),
        ),
    ] {
        let r = support::request(
            s.addr,
            format!("{head}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, 307, "{head}");
        assert_eq!(r.header("location"), Some(location.as_str()), "{head}");
    }
    let r = support::request(
        s.addr,
        b"GET // HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 404);
}

#[test]
fn a_proxy_on_this_host_names_the_scheme_of_a_redirect() {
    // Recorded from etl-uvicorn 0.1.0, whose proxy headers are on by
    // default for a peer at 127.0.0.1 or ::1: the last X-Forwarded-Proto,
    // trimmed, if it is exactly http, https, ws or wss.
    let s = Server::start(&plugin("wordcount"), &[]);
    let from = |source: [u8; 4], protos: &[&str]| {
        let mut head = String::from("GET /id/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
        for proto in protos {
            head.push_str(&format!("X-Forwarded-Proto: {proto}\r\n"));
        }
        let r = support::request_from(source.into(), s.addr, format!("{head}\r\n").as_bytes());
        assert_eq!(r.status, 307);
        r.header("location").unwrap().to_owned()
    };
    let here = [127, 0, 0, 1];
    for (protos, location) in [
        (&["https"][..], "https://t/id"),
        (&["wss"], "wss://t/id"),
        (&[" https "], "https://t/id"),
        (&["HTTPS"], "http://t/id"),
        (&["ftp"], "http://t/id"),
        (&["https", "http"], "http://t/id"),
        (&[], "http://t/id"),
    ] {
        assert_eq!(from(here, protos), location, "{protos:?}");
    }
    // Another address, even on loopback, is not a proxy it trusts.
    assert_eq!(from([127, 0, 0, 2], &["https"]), "http://t/id");
}

#[test]
fn trusted_proxies_name_the_client_and_the_scheme_as_uvicorn_lets_them() {
    // uvicorn trusts the proxies --forwarded-allow-ips names, else
    // FORWARDED_ALLOW_IPS, else this host (127.0.0.1, ::1); none with
    // --no-proxy-headers. A trusted proxy names the scheme of a redirect,
    // and the client the access log names: the last X-Forwarded-For
    // address no trusted proxy holds (with `*`, the first). Recorded from
    // etl-uvicorn 0.1.0 with these settings.
    let forwarded = "X-Forwarded-Proto: https\r\nX-Forwarded-For: 198.51.100.1, 203.0.113.7:4711\r\nX-Forwarded-For: 10.1.2.3";
    let ask = |s: &Server, source: [u8; 4], id: &str| {
        let raw = format!(
            "GET /id/ HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Request-Id: {id}\r\n{forwarded}\r\n\r\n"
        );
        let r = support::request_from(source.into(), s.addr, raw.as_bytes());
        assert_eq!(r.status, 307, "{id}");
        let logged = format!("request_id=\"{id}\"");
        assert!(
            s.wait_for_log(&logged, Duration::from_secs(10)),
            "{}",
            s.logs()
        );
        let logs = s.logs();
        let line = logs.lines().find(|l| l.contains(&logged)).unwrap();
        let client = line
            .split_once("client=")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no client in {line}"));
        (r.header("location").unwrap().to_owned(), client)
    };
    let wordcount = plugin("wordcount");

    let default = Server::start(&wordcount, &[]);
    let (location, client) = ask(&default, [127, 0, 0, 1], "default-local");
    assert_eq!(
        (location.as_str(), client.as_str()),
        ("https://t/id", "10.1.2.3")
    );
    let (location, client) = ask(&default, [127, 0, 0, 2], "default-other");
    assert_eq!(location, "http://t/id");
    assert!(client.starts_with("127.0.0.2:"), "{client}");

    let variable = Server::start_with(
        &wordcount,
        &[],
        &[("FORWARDED_ALLOW_IPS", "127.0.0.0/8, 10.0.0.0/8")],
    )
    .unwrap();
    let (location, client) = ask(&variable, [127, 0, 0, 2], "variable");
    assert_eq!(
        (location.as_str(), client.as_str()),
        ("https://t/id", "203.0.113.7:4711")
    );

    // uvicorn's own variable for the flag wins over FORWARDED_ALLOW_IPS.
    let everyone = Server::start_with(
        &wordcount,
        &[],
        &[
            ("UVICORN_FORWARDED_ALLOW_IPS", "*"),
            ("FORWARDED_ALLOW_IPS", "10.0.0.0/8"),
        ],
    )
    .unwrap();
    let (location, client) = ask(&everyone, [127, 0, 0, 2], "everyone");
    assert_eq!(
        (location.as_str(), client.as_str()),
        ("https://t/id", "198.51.100.1")
    );

    // FORWARDED_ALLOW_IPS set empty is an empty list, not unset: uvicorn
    // reads it itself, not through click.
    let nobody = Server::start_with(&wordcount, &[], &[("FORWARDED_ALLOW_IPS", "")]).unwrap();
    let (location, client) = ask(&nobody, [127, 0, 0, 1], "nobody");
    assert_eq!(location, "http://t/id");
    assert!(client.starts_with("127.0.0.1:"), "{client}");
    assert!(
        !nobody.logs().contains("--forwarded-allow-ips:"),
        "{}",
        nobody.logs()
    );

    let off = Server::start_with(&wordcount, &[], &[("UVICORN_PROXY_HEADERS", "false")]).unwrap();
    let (location, client) = ask(&off, [127, 0, 0, 1], "off");
    assert_eq!(location, "http://t/id");
    assert!(client.starts_with("127.0.0.1:"), "{client}");

    // An address with host bits set is no network (uvicorn then trusts
    // nobody, without a word): said at startup.
    let typo = Server::start(&wordcount, &["--forwarded-allow-ips", "127.0.0.1/8"]);
    assert!(
        typo.wait_for_log(
            "--forwarded-allow-ips: `127.0.0.1/8` is neither an IP address nor a network",
            Duration::from_secs(10)
        ),
        "{}",
        typo.logs()
    );
    let (location, _) = ask(&typo, [127, 0, 0, 1], "typo");
    assert_eq!(location, "http://t/id");
}

#[test]
fn head_and_allow_are_answered_as_the_reference_answers_them() {
    // Recorded from etl-uvicorn 0.1.0: its OpenAPI document and pages take
    // HEAD (and name it in `allow`); the plugin's routes take one method.
    let s = Server::start(&plugin("wordcount"), &[]);
    let send = |method: &str, target: &str| {
        let mut stream = std::net::TcpStream::connect(s.addr).unwrap();
        write!(
            stream,
            "{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let (status, headers) = support::read_head(&mut reader).unwrap();
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut rest).unwrap();
        (status, headers, rest)
    };
    for target in ["/openapi.json", "/docs", "/redoc"] {
        let whole = s.get(target);
        let (status, headers, rest) = send("HEAD", target);
        assert_eq!(status, 200, "HEAD {target}");
        assert!(rest.is_empty(), "HEAD {target} sent a body");
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            whole.header("content-type"),
            "HEAD {target}"
        );
        assert_eq!(
            headers.get("content-length"),
            Some(&whole.body.len().to_string()),
            "HEAD {target}"
        );
    }
    let (status, headers, rest) = send("HEAD", "/docs/");
    assert_eq!(status, 307);
    assert_eq!(headers["location"], "http://t/docs");
    assert_eq!(headers["content-length"], "0");
    assert!(rest.is_empty());
    for (method, target, allow) in [
        ("DELETE", "/openapi.json", "GET, HEAD"),
        ("POST", "/docs", "GET, HEAD"),
        ("PUT", "/redoc", "GET, HEAD"),
        ("HEAD", "/schema", "GET"),
        ("HEAD", "/id", "GET"),
        ("HEAD", "/metadata", "GET"),
        ("HEAD", "/precheck", "GET"),
        ("HEAD", "/", "GET"),
        ("HEAD", "/invoke", "POST"),
    ] {
        let (status, headers, rest) = send(method, target);
        assert_eq!(status, 405, "{method} {target}");
        assert_eq!(headers["allow"], allow, "{method} {target}");
        let body: &[u8] = if method == "HEAD" {
            b""
        } else {
            br#"{"detail":"Method Not Allowed"}"#
        };
        assert_eq!(rest, body, "{method} {target}");
    }
    // A deliberate difference (docs/operations.md): there is no Swagger UI,
    // so no page for its OAuth2 sign-in to come back to.
    assert_eq!(send("GET", "/docs/oauth2-redirect").0, 404);
}

#[test]
fn an_optional_field_reports_its_own_type_error() {
    // Recorded from etl-uvicorn 0.1.0 for `fail_at: Optional[int] = None`
    // (`anyOf: [integer, null]`): pydantic reports the integer's own error,
    // not the union's.
    let s = Server::start(&plugin("ticker"), &[]);
    for (value, answer) in [
        (
            "2.5",
            r#"{"detail":[{"type":"int_from_float","loc":["body","fail_at"],"msg":"Input should be a valid integer, got a number with a fractional part","input":2.5}]}"#,
        ),
        (
            r#""x""#,
            r#"{"detail":[{"type":"int_parsing","loc":["body","fail_at"],"msg":"Input should be a valid integer, unable to parse string as an integer","input":"x"}]}"#,
        ),
        (
            "[1]",
            r#"{"detail":[{"type":"int_type","loc":["body","fail_at"],"msg":"Input should be a valid integer","input":[1]}]}"#,
        ),
    ] {
        let r = s.post_json("/invoke", &format!(r#"{{"count":1,"fail_at":{value}}}"#));
        assert_eq!(r.status, 422);
        assert_eq!(r.text(), answer, "{value}");
    }
    // null, and "3" in lax mode, are accepted.
    for value in ["null", r#""3""#] {
        let r = s.post_json("/invoke", &format!(r#"{{"count":1,"fail_at":{value}}}"#));
        assert_eq!(r.status, 200, "{value}: {}", r.text());
    }
}
