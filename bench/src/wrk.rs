//! Load generation with wrk: one thread, N connections, `POST /invoke`
//! with the wordcount body, and the parsing of wrk's report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The request every load run sends.
pub const BODY: &str = r#"{"text":"hello big world"}"#;

/// What one wrk run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub requests: u64,
    /// Socket errors plus answers other than 2xx/3xx.
    pub errors: u64,
}

pub struct Wrk {
    program: PathBuf,
    script: PathBuf,
}

impl Wrk {
    /// Writes the request script into `dir`.
    pub fn new(program: PathBuf, dir: &Path) -> Result<Wrk, String> {
        let script = dir.join("invoke.lua");
        let lua = format!(
            "wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        );
        std::fs::write(&script, lua).map_err(|e| format!("{}: {e}", script.display()))?;
        Ok(Wrk { program, script })
    }

    /// `wrk --version`'s first line.
    pub fn version(&self) -> String {
        Command::new(&self.program)
            .arg("--version")
            .output()
            .map(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr);
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_default()
    }

    /// The command line of one run, as the report shows it.
    pub fn command_line(&self, connections: u32, duration: Duration) -> String {
        format!(
            "wrk -t1 -c{connections} -d{}s --latency --timeout 10s -s target/bench/invoke.lua http://127.0.0.1:PORT/invoke",
            duration.as_secs()
        )
    }

    pub fn run(
        &self,
        addr: SocketAddr,
        connections: u32,
        duration: Duration,
    ) -> Result<Run, String> {
        let out = Command::new(&self.program)
            .args([
                "-t1",
                &format!("-c{connections}"),
                &format!("-d{}s", duration.as_secs()),
            ])
            .args(["--latency", "--timeout", "10s", "-s"])
            .arg(&self.script)
            .arg(format!("http://{addr}/invoke"))
            .output()
            .map_err(|e| format!("cannot run wrk: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "wrk failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse(&text).ok_or_else(|| format!("cannot read wrk's report:\n{text}"))
    }
}

/// Reads wrk's `--latency` report.
fn parse(text: &str) -> Option<Run> {
    let mut run = Run::default();
    let mut saw_rps = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => {
                run.rps = n.parse().ok()?;
                saw_rps = true;
            }
            ["50%", t] => run.p50_us = micros(t)?,
            ["99%", t] => run.p99_us = micros(t)?,
            [n, "requests", "in", ..] => run.requests = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                run.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => run.errors += n.parse::<u64>().ok()?,
            _ => {}
        }
    }
    saw_rps.then_some(run)
}

/// `365.00us`, `1.02ms`, `2.00s`, `1.5m` as microseconds.
fn micros(t: &str) -> Option<f64> {
    let split = t.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_report() {
        let text = "Running 5s test @ http://127.0.0.1:1/invoke
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   390.66us  100.00us   5.00ms   90.00%
    Req/Sec    40.00k     1.00k   42.00k    70.00%
  Latency Distribution
     50%  365.00us
     75%  400.00us
     90%  450.00us
     99%    1.02ms
  200123 requests in 5.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 5
Requests/sec:  40024.60
Transfer/sec:     12.00MB
";
        let run = parse(text).unwrap();
        assert_eq!(run.rps, 40024.60);
        assert_eq!(run.p50_us, 365.0);
        assert_eq!(run.p99_us, 1020.0);
        assert_eq!(run.requests, 200123);
        assert_eq!(run.errors, 8);
    }

    #[test]
    fn refuses_a_report_without_a_rate() {
        assert!(parse("wrk: connection refused").is_none());
    }
}
