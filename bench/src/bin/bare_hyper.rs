//! The bare hyper baseline: the fastest any hyper-based host of `wordcount`
//! can be. It parses the same body, counts the same way and writes the same
//! envelope as etl-serve, with no plugin, no validation, no metrics and no
//! lifecycle. Only `POST /invoke` is served.
//!
//! Usage: `bare-hyper PORT`. It prints `ready` once it listens; SIGTERM
//! ends it at once.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;

#[derive(Deserialize)]
struct Input {
    text: String,
    #[serde(default = "one")]
    repeat: i64,
}

fn one() -> i64 {
    1
}

async fn invoke(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = if req.uri().path() != "/invoke" {
        (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"{\"detail\":\"Not Found\"}"),
        )
    } else {
        match req.into_body().collect().await {
            Ok(body) => match serde_json::from_slice::<Input>(&body.to_bytes()) {
                Ok(input) => (StatusCode::OK, envelope(&input).into()),
                Err(e) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    serde_json::json!({"detail": e.to_string()})
                        .to_string()
                        .into(),
                ),
            },
            Err(_) => (StatusCode::BAD_REQUEST, Bytes::new()),
        }
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The same bytes etl-serve answers for `wordcount`.
fn envelope(input: &Input) -> String {
    let words = input.text.split_whitespace().count() as i64 * input.repeat;
    let chars = input.text.len() as i64 * input.repeat;
    format!(
        concat!(
            r#"{{"usage":[{{"value":{chars},"name":"chars"}}],"status_code":200,"file_data":null,"#,
            r#""filedata_meta":{{"terminate_current":false,"new_records":[]}},"status_code_text":null,"#,
            r#""failure_category":null,"plugin_error":null,"output":{{"words":{words},"chars":{chars}}},"#,
            r#""message_channels":{{"infos":[],"warnings":[]}}}}"#
        ),
        chars = chars,
        words = words
    )
}

#[tokio::main]
async fn main() {
    let port: u16 = match std::env::args().nth(1).map(|p| p.parse()) {
        Some(Ok(port)) => port,
        _ => {
            eprintln!("usage: bare-hyper PORT");
            std::process::exit(64);
        }
    };
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bare-hyper: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(71);
        }
    };
    println!("ready");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // As etl-serve does: the baseline gets every hyper setting
            // that makes a host faster.
            let _ = http1::Builder::new()
                .writev(false)
                .serve_connection(TokioIo::new(stream), service_fn(invoke))
                .await;
        });
    }
}
