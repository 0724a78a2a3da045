//! The same requests to etl-uvicorn 0.1.0 and to etl-serve, compared byte
//! for byte: status, content type and body. The reference serves the
//! Python `wordcount` of bench/reference/; etl-serve serves the C
//! wordcount, which declares the reference's schema text, and then the
//! Rust one, whose schema the SDK derives. The reference
//! is installed by `scripts/reference-venv` (python3 with venv, and PyPI).
//!
//! What differs on purpose is listed in [`DELIBERATE`], with its reason,
//! and in docs/operations.md ("Where etl-serve answers differently").

use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{fixture, plugin, reference_venv, serve_python, Server};

/// Requests whose answers differ on purpose, for which of etl-serve's
/// plugins, and why.
const DELIBERATE: &[(&str, &[&str], &str)] = &[
    (
        "POST /invoke NaN",
        &["wordcount_c", "wordcount", "etl_python"],
        "the reference answers a plain-text 500 (its JSON encoder fails on NaN); etl-serve answers the Invalid JSON body 422",
    ),
    (
        "POST /invoke big integer",
        &["wordcount_c", "wordcount"],
        "both hosts hand the plugin the exact integer; the reference's Python function computes with it, the C and Rust wordcounts cannot hold it in 64 bits (through the Python bridge, the same Python function does)",
    ),
    (
        "POST /invoke lone surrogate",
        &["wordcount_c", "wordcount", "etl_python"],
        "a lone surrogate escape is not text a plugin can be handed (RFC 8259 section 8.2); the reference answers a plain-text 500, etl-serve the Invalid JSON body 422",
    ),
    (
        "POST /invoke nested 1000 deep",
        &["wordcount_c", "wordcount", "etl_python"],
        "the reference's parser stops at Python's recursion limit less its own frames (962 levels with Python 3.11); etl-serve parses up to 1000 levels, so every body the reference parses",
    ),
    (
        "POST /invoke lone surrogate in an unknown field",
        &["wordcount_c", "wordcount", "etl_python"],
        "etl-serve refuses a lone surrogate anywhere in a body, the same wherever it is; the reference drops the unknown field unread and serves",
    ),
    (
        "POST /invoke timeout header not whole milliseconds",
        &["wordcount_c", "wordcount", "etl_python"],
        "etl-serve hands the plugin the caller's deadline and refuses one it cannot read with a 400; the reference has no such header and serves",
    ),
];

/// etl-uvicorn serving `wordcount`, stopped when dropped.
struct Reference {
    child: Child,
    addr: SocketAddr,
}

impl Reference {
    fn start() -> Reference {
        Reference::serving("etl_bench_plugins:wordcount", "bench/reference")
    }

    /// etl-uvicorn serving `app` (with its options), importable from `dir`
    /// (of the workspace).
    fn serving(app: &str, dir: &str) -> Reference {
        Reference::serving_with(app, dir, &[])
    }

    /// As [`Reference::serving`], with these environment variables.
    fn serving_with(app: &str, dir: &str, vars: &[(&str, &str)]) -> Reference {
        Reference::spawn(app, dir, vars, None)
    }

