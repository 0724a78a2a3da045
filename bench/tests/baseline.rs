//! The bare hyper baseline must answer what etl-serve answers, or the
//! benchmark would compare unlike work.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};

/// etl-serve's answer to `{"text":"hello big world"}` with `wordcount`
/// (the contract's example; `tests/serve/contract.rs` holds etl-serve to it).
const ENVELOPE: &str = r#"{"usage":[{"value":15,"name":"chars"}],"status_code":200,"file_data":null,"filedata_meta":{"terminate_current":false,"new_records":[]},"status_code_text":null,"failure_category":null,"plugin_error":null,"output":{"words":3,"chars":15},"message_channels":{"infos":[],"warnings":[]}}"#;

#[test]
fn the_baseline_answers_the_same_envelope_as_etl_serve() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bare-hyper"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");

    let body = r#"{"text":"hello big world"}"#;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST /invoke HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{raw}"
    );
    assert_eq!(raw.split("\r\n\r\n").nth(1), Some(ENVELOPE));
}
