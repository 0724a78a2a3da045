//! `--probe`: a health check for images without a shell or curl. It asks
//! the etl-serve that the same settings describe (`--host`/`--port` or
//! `--uds`) for `/readyz`, and exits 0 on a 200, 1 otherwise, saying why on
//! stderr.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::Cli;

/// Each of connecting, writing and reading gets this long.
const TIMEOUT: Duration = Duration::from_secs(2);

const REQUEST: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

pub fn run(cli: &Cli) -> ExitCode {
    let (target, answer) = match &cli.uds {
        Some(path) => (
            format!("unix:{}", path.display()),
            UnixStream::connect(path).and_then(|mut s| {
                s.set_read_timeout(Some(TIMEOUT))?;
                s.set_write_timeout(Some(TIMEOUT))?;
                ask(&mut s)
            }),
        ),
        None => {
            // A server listening on every address answers on loopback.
            let host = match cli.host {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            let addr = SocketAddr::new(host, cli.port);
            (
                addr.to_string(),
                TcpStream::connect_timeout(&addr, TIMEOUT).and_then(|mut s| {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    s.set_write_timeout(Some(TIMEOUT))?;
                    ask(&mut s)
                }),
            )
        }
    };
    match answer {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("etl-serve --probe: {target} is not ready: /readyz answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("etl-serve --probe: cannot ask {target}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends the request and returns the status of the answer.
fn ask(stream: &mut (impl Read + Write)) -> std::io::Result<u16> {
    stream.write_all(REQUEST)?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|_| head.starts_with(b"HTTP/1."))
        .ok_or_else(|| std::io::Error::other("the answer is not HTTP"))
}