    /// As [`Reference::serving_with`]; when `access_log` is given, with the
    /// access log on and written there.
    fn spawn(app: &str, dir: &str, vars: &[(&str, &str)], access_log: Option<&Path>) -> Reference {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = reference_venv();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(venv.join("bin/etl-uvicorn"))
            .args(app.split_whitespace())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(match access_log {
                Some(_) => &["--log-level", "info"][..],
                None => &["--log-level", "warning", "--no-access-log"],
            })
            .env("PYTHONPATH", workspace.join(dir))
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(match access_log {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            })
            .stderr(Stdio::null())
            .spawn()
            .expect("start etl-uvicorn");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut reference = Reference { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            assert!(
                reference.child.try_wait().unwrap().is_none(),
                "etl-uvicorn exited"
            );
            assert!(Instant::now() < deadline, "etl-uvicorn never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        reference
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request: a name for the report, the method and target, the content
/// type, header lines besides those (each ending in CRLF), and the body.
struct Case {
    name: String,
    method: &'static str,
    target: &'static str,
    content_type: Option<&'static str>,
    headers: &'static str,
    body: Vec<u8>,
}

fn invoke(name: &str, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Case {
    Case {
        name: format!("POST /invoke {name}"),
        method: "POST",
        target: "/invoke",
        content_type,
        headers: "",
        body: body.into(),
    }
}

fn get(target: &'static str) -> Case {
    Case {
        name: format!("GET {target}"),
        method: "GET",
        target,
        content_type: None,
        headers: "",
        body: Vec::new(),
    }
}

fn head(target: &'static str) -> Case {
    Case {
        name: format!("HEAD {target}"),
        method: "HEAD",
        ..get(target)
    }
}

fn cases() -> Vec<Case> {
    let json = Some("application/json");
    let text = r#"{"text":"héllo big wörld"}"#;
    let utf16le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut cases = vec![
        // Valid bodies.
        invoke("plain", json, r#"{"text":"hello big world"}"#),
        invoke("repeat", json, r#"{"text":"a b","repeat":3}"#),
        invoke("non-ASCII", json, text),
        invoke("empty text", json, r#"{"text":""}"#),
        invoke("unknown field", json, r#"{"text":"a","extra":[1,{"b":2}]}"#),
        invoke("lax integer string", json, r#"{"text":"a","repeat":"2"}"#),
        invoke("whole float", json, r#"{"text":"a","repeat":2.0}"#),
        invoke(
            "charset",
            Some("application/json; charset=utf-8"),
            r#"{"text":"a"}"#,
        ),
        // Every family of bad input.
        invoke("string for text", json, r#"{"text":5}"#),
        invoke("two errors", json, r#"{"text":5,"repeat":"x"}"#),
        invoke("missing and fractional", json, r#"{"repeat":2.5}"#),
        invoke("empty object", json, "{}"),
        invoke("array", json, "[1,2]"),
        invoke("string", json, r#""a""#),
        invoke("null", json, "null"),
        invoke("no body", json, ""),
        invoke("malformed", json, "{"),
        invoke("not JSON", Some("text/plain"), "hello"),
        invoke("JSON as text/plain", Some("text/plain"), r#"{"text":"a"}"#),
        invoke("no content type", None, r#"{"text":"a"}"#),
        invoke("control character", json, "{\"text\":\"\u{1}\"}"),
        // Numbers, as pydantic's lax mode reads them.
        invoke(
            "whole float past 64 bits",
            json,
            r#"{"text":"a","repeat":1e20}"#,
        ),
        invoke(
            "negative past 64 bits",
            json,
            r#"{"text":"a","repeat":-1e30}"#,
        ),
        invoke("whole float in range", json, r#"{"text":"a","repeat":1e3}"#),
        invoke("underscores", json, r#"{"text":"a","repeat":"1_000"}"#),
        invoke(
            "zero fraction string",
            json,
            r#"{"text":"a","repeat":"3.0"}"#,
        ),
        invoke("fraction string", json, r#"{"text":"a","repeat":"3.5"}"#),
        invoke("exponent string", json, r#"{"text":"a","repeat":"1e3"}"#),
        invoke("errors in field order", json, r#"{"repeat":1e20,"text":5}"#),
        // Encodings.
        invoke(
            "UTF-8 BOM",
            json,
            [&[0xEF, 0xBB, 0xBF][..], text.as_bytes()].concat(),
        ),
        invoke("UTF-16LE", json, utf16le.clone()),
        invoke("UTF-16 BOM", json, [&[0xFF, 0xFE][..], &utf16le].concat()),
        invoke("not UTF-8", json, &b"{\"text\":\"caf\xe9\"}"[..]),
        // The reserved fields: never inputs, checked before the inputs.
        invoke(
            "plaintext settings",
            json,
            r#"{"text":"a b","invocation_settings":{"key":"v"}}"#,
        ),
        invoke(
            "null settings",
            json,
            r#"{"text":"a","invocation_settings":null}"#,
        ),
        invoke(
            "array settings",
            json,
            r#"{"text":"a","invocation_settings":[1]}"#,
        ),
        invoke(
            "bare sealed envelope",
            json,
            r#"{"text":"a","invocation_settings":{"format":"u10d.invocation-settings.v1"}}"#,
        ),
        invoke(
            "dag member of another format",
            json,
            r#"{"text":"a","invocation_settings":{"dag_node_settings":{"format":"v9"}}}"#,
        ),
        invoke(
            "settings document without sealed fields",
            json,
            r#"{"text":"a","invocation_settings":{"dag_node_settings":{"format":"u10d.invocation-settings.v2","settings":{"k":1}}}}"#,
        ),
        invoke(
            "settings error before input error",
            json,
            r#"{"text":5,"invocation_settings":null}"#,
        ),
        invoke(
            "context",
            json,
            r#"{"text":"a","invocation_context":{"tenant_id":"t","attempt":"3","x":1}}"#,
        ),
        invoke(
            "context of the wrong type",
            json,
            r#"{"text":"a","invocation_context":[]}"#,
        ),
        invoke(
            "context field of the wrong type",
            json,
            r#"{"text":"a","invocation_context":{"tenant_id":5}}"#,
        ),
        invoke(
            "context version unknown",
            json,
            r#"{"text":"a","invocation_context":{"schema_version":"2"}}"#,
        ),
        invoke(
            "context version not a string",
            json,
            r#"{"text":"a","invocation_context":{"schema_version":1}}"#,
        ),
        invoke(
            "context batch lists unaligned",
            json,
            r#"{"text":"a","invocation_context":{"record_ids":["r"],"invocation_ids":[]}}"#,
        ),
        invoke(
            "settings error under text/plain",
            Some("text/plain"),
            r#"{"text":"a","invocation_settings":null}"#,
        ),
        invoke(
            "settings error before context error",
            json,
            r#"{"text":"a","invocation_settings":1,"invocation_context":1}"#,
        ),
        // Nesting, within and past what the reference's parser takes
        // (Python's recursion limit).
        invoke("nested 500 deep", json, nested_in("extra", 499)),
        invoke("input nested 300 deep", json, nested_in("text", 299)),
        invoke("nested 2000 deep", json, nested_in("extra", 1999)),
        // Routes.
        get("/metadata"),
        get("/schema"),
        get("/id"),
        get("/id?x=1"),
        get("/%69d"),
        get("/schema/"),
        get("/id/?x=1"),
        get("/nothere"),
        get("/invoke"),
        // HEAD, where the reference takes it and where it does not.
        head("/openapi.json"),
        head("/docs"),
        head("/redoc"),
        head("/docs/"),
        head("/schema"),
        head("/invoke"),
        Case {
            name: "DELETE /openapi.json".into(),
            method: "DELETE",
            target: "/openapi.json",
            content_type: None,
            headers: "",
            body: Vec::new(),
        },
        Case {
            name: "POST /id".into(),
            method: "POST",
            target: "/id",
            content_type: None,
            headers: "",
            body: Vec::new(),
        },
        Case {
            name: "POST /invoke/".into(),
            method: "POST",
            target: "/invoke/",
            content_type: json,
            headers: "",
            body: br#"{"text":"a"}"#.to_vec(),
        },
    ];
    // The deliberate differences are sent too, so that a change on either
    // side shows.
    cases.push(invoke("NaN", json, r#"{"text":"a","repeat":NaN}"#));
    cases.push(invoke(
        "big integer",
        json,
        r#"{"text":"a","repeat":1000000000000000000000000000000}"#,
    ));
    cases.push(invoke("lone surrogate", json, r#"{"text":"a\ud800"}"#));
    cases.push(invoke("nested 1000 deep", json, nested_in("extra", 999)));
    cases.push(invoke(
        "lone surrogate in an unknown field",
        json,
        r#"{"text":"a","extra":"\ud800"}"#,
    ));
    cases.push(Case {
        name: "POST /invoke timeout header not whole milliseconds".into(),
        headers: "X-ETL-Timeout-Ms: 1.5\r\n",
        ..invoke("", json, r#"{"text":"a"}"#)
    });
    cases
}

/// A body whose `field` is `levels` arrays, one in the other.
fn nested_in(field: &str, levels: usize) -> String {
    let (open, close) = ("[".repeat(levels), "]".repeat(levels));
    if field == "text" {
        format!(r#"{{"text":{open}{close}}}"#)
    } else {
        format!(r#"{{"text":"a","{field}":{open}{close}}}"#)
    }
}

/// What is compared of an answer.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    allow: Option<String>,
    body: Vec<u8>,
}

/// What `addr` answers to `case`.
fn answer(addr: SocketAddr, case: &Case) -> Answer {
    let mut raw = format!(
        "{} {} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        case.method,
        case.target,
        case.body.len()
    );
    if let Some(ct) = case.content_type {
        raw.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    raw.push_str(case.headers);
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(&case.body);
    let r = if case.method == "HEAD" {
        // The head alone: the body its length announces is not sent.
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(&raw).unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let (status, headers) = support::read_head(&mut reader).unwrap();
        let mut body = Vec::new();
        reader.read_to_end(&mut body).unwrap();
        support::Response {
            status,
            headers,
            body,
        }
    } else {
        support::request(addr, &raw)
    };
    Answer {
        status: r.status,
        content_type: r.header("content-type").map(str::to_owned),
        // The reference lists the methods in a Python set's order, which
        // changes from run to run.
        allow: r.header("allow").map(|allow| {
            let mut methods: Vec<&str> = allow.split(", ").collect();
            methods.sort_unstable();
            methods.join(", ")
        }),
        body: r.body,
    }
}

#[test]
fn the_reference_and_etl_serve_answer_the_same_bytes() {
    let reference = Reference::start();
    // The C and the Rust wordcount both declare the reference's schema;
    // the Python bridge serves the reference's own Python function.
    for name in ["wordcount_c", "wordcount", "etl_python"] {
        compare(&reference, name);
    }
}

/// etl-serve serving `name` (for `etl_python`: the reference's Python
/// wordcount, from the reference's virtualenv).
fn serve(name: &str) -> Server {
    if name != "etl_python" {
        return Server::start(&plugin(name), &[]);
    }
    serve_python("etl_bench_plugins:wordcount", "bench/reference")
}

/// Sends every case to the reference and to etl-serve serving `name`.
fn compare(reference: &Reference, name: &str) {
    let ours = serve(name);
    let deliberate_here: Vec<&str> = DELIBERATE
        .iter()
        .filter(|(_, plugins, _)| plugins.contains(&name))
        .map(|(case, _, _)| *case)
        .collect();
    let mut differences = Vec::new();
    let mut deliberate_seen = Vec::new();
    for case in cases() {
        let theirs = answer(reference.addr, &case);
        let mine = answer(ours.addr, &case);
        let deliberate = deliberate_here.iter().find(|c| **c == case.name);
        match (theirs == mine, deliberate) {
            (true, None) => {}
            (false, Some(case)) => deliberate_seen.push(*case),
            (true, Some(case)) => differences.push(format!(
                "{name}, {case}: listed as a deliberate difference, but both answer {}",
                String::from_utf8_lossy(&mine.body)
            )),
            (false, None) => differences.push(format!(
                "{name}, {}:\n  etl-uvicorn: {} {:?} allow {:?} {}\n  etl-serve:   {} {:?} allow {:?} {}",
                case.name,
                theirs.status,
                theirs.content_type,
                theirs.allow,
                String::from_utf8_lossy(&theirs.body),
                mine.status,
                mine.content_type,
                mine.allow,
                String::from_utf8_lossy(&mine.body)
            )),
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert_eq!(deliberate_seen, deliberate_here, "{name}");
}

#[test]
fn the_openapi_document_passes_an_openapi_validator() {
    // openapi-spec-validator, from the reference's virtualenv, on the
    // document of a plain, a streaming and a C plugin.
    let python = reference_venv().join("bin/python");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (name, path) in [
        ("wordcount", plugin("wordcount")),
        ("ticker", plugin("ticker")),
        ("wordcount_c", plugin("wordcount_c")),
        ("faulty-streaming", fixture(Some("STREAMING"))),
    ] {
        let s = Server::start(&path, &[]);
        let doc = dir.join(format!("openapi-{name}.json"));
        std::fs::write(&doc, s.get("/openapi.json").body).unwrap();
        let out = Command::new(&python)
            .args([
                "-c",
                "import json, sys\nfrom openapi_spec_validator import validate\nvalidate(json.load(open(sys.argv[1])))",
            ])
            .arg(&doc)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn python_failures_are_classified_as_the_reference_classifies_them() {
    let app = "etl_failures:fail";
    let reference = Reference::serving(app, "tests/fixtures/python");
    let ours = serve_python(app, "tests/fixtures/python");
    let json = Some("application/json");
    let cases = [
        get("/schema"),
        get("/id"),
        invoke("success", json, r#"{"kind":"none","n":3}"#),
        invoke("exception", json, r#"{"kind":"value"}"#),
        invoke("status and category", json, r#"{"kind":"detailed"}"#),
        invoke("HTTPException", json, r#"{"kind":"http"}"#),
        invoke("user error", json, r#"{"kind":"user"}"#),
        invoke("invalid input", json, r#"{"kind":5}"#),
    ];
    assert_same_answers(&reference, &ours, &cases, app);
}

/// Sends each case to both servers and asserts the same status, content
/// type, `allow` and body bytes (the body compared first, as the most telling).
fn assert_same_answers(reference: &Reference, ours: &Server, cases: &[Case], label: &str) {
    for case in cases {
        let (theirs, mine) = (answer(reference.addr, case), answer(ours.addr, case));
        assert_eq!(
            String::from_utf8_lossy(&mine.body),
            String::from_utf8_lossy(&theirs.body),
            "{label}: {}",
            case.name
        );
        assert_eq!(
            (mine.status, mine.content_type, mine.allow),
            (theirs.status, theirs.content_type, theirs.allow),
            "{label}: {}",
            case.name
        );
    }
}

#[test]
fn python_generators_stream_as_the_reference_streams_them() {
    let dir = "tests/fixtures/python";
    let json = Some("application/json");
    let cases = [
        get("/schema"),
        get("/id"),
        invoke("two items", json, r#"{"n":2}"#),
        invoke("fails after one", json, r#"{"n":3,"fail_at":1}"#),
        invoke("fails at once", json, r#"{"n":3,"fail_at":0}"#),
        invoke("no items", json, r#"{"n":0}"#),
        invoke("bad input", json, r#"{"n":"many"}"#),
    ];
    let reference = Reference::serving("etl_stream:agen", dir);
    let ours = serve_python("etl_stream:agen", dir);
    assert_same_answers(&reference, &ours, &cases, "etl_stream:agen");
    for app in ["etl_stream:agen_http", "etl_stream:agen_file"] {
        let file = r#"{"file_data":{"identifier":"doc-1","connector_type":"local","source_identifiers":{"filename":"a.txt","fullpath":"/a.txt"}}}"#;
        let cases = [invoke("streamed", json, file), invoke("empty", json, "{}")];
        let reference = Reference::serving(app, dir);
        assert_same_answers(&reference, &serve_python(app, dir), &cases, app);
    }
    // An item pydantic cannot serialize ends the stream with the
    // reference's failure line.
    let app = "etl_stream:agen_deep";
    let cases = [256, 257].map(|n| invoke("deep", json, format!(r#"{{"levels":{n}}}"#)));
    let reference_deep = Reference::serving(app, dir);
    assert_same_answers(&reference_deep, &serve_python(app, dir), &cases, app);
    // A sync generator: the reference 0.1.0 answers a 500 naming the
    // generator object's address; etl-serve streams it as the reference
    // streams the async one (docs/operations.md lists the difference).
    let sync = serve_python("etl_stream:gen", dir);
    for case in &cases[2..] {
        let (theirs, mine) = (answer(reference.addr, case), answer(sync.addr, case));
        assert_eq!(mine, theirs, "the sync generator, {}", case.name);
    }
}

#[test]
fn python_file_data_comes_back_in_the_envelope_as_the_reference_sends_it() {
    let dir = "tests/fixtures/python";
    let json = Some("application/json");
    let file = r#"{"identifier":"doc-1","connector_type":"local","source_identifiers":{"filename":"a.txt","fullpath":"/a.txt"},"additional_metadata":{"k":1}}"#;
    let with = |extra: &str| format!(r#"{{"file_data":{file}{extra}}}"#);
    let cases = [
        get("/schema"),
        invoke("changed", json, with("")),
        invoke("changed, then a failure", json, with(r#","fail":true"#)),
        invoke("no file_data", json, "{}"),
        invoke("a bad file_data", json, r#"{"file_data":{"identifier":1}}"#),
    ];
    for app in [
        "etl_stream:touch",
        "etl_stream:maybe",
        "etl_stream:wrong_output",
        "etl_stream:split",
    ] {
        let reference = Reference::serving(app, dir);
        assert_same_answers(&reference, &serve_python(app, dir), &cases, app);
    }
    // A BatchFileData.
    let batch = r#"{"file_data":{"identifier":"b-1","connector_type":"local","source_identifiers":{"filename":"a","fullpath":"/a"},"metadata":{},"additional_metadata":{},"batch_items":[{"identifier":"x"},{"identifier":"y","version":"2"}]}}"#;
    let cases = [
        get("/schema"),
        invoke("a batch", json, batch),
        invoke("a bad batch", json, r#"{"file_data":{"batch_items":"x"}}"#),
    ];
    let reference = Reference::serving("etl_stream:batch", dir);
    let ours = serve_python("etl_stream:batch", dir);
    assert_same_answers(&reference, &ours, &cases, "etl_stream:batch");
}

#[test]
fn python_types_make_the_reference_schema_id_and_422s() {
    let dir = "tests/fixtures/python";
    let json = Some("application/json");
    let families: &[(&str, &[&str])] = &[
        (
            "etl_types:models",
            &[
                r#"{"outer":{"inner":{"name":"a","tags":["x"]},"count":2}}"#,
                r#"{"outer":{"inner":{"name":"a"}},"extra":{"name":"e","tags":["1","2"]}}"#,
                r#"{"outer":{"inner":{"tags":"no"},"count":"x","ratio":"half"}}"#,
                r#"{"outer":{"inner":{"name":"a"},"ratio":"0.5"}}"#,
                "{}",
            ],
        ),
        (
            "etl_types:dataclasses",
            &[
                r#"{"point":{"x":1,"y":2}}"#,
                r#"{"point":{"x":"a"}}"#,
                r#"{"point":{}}"#,
            ],
        ),
        (
            "etl_types:typed_dict",
            &[
                r#"{"sides":3}"#,
                r#"{"sides":3,"label":"tri"}"#,
                r#"{"sides":"three"}"#,
            ],
        ),
        (
            "etl_types:unions",
            &[
                r#"{"value":1}"#,
                r#"{"value":"a"}"#,
                r#"{"value":1.5}"#,
                r#"{"value":[1]}"#,
                r#"{"value":2,"maybe":"yes"}"#,
            ],
        ),
        (
            "etl_types:paths",
            &[
                r#"{"path":"/a/b.txt"}"#,
                r#"{"path":"/a/b.txt","suffix":".md"}"#,
                r#"{"path":3}"#,
            ],
        ),
        (
            "etl_types:anything",
            &[r#"{"value":{"a":[1]}}"#, r#"{"value":null}"#, "{}"],
        ),
        (
            "etl_types:counter --method-name run",
            &[r#"{"n":2}"#, r#"{"n":"two"}"#],
        ),
    ];
    for (app, bodies) in families {
        let mut cases = vec![get("/schema"), get("/id")];
        cases.extend(bodies.iter().map(|b| invoke(b, json, *b)));
        let reference = Reference::serving(app, dir);
        assert_same_answers(&reference, &serve_python(app, dir), &cases, app);
    }
    // Every form of --plugin-id: a value, a function, a lambda, a class
    // and its method.
    for form in [
        "etl_types:PLUGIN_ID",
        "etl_types:plugin_id",
        "etl_types:plugin_id_lambda",
        "etl_types:Counter --plugin-id-method the_id",
    ] {
        let app = format!("etl_types:unions --plugin-id {form}");
        let cases = [get("/id"), get("/metadata")];
        let reference = Reference::serving(&app, dir);
        assert_same_answers(&reference, &serve_python(&app, dir), &cases, &app);
    }
}

#[test]
fn python_options_from_etl_uvicorns_variables_work_as_in_the_reference() {
    // etl-uvicorn reads every option it is not given from its UVICORN_
    // variable (click's prefix), the APP included; a pod spec may set them.
    let dir = "tests/fixtures/python";
    let vars = [
        ("UVICORN_APP", "etl_types:counter"),
        ("UVICORN_METHOD_NAME", "run"),
        ("UVICORN_PLUGIN_ID", "etl_types:PLUGIN_ID"),
        ("UVICORN_SEALED_DAG_NODE_SETTINGS_V2", "y"),
    ];
    let reference = Reference::serving_with("", dir, &vars);
    let venv = reference_venv();
    let pythonpath = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut env = vec![
        ("VIRTUAL_ENV", venv.to_str().unwrap()),
        ("PYTHONPATH", pythonpath.to_str().unwrap()),
    ];
    env.extend(vars);
    let ours = Server::start_with(&plugin("etl_python"), &[], &env)
        .unwrap_or_else(|f| panic!("etl-serve with the Python bridge did not start: {f:?}"));
    let json = Some("application/json");
    let cases = [
        get("/id"),
        get("/metadata"),
        get("/schema"),
        invoke("n", json, r#"{"n":2}"#),
    ];
    assert_same_answers(&reference, &ours, &cases, "UVICORN_ variables");
    // Not the defaults: each variable was read.
    let metadata = String::from_utf8(answer(ours.addr, &get("/metadata")).body).unwrap();
    assert!(
        metadata.contains(r#""identifier":"fixed_plugin_id""#)
            && metadata.contains("invoke_with_sealed_dag_node_settings_v2"),
        "{metadata}"
    );
    let output = answer(ours.addr, &invoke("n", json, r#"{"n":2}"#)).body;
    assert!(
        String::from_utf8(output).unwrap().contains(r#""x":20"#),
        "the method named by UVICORN_METHOD_NAME ran"
    );
    // None of them is reported as unread.
    assert!(!ours.logs().contains("does not read it"), "{}", ours.logs());

    // A value etl-uvicorn would refuse, and no APP at all, stop the start
    // with one line naming what is wrong.
    for (vars, says) in [
        (
            &[
                ("UVICORN_APP", "etl_types:counter"),
                ("UVICORN_SEALED_DAG_NODE_SETTINGS_V2", "maybe"),
            ][..],
            "UVICORN_SEALED_DAG_NODE_SETTINGS_V2: `maybe` is not a boolean",
        ),
        (&[], "--plugin-config (or UVICORN_APP) must name the APP"),
    ] {
        let out = support::etl_serve()
            .arg("--plugin")
            .arg(plugin("etl_python"))
            .args(["--port", "0"])
            .env("VIRTUAL_ENV", &venv)
            .env("PYTHONPATH", &pythonpath)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(65), "{stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("etl-serve: error:"))
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(line.contains(says), "{line}");
    }
}

/// Through the Python bridge, what the reference's serializer cannot
/// write: a value nested past 256 levels, either in the copy of a request
/// it makes for its debug log (made whatever the log level) or in an
/// output, and an output holding a value JSON has no form for. The
/// reference answers a plain-text 500. etl-serve serves such an input, and
/// answers such an output with a failure envelope that names the cause, as
/// the reference does for such an item in a stream (held in
/// `python_generators_stream_as_the_reference_streams_them`; see
/// docs/operations.md, "Where etl-serve answers differently").
#[test]
fn python_values_the_reference_cannot_serialize_get_whole_answers() {
    let dir = "tests/fixtures/python";
    let json = Some("application/json");
    let objects = |levels: usize| {
        let (open, close) = (r#"{"a":"#.repeat(levels - 1), "}".repeat(levels - 1));
        format!("{open}{{}}{close}")
    };
    let crash = Answer {
        status: 500,
        content_type: Some("text/plain; charset=utf-8".to_owned()),
        allow: None,
        body: b"Internal Server Error".to_vec(),
    };

    let app = "etl_types:depth";
    let (reference, ours) = (Reference::serving(app, dir), serve_python(app, dir));
    let input = |levels| invoke("", json, format!(r#"{{"value":{}}}"#, objects(levels)));
    assert_same_answers(&reference, &ours, &[input(256)], app);
    for levels in [257, 961] {
        assert_eq!(answer(reference.addr, &input(levels)), crash, "{levels}");
        let Answer { status, body, .. } = answer(ours.addr, &input(levels));
        let body = String::from_utf8_lossy(&body);
        let levels_out = format!(r#""output":{{"levels":{levels}}}"#);
        assert_eq!(status, 200, "{levels}: {body}");
        assert!(
            body.contains(r#""status_code":200,"#) && body.contains(&levels_out),
            "{levels}: {body}"
        );
    }

    // Each app, a body both hosts still answer alike (if any), a body whose
    // output cannot be written, and pydantic's reason.
    let unwritable = [
        (
            "etl_types:nest",
            Some(r#"{"levels":256}"#),
            r#"{"levels":257}"#,
            "Maximum serialization depth exceeded",
        ),
        (
            "etl_types:opaque",
            None,
            "{}",
            "Unable to serialize unknown type: <class 'object'>",
        ),
    ];
    for (app, agreed, body, why) in unwritable {
        let (reference, ours) = (Reference::serving(app, dir), serve_python(app, dir));
        if let Some(agreed) = agreed {
            assert_same_answers(&reference, &ours, &[invoke("", json, agreed)], app);
        }
        let case = invoke("", json, body);
        assert_eq!(answer(reference.addr, &case), crash, "{app}");
        let Answer { status, body, .. } = answer(ours.addr, &case);
        let body = String::from_utf8_lossy(&body);
        let text = r#""status_code_text":"[PydanticSerializationError] "#;
        assert_eq!(status, 200, "{app}: {body}");
        assert!(
            body.contains(r#""status_code":500,"#)
                && body.contains(text)
                && body.contains(why)
                && body.contains(r#""output":null"#),
            "{app}: {body}"
        );
    }
}

#[test]
fn a_python_plugin_that_cannot_be_loaded_is_refused_with_its_traceback() {
    let venv = reference_venv();
    let refuse = |config: &str| {
        let out = support::etl_serve()
            .arg("--plugin")
            .arg(plugin("etl_python"))
            .args(["--port", "0", "--plugin-config", config])
            .env("VIRTUAL_ENV", &venv)
            .env(
                "PYTHONPATH",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python"),
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(65), "{config}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let log = refuse("no_such_module:count");
    assert!(
        // etl-uvicorn's importer words it so too.
        log.contains("the plugin's init failed: cannot load no_such_module:count: ImportFromStringError: Could not import module \"no_such_module\"."),
        "{log}"
    );
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(!log.contains("listening"));
    // An exception at import: its message on the one line, whole in the
    // traceback.
    let log = refuse("etl_broken:f");
    let line = log
        .lines()
        .find(|l| l.starts_with("etl-serve: error:"))
        .unwrap();
    assert!(
        line.ends_with("cannot load etl_broken:f: RuntimeError: no model file looked in /models"),
        "{line}"
    );
    assert!(
        log.contains("RuntimeError: no model file\nlooked in /models"),
        "{log}"
    );
    // A signature the reference refuses, for its reason.
    let log = refuse("etl_types:splat");
    assert!(
        log.contains("function has variable positional arguments, which are not allowed: *args"),
        "{log}"
    );
    // A missing attribute, and one that is not a function: the
    // reference's own words.
    let log = refuse("etl_types:no_such_attr");
    assert!(
        log.contains(
            r#"ImportFromStringError: Attribute "no_such_attr" not found in module "etl_types"."#
        ),
        "{log}"
    );
    // A bound method named as module:obj.method: uvicorn's importer finds
    // it, and the reference refuses it (a method is not a type it serves;
    // --method-name is the way), in these words.
    let log = refuse("etl_types:counter.run");
    assert!(
        log.contains("ValueError: type of instance not recognized: <class 'method'>"),
        "{log}"
    );
    let log = refuse("etl_types:PLUGIN_ID");
    assert!(
        log.contains("ValueError: type of instance not recognized: <class 'str'>"),
        "{log}"
    );
    let log = refuse("m:f --reload");
    assert!(
        log.contains("--plugin-config: unknown or not yet supported option `--reload`"),
        "{log}"
    );
}

#[test]
fn python_reserved_fields_and_precheck_apps_work_as_in_the_reference() {
    let dir = "tests/fixtures/python";
    let json = Some("application/json");
    let with_context = r#"{"invocation_settings":{"token":"t-1"},"invocation_context":{"tenant_id":"acme","attempt":"2"}}"#;
    let cases = [
        get("/metadata"),
        get("/precheck"),
        invoke("reserved fields bound", json, with_context),
        invoke("none sent", json, "{}"),
        invoke("no body", json, ""),
    ];
    for app in [
        "etl_settings:show --precheck-app etl_settings:ready --sealed-dag-node-settings-v2",
        "etl_settings:show --precheck-app etl_settings:not_ready",
        "etl_settings:show_async",
    ] {
        let reference = Reference::serving(app, dir);
        let ours = serve_python(app, dir);
        assert_same_answers(&reference, &ours, &cases, app);
    }
}

/// Host headers near the edges of the grammar Starlette takes for a
/// redirect's location (its host pattern, Python's IPv6 parser, the port
/// bound): handwritten ones, then generated ones, the same on every run.
fn hosts_to_redirect_with() -> Vec<String> {
    let mut hosts: Vec<String> = [
        "[::]",
        "[::1]",
        "[1:2:3:4:5:6:7:8]",
        "[1:2:3:4:5:6:7::]",
        "[::1:2:3:4:5:6:7]",
        "[1:2:3:4:5:6:7:8:9]",
        "[1::2::3]",
        "[:::]",
        "[1:]",
        "[::ffff:1.2.3.4]",
        "[::1.2.3.4]",
        "[1:2:3:4:5:6:1.2.3.4]",
        "[1:2:3:4:5:6:7:1.2.3.4]",
        "[::1.2.3]",
        "[::1.2.3.256]",
        "[::1.02.3.4]",
        "[::1.2.3.4:5]",
        "[0000a::]",
        "[00001::]",
        "[ABCD::EF]",
        "[::1%eth0]",
        "[v1.x]",
        "[V1.x]",
        "[vz.x]",
        "[v1.]",
        "[v1.a:b]",
        "[]",
        "[",
        "[:1",
        "[::1]]",
        "]",
        "[::1]:",
        "[::1]x",
        "[::1]:0080",
        "x:000000000080",
        "x:65535",
        "x:65536",
        "x:1:2",
        "x@y",
        "x/y",
        "%41",
        "-",
    ]
    .iter()
    .map(|h| (*h).to_owned())
    .collect();
    // A linear congruential generator: enough to spread the cases, and the
    // same cases every run.
    let mut state: u64 = 0x5eed_1e55;
    let mut next = move |bound: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as usize) % bound
    };
    let pick = |next: &mut dyn FnMut(usize) -> usize, from: &str| {
        let bytes = from.as_bytes();
        bytes[next(bytes.len())] as char
    };
    for _ in 0..150 {
        // An IPv6 literal of 1 to 9 groups of 1 to 5 digits, perhaps with
        // a `::` and an IPv4 tail: valid or just past the limits.
        let groups = 1 + next(9);
        let mut literal: Vec<String> = (0..groups)
            .map(|_| {
                (0..1 + next(5))
                    .map(|_| pick(&mut next, "0123456789abcdefABCDEF"))
                    .collect()
            })
            .collect();
        if next(2) == 0 {
            let at = next(groups + 1);
            literal.insert(at, String::new());
            if at == 0 || at == literal.len() - 1 {
                literal.insert(at, String::new());
            }
        }
        if next(3) == 0 {
            let octets: Vec<String> = (0..3 + next(2))
                .map(|_| [0, 1, 9, 10, 99, 255, 256, 1000][next(8)].to_string())
                .collect();
            *literal.last_mut().unwrap() = octets.join(".");
        }
        hosts.push(format!("[{}]", literal.join(":")));
    }
    for _ in 0..100 {
        // Any mix of the characters the grammar names, and some it does not.
        let text: String = (0..1 + next(12))
            .map(|_| pick(&mut next, "0123456789abcdefv:.[]%-_~!$&'()*+,;=@/?#^"))
            .collect();
        let port = ["", ":80", ":0", ":65535", ":65536", ":00080", ":", ":x"][next(8)];
        hosts.push(format!("{text}{port}"));
    }
    hosts
}

#[test]
fn trailing_slash_redirects_take_the_hosts_the_reference_takes() {
    // A Host that Starlette refuses falls back to the address the
    // connection came in on, which differs between the two servers: each
    // location is compared with that address written as HERE.
    let reference = Reference::start();
    let ours = serve("wordcount");
    let location = |addr: SocketAddr, host: &str| {
        let raw = format!("GET /id/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let r = support::request(addr, raw.as_bytes());
        let location = r
            .header("location")
            .map(|l| l.replace(&addr.to_string(), "HERE"));
        (r.status, location)
    };
    let mut differences = Vec::new();
    let hosts = hosts_to_redirect_with();
    for host in &hosts {
        let (theirs, mine) = (location(reference.addr, host), location(ours.addr, host));
        if theirs != mine {
            differences.push(format!(
                "Host: {host}\n  etl-uvicorn: {theirs:?}\n  etl-serve:   {mine:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} hosts:\n{}",
        differences.len(),
        hosts.len(),
        differences.join("\n")
    );
}

/// etl-serve's client field as `(host, port)`, the port `0` when none
/// was given, as etl-uvicorn writes it: etl-serve writes an IPv6 host in
/// brackets, no port when none was given, and a host that is no address
/// quoted (its port after the quotes).
fn our_client_parts(logged: &str) -> (String, String) {
    let (host, port) = if logged.starts_with('"') {
        let end = logged.rfind('"').unwrap() + 1;
        let host = serde_json::from_str::<String>(&logged[..end]).unwrap();
        (host, logged[end..].strip_prefix(':'))
    } else if let Some((host, port)) = logged.strip_prefix('[').and_then(|t| t.split_once("]:")) {
        (host.to_owned(), Some(port))
    } else if logged.parse::<std::net::IpAddr>().is_ok() {
        (logged.to_owned(), None)
    } else {
        let (host, port) = logged.rsplit_once(':').unwrap();
        (host.to_owned(), Some(port))
    };
    (host, port.unwrap_or("0").to_owned())
}

#[test]
fn forwarded_clients_are_the_clients_the_reference_logs() {
    // The same X-Forwarded-For lists to both, from 127.0.0.1, trusted as
    // a proxy with the networks below; the client each access log names is
    // compared as (host, port). A peer's port differs between the two
    // connections, so the peer counts as the same client. The 172.16-22
    // entries are IPv4 networks written with masks, and entries that look
    // like them and are not networks; fe80::/10 and 2002::1%eth1 are there
    // for the hosts with a scope. The lists behind `9.9.9.9, ` show which
    // each server trusts.
    let trusted = "127.0.0.1, 10.0.0.0/8, ::1, 2001:db8::/32, unix:/x, \
        172.16.0.0/255.255.0.0, 172.17.0.0/0.0.255.255, 172.18.0.0/255.255.0.255, \
        172.19.0.0/255.255.000.0, 172.20.0.7/255.255.255.255, 172.21.0.1/255.255.0.0, \
        172.22.0.0/255.255.0.0/16, 2001:db9::/ffff:ffff::, fe80::/10, 2002::1%eth1";
    let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("reference-access-{}.log", std::process::id()));
    let reference = Reference::spawn(
        "etl_bench_plugins:wordcount",
        "bench/reference",
        &[("FORWARDED_ALLOW_IPS", trusted)],
        Some(&log),
    );
    let ours = Server::start_with(
        &plugin("wordcount"),
        &[],
        &[("FORWARDED_ALLOW_IPS", trusted)],
    )
    .unwrap();
    let lists: &[&[&str]] = &[
        &["203.0.113.7"],
        &["203.0.113.7:4711"],
        &["[2001:db9::1]:80"],
        &["[2001:db9::1]"],
        &["2001:db9::1"],
        &["[2001:db9::1"],
        &["[2001:db9::1]x"],
        &["a:b:c"],
        &["1.2.3.4:x"],
        &["1.2.3.4:99999"],
        &["1.2.3.4: 80"],
        &["1.2.3.4:+80"],
        &["1.2.3.4:8_0"],
        &["1.2.3.4:8__0"],
        &["1.2.3.4:-5"],
        &["1.2.3.4:0"],
        &["1.2.3.4:00080"],
        &[""],
        &[" , "],
        &["10.0.0.1, 10.0.0.2"],
        &["198.51.100.1, 10.0.0.2", "10.1.1.1"],
        &["unix:/x"],
        &["garbage text"],
        &["::1, 127.0.0.1"],
        &["2001:db8::5, 203.0.113.9"],
        &["203.0.113.9, 2001:db8::5"],
        &["x\"y"],
        &["[::1]:80, 10.0.0.3"],
        &["10.0.0.1/8"],
        &["9.9.9.9, 172.16.1.1"],
        &["9.9.9.9, 172.17.1.1"],
        &["9.9.9.9, 172.18.1.1"],
        &["9.9.9.9, 172.19.1.1"],
        &["9.9.9.9, 172.20.0.7"],
        &["9.9.9.9, 172.20.0.8"],
        &["9.9.9.9, 172.21.0.1"],
        &["9.9.9.9, 172.22.1.1"],
        &["9.9.9.9, 2001:db9::1"],
        &["9.9.9.9, fe80::1%eth0"],
        &["9.9.9.9, fe80::1"],
        &["9.9.9.9, 2002::1%eth1"],
        &["9.9.9.9, 2002::0:1%eth1"],
        &["9.9.9.9, 2002::1%eth2"],
        &["9.9.9.9, 2002::1"],
        &["9.9.9.9, ::ffff:10.0.0.1"],
        &["9.9.9.9, ::ffff:127.0.0.1"],
        &["9.9.9.9, 010.0.0.1"],
        &["9.9.9.9, 10.1"],
    ];
    for (n, forwarded) in lists.iter().enumerate() {
        let mut raw = format!(
            "GET /id?case={n} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Request-Id: case-{n}\r\n"
        );
        for value in *forwarded {
            raw.push_str(&format!("X-Forwarded-For: {value}\r\n"));
        }
        raw.push_str("\r\n");
        assert_eq!(support::request(reference.addr, raw.as_bytes()).status, 200);
        assert_eq!(support::request(ours.addr, raw.as_bytes()).status, 200);
    }
    let last = lists.len() - 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let theirs = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!("/id?case={last} ")) {
            break text;
        }
        assert!(Instant::now() < deadline, "etl-uvicorn logged: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(ours.wait_for_log(
        &format!("request_id=\"case-{last}\""),
        Duration::from_secs(30)
    ));
    let logs = ours.logs();
    let mut differences = Vec::new();
    for (n, forwarded) in lists.iter().enumerate() {
        let their_line = theirs
            .lines()
            .find(|l| l.contains(&format!("/id?case={n} ")))
            .unwrap();
        let their_client = their_line
            .trim_start_matches("INFO:")
            .trim_start()
            .split(" - \"")
            .next()
            .unwrap();
        let our_line = logs
            .lines()
            .find(|l| l.contains(&format!("request_id=\"case-{n}\"")))
            .unwrap();
        let our_client = our_line.split_once("client=").unwrap().1;
        let (host, port) = their_client.rsplit_once(':').unwrap();
        let theirs = (host.to_owned(), port.to_owned());
        let mine = our_client_parts(our_client);
        let both_the_peer = theirs.0 == "127.0.0.1" && mine.0 == "127.0.0.1";
        if theirs != mine && !both_the_peer {
            differences.push(format!(
                "{forwarded:?}: etl-uvicorn {their_client}, etl-serve {our_client}"
            ));
        }
    }
    let _ = std::fs::remove_file(&log);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}
