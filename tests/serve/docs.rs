//! The documentation, held to the binary, so that it cannot drift from it:
//!
//! - every `$ etl-serve ...` line in a fenced block of README.md or
//!   docs/*.md is run, and the lines under it (up to the next `$` line or
//!   the end of the block) must be what it prints, log lines aside, with
//!   `...` standing for any number of lines. `# exits N` after the command
//!   holds its exit code too;
//! - every log message docs/shutdown.md quotes (`log: "..."`, `logged as
//!   \`...\``, ...) must be listed in [`QUOTES`] with the scenario that
//!   makes etl-serve write it, and each scenario runs the real binary and
//!   looks for its messages in the log;
//! - every refusal docs/operations.md and docs/reliability.md quote (`{"detail":
//!   "..."}`, outside the table of the reference's own answers) must be
//!   listed in [`DETAILS`] with the request that gets it, and each request
//!   is sent to the real binary;
//! - README.md's layout table names every file of `src/`, every crate and
//!   every example plugin.
//!
//! A capital letter standing alone in a quote (`T`, `M`, `N`, `C`) is a
//! placeholder for a value.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal::{SIGHUP, SIGTERM};

use crate::support::{self, fixture, invoke_request, plugin, Response, Server, Spawned, WORKSPACE};

/// Every log message docs/shutdown.md quotes, and the scenario below that
/// produces it.
const QUOTES: &[(&str, Scenario)] = &[
    (
        "SIGTERM received: cancel flags set, draining",
        Scenario::TimedOut,
    ),
    ("drained", Scenario::Drained),
    (
        "timed out after T: M invocations abandoned",
        Scenario::TimedOut,
    ),
    ("exiting with code C", Scenario::TimedOut),
    (
        "second SIGTERM during the drain: forced exit",
        Scenario::Forced,
    ),
    (
        "SIGTERM while the plugin was loading: exiting without serving",
        Scenario::Loading,
    ),
    ("SIGHUP received and ignored", Scenario::TimedOut),
    ("client went away: invocation cancelled", Scenario::Drained),
    (
        "N connections still reading a request or writing a response cut",
        Scenario::Cut,
    ),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// A SIGHUP, then two invocations that ignore the cancel flag when
    /// SIGTERM comes, with a 1 s graceful timeout.
    TimedOut,
    /// A client that leaves during its invocation, then a cooperative
    /// invocation when SIGTERM comes.
    Drained,
    /// A second SIGTERM during a drain that would not end.
    Forced,
    /// SIGTERM while the plugin's `init` runs.
    Loading,
    /// A response still being written to a client that reads nothing when
    /// a 1 s graceful timeout ends.
    Cut,
}

/// README.md and every file of docs/.
fn doc_files() -> Vec<PathBuf> {
    let root = Path::new(WORKSPACE);
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

/// One `$ etl-serve ...` line of the docs and the output shown under it.
#[derive(Debug)]
struct Example {
    at: String,
    /// `NAME=value` words before `etl-serve`.
    env: Vec<(String, String)>,
    args: Vec<String>,
    exit: Option<i32>,
    shown: Vec<String>,
}

fn examples(file: &Path) -> Vec<Example> {
    let text = std::fs::read_to_string(file).expect("a doc file");
    let name = file.strip_prefix(WORKSPACE).unwrap_or(file).display();
    let mut found: Vec<Example> = Vec::new();
    let mut in_block = false;
    let mut current: Option<Example> = None;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            found.extend(current.take());
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(command) = line.strip_prefix("$ ") {
            found.extend(current.take());
            let (command, exit) = match command.split_once("# exits ") {
                Some((c, code)) => (c, Some(code.trim().parse().expect("# exits N"))),
                None => (command, None),
            };
            let mut words = command.split_whitespace().peekable();
            let mut env = Vec::new();
            while let Some((k, v)) = words.peek().and_then(|w| w.split_once('=')) {
                env.push((k.to_owned(), v.to_owned()));
                words.next();
            }
            if words.next() != Some("etl-serve") {
                continue;
            }
            current = Some(Example {
                at: format!("{name}:{}", n + 1),
                env,
                args: words.map(str::to_owned).collect(),
                exit,
                shown: Vec::new(),
            });
        } else if let Some(example) = &mut current {
            example.shown.push(line.trim_end().to_owned());
        }
    }
    found
}

/// Whether `shown`, where a `...` line (or `{ ... }`) stands for any number
/// of lines, is `actual`.
fn same_lines(shown: &[String], actual: &[String]) -> bool {
    match shown.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if matches!(first.trim(), "..." | "{ ... }") => {
            (0..=actual.len()).any(|skip| same_lines(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual.first() == Some(first) && same_lines(rest, &actual[1..]),
    }
}

/// A log line on stderr: it starts with its timestamp.
fn is_log_line(line: &str) -> bool {
    line.len() > 20 && line.as_bytes()[4] == b'-' && line.as_bytes()[10] == b'T'
}

#[test]
fn every_documented_command_prints_what_the_docs_show() {
    let profile = support::profile_dir().display().to_string();
    // The plugins the docs name are built first.
    plugin("wordcount");
    let examples: Vec<Example> = doc_files().iter().flat_map(|f| examples(f)).collect();
    assert!(
        examples.len() >= 3,
        "the docs' command examples were not found: {examples:?}"
    );
    for example in examples {
        let mut cmd = support::etl_serve();
        // The docs name the release build's paths; the tests run this build.
        cmd.args(
            example
                .args
                .iter()
                .map(|a| a.replace("target/release", &profile)),
        )
        .envs(example.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
        let out = cmd.output().expect("runs etl-serve");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .replace(&profile, "target/release");
        let actual: Vec<String> = printed
            .lines()
            .filter(|l| !is_log_line(l))
            .map(|l| l.trim_end().to_owned())
            .collect();
        assert!(
            same_lines(&example.shown, &actual),
            "{}: the docs show\n{}\nbut etl-serve printed\n{}",
            example.at,
            example.shown.join("\n"),
            actual.join("\n")
        );
        if let Some(code) = example.exit {
            assert_eq!(out.status.code(), Some(code), "{}", example.at);
        }
    }
}

#[test]
fn the_matchers_take_ellipses_and_placeholders() {
    let v = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    assert!(same_lines(
        &v(&["a", "...", "d"]),
        &v(&["a", "b", "c", "d"])
    ));
    assert!(same_lines(&v(&["a", "..."]), &v(&["a"])));
    assert!(!same_lines(&v(&["a", "b"]), &v(&["a", "c"])));
    assert!(!same_lines(&v(&["a"]), &v(&["a", "b"])));
    let log = "WARN etl_serve::shutdown: timed out after 1s: 1 invocation abandoned abandoned=1";
    assert!(logged(log, "timed out after T: M invocations abandoned"));
    assert!(!logged(log, "timed out after T: M invocations joined"));
    assert!(!logged(log, "SIGTERM received"));
}

// ---------------------------------------------------------------------------
// The layout table
// ---------------------------------------------------------------------------

/// The row of README.md's layout table whose first cell is `cell`.
fn layout_row(readme: &str, cell: &str) -> String {
    let start = format!("| {cell} |");
    readme
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("README.md's layout table has no {cell} row"))
        .to_owned()
}

/// The names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").file_name())
        .map(|n| n.into_string().expect("a UTF-8 name"))
        .collect();
    names.sort();
    names
}

/// A newcomer finds each module from README.md, so its layout table names
/// every file of `src/` (a module directory as `dir/`, the files in it by
/// name), and every crate and example plugin of the workspace.
#[test]
fn the_layout_table_names_every_module_crate_and_plugin() {
    let root = Path::new(WORKSPACE);
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let src = layout_row(&readme, "`src/`");
    let names = entries(&root.join("src"));
    // Where each module directory is named: the files in it are named
    // between there and the next directory (or the end of the row).
    let dirs: Vec<(usize, &String)> = names
        .iter()
        .filter(|n| root.join("src").join(n).is_dir())
        .filter_map(|n| src.find(&format!("`{n}/`")).map(|at| (at, n)))
        .collect();
    let mut missing = Vec::new();
    for name in &names {
        let path = root.join("src").join(name);
        if !path.is_dir() {
            if !src.contains(&format!("`{name}`")) {
                missing.push(format!("src/{name}"));
            }
            continue;
        }
        let Some(&(at, _)) = dirs.iter().find(|(_, n)| *n == name) else {
            missing.push(format!("src/{name}/"));
            continue;
        };
        let end = dirs.iter().map(|(a, _)| *a).filter(|a| *a > at).min();
        let part = &src[at..end.unwrap_or(src.len())];
        for inner in entries(&path) {
            if inner != "mod.rs" && !part.contains(&format!("`{inner}`")) {
                missing.push(format!("src/{name}/{inner}"));
            }
        }
    }
    for name in entries(&root.join("crates")) {
        if !readme.contains(&format!("| `crates/{name}` |")) {
            missing.push(format!("crates/{name}"));
        }
    }
    let plugins = layout_row(&readme, "`plugins/`");
    for name in entries(&root.join("plugins")) {
        if !plugins.contains(&format!("`{name}`")) {
            missing.push(format!("plugins/{name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "README.md's layout table does not name: {}",
        missing.join(", ")
    );
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Every refusal the docs quote, and what gets it.
const DETAILS: &[(&str, Refusal)] = &[
    (
        "too many invocations in flight (--limit-concurrency N); retry later",
        Refusal::Concurrency,
    ),
    (
        "all N plugin threads are busy (--plugin-threads); retry later",
        Refusal::Threads,
    ),
    (
        "the request body stopped arriving: nothing for T (--body-read-timeout)",
        Refusal::StalledBody,
    ),
    (
        "an HTTP/1.1 request must carry exactly one Host header",
        Refusal::NoHost,
    ),
    (
        "only the chunked transfer coding is supported",
        Refusal::Gzip,
    ),
    ("There was an error parsing the body", Refusal::NotText),
];

#[derive(Clone, Copy, Debug)]
enum Refusal {
    Concurrency,
    Threads,
    StalledBody,
    NoHost,
    Gzip,
    NotText,
}

/// The `{"detail": "..."}` quotes of docs/operations.md and
/// docs/reliability.md, but for the section on the reference's answers.
fn quoted_details() -> Vec<String> {
    let mut quotes = Vec::new();
    for doc in ["docs/operations.md", "docs/reliability.md"] {
        let text = std::fs::read_to_string(Path::new(WORKSPACE).join(doc)).expect("doc");
        let mut theirs = false;
        for line in text.lines() {
            if line.starts_with('#') {
                theirs = line.contains("differently from etl-uvicorn");
            }
            let mut rest = line;
            while let Some(at) = rest.find("\"detail\": \"") {
                let after = &rest[at + 11..];
                let end = after.find('"').expect("a closed quote");
                if !theirs {
                    quotes.push(after[..end].to_owned());
                }
                rest = &after[end..];
            }
        }
    }
    quotes
}

#[test]
fn every_quoted_refusal_has_a_request() {
    let mut quoted = quoted_details();
    let mut listed: Vec<String> = DETAILS.iter().map(|(q, _)| q.to_string()).collect();
    // A refusal quoted in more than one place needs one request.
    quoted.sort();
    quoted.dedup();
    listed.sort();
    assert_eq!(quoted, listed, "the docs' refusals and DETAILS differ");
}

/// Gets `refusal` from a real etl-serve; returns the answer's `detail`.
fn refused(refusal: Refusal) -> String {
    let long = invoke_request(SLOW_FOREVER);
    let detail = |r: Response| {
        assert!(r.status >= 400, "{refusal:?}: {} {}", r.status, r.text());
        r.json()["detail"].as_str().unwrap_or_default().to_owned()
    };
    match refusal {
        Refusal::Concurrency => {
            let s = Server::start(&plugin("slow"), &["--limit-concurrency", "1"]);
            let _call = s.send_in_background(long);
            s.wait_in_flight(1);
            detail(s.post_json("/invoke", r#"{"units":1}"#))
        }
        Refusal::Threads => {
            let s = Server::start(&plugin("slow"), &["--plugin-threads", "2"]);
            let _calls = [
                s.send_in_background(long.clone()),
                s.send_in_background(long),
            ];
            s.wait_in_flight(2);
            detail(s.post_json("/invoke", r#"{"units":1}"#))
        }
        Refusal::StalledBody => {
            let s = Server::start(&plugin("wordcount"), &["--body-read-timeout", "1s"]);
            let head = "POST /invoke HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"te";
            detail(support::request(s.addr, head.as_bytes()))
        }
        Refusal::NoHost => {
            let s = Server::start(&plugin("wordcount"), &[]);
            detail(support::request(s.addr, b"GET /id HTTP/1.1\r\n\r\n"))
        }
        Refusal::Gzip => {
            let s = Server::start(&plugin("wordcount"), &[]);
            let raw = "POST /invoke HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
            detail(support::request(s.addr, raw.as_bytes()))
        }
        Refusal::NotText => {
            let s = Server::start(&plugin("wordcount"), &[]);
            detail(s.post(
                "/invoke",
                Some("application/json"),
                b"{\"text\":\"\xc3\x28\"}",
            ))
        }
    }
}

#[test]
fn every_quoted_refusal_is_what_etl_serve_answers() {
    for (quote, refusal) in DETAILS {
        let detail = refused(*refusal);
        assert!(
            logged(&detail, quote),
            "{refusal:?}: the docs quote {quote:?}, etl-serve answered {detail:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Log messages
// ---------------------------------------------------------------------------

/// The log messages docs/shutdown.md quotes.
fn quoted_in_shutdown_doc() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(WORKSPACE).join("docs/shutdown.md")).expect("doc");
    let mut quotes = Vec::new();
    for line in text.lines() {
        for (open, close) in [
            ("log: \"", '"'),
            ("log \"", '"'),
            ("logs `", '`'),
            ("logged as `", '`'),
            ("logged (`", '`'),
            ("logged: `", '`'),
        ] {
            let mut rest = line;
            while let Some(at) = rest.find(open) {
                let after = &rest[at + open.len()..];
                let end = after.find(close).expect("a closed quote");
                quotes.push(after[..end].to_owned());
                rest = &after[end..];
            }
        }
    }
    quotes
}

/// Whether a line of `logs` says `quote`, its placeholders standing for
/// any value and its plurals for either number.
fn logged(logs: &str, quote: &str) -> bool {
    let singular = |s: &str| {
        s.replace("invocations", "invocation")
            .replace("connections", "connection")
    };
    let quote: Vec<char> = singular(quote).chars().collect();
    // Split at each capital letter that stands alone as a word.
    let alone = |i: usize| {
        let letter = |j: Option<&char>| j.is_some_and(|c: &char| c.is_alphanumeric());
        quote[i].is_ascii_uppercase()
            && !letter(i.checked_sub(1).and_then(|j| quote.get(j)))
            && !letter(quote.get(i + 1))
    };
    let mut pieces = vec![String::new()];
    for (i, &c) in quote.iter().enumerate() {
        if alone(i) {
            pieces.push(String::new());
        } else {
            pieces.last_mut().unwrap().push(c);
        }
    }
    pieces.retain(|p| !p.is_empty());
    logs.lines().map(singular).any(|line| {
        let mut rest = line.as_str();
        pieces.iter().all(|p| match rest.find(p.as_str()) {
            Some(at) => {
                rest = &rest[at + p.len()..];
                true
            }
            None => false,
        })
    })
}

#[test]
fn every_quoted_log_message_has_a_scenario() {
    let mut quoted = quoted_in_shutdown_doc();
    let mut listed: Vec<String> = QUOTES.iter().map(|(q, _)| q.to_string()).collect();
    // A refusal quoted in more than one place needs one request.
    quoted.sort();
    quoted.dedup();
    listed.sort();
    assert_eq!(
        quoted, listed,
        "docs/shutdown.md's quotes and QUOTES differ"
    );
}

/// Asserts that `logs` says every quote of `scenario`.
fn assert_logged(scenario: Scenario, logs: &str) {
    for (quote, _) in QUOTES.iter().filter(|(_, s)| *s == scenario) {
        assert!(
            logged(logs, quote),
            "{scenario:?}: docs/shutdown.md quotes {quote:?}, the log does not say it:\n{logs}"
        );
    }
}

const SLOW_FOREVER: &str = r#"{"units":100000,"cooperative":false}"#;

#[test]
fn shutdown_quotes_timed_out() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "1s"]);
    s.signal(SIGHUP);
    assert!(s.wait_for_log("SIGHUP", Duration::from_secs(10)));
    let calls = [
        s.send_in_background(invoke_request(SLOW_FOREVER)),
        s.send_in_background(invoke_request(SLOW_FOREVER)),
    ];
    s.wait_in_flight(2);
    s.signal(SIGTERM);
    for call in calls {
        assert_eq!(call.join().unwrap().0.status, 503);
    }
    assert_eq!(
        s.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(75)
    );
    assert_logged(Scenario::TimedOut, &s.logs());
}

#[test]
fn shutdown_quotes_drained() {
    let mut s = Server::start(&plugin("slow"), &[]);
    let mut leaving = s.connect();
    use std::io::Write;
    leaving
        .stream_mut()
        .write_all(invoke_request(r#"{"units":2000}"#).as_bytes())
        .unwrap();
    s.wait_in_flight(1);
    drop(leaving);
    assert!(s.wait_for_log("client went away", Duration::from_secs(10)));
    s.wait_in_flight(0);
    let call = s.send_in_background(invoke_request(r#"{"units":2000}"#));
    s.wait_in_flight(1);
    s.signal(SIGTERM);
    assert_eq!(call.join().unwrap().0.status, 503);
    assert_eq!(
        s.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(0)
    );
    assert_logged(Scenario::Drained, &s.logs());
}

#[test]
fn shutdown_quotes_forced() {
    let mut s = Server::start(&plugin("slow"), &["--graceful-timeout", "60s"]);
    let _call = s.send_in_background(invoke_request(SLOW_FOREVER));
    s.wait_in_flight(1);
    s.signal(SIGTERM);
    assert!(s.wait_for_log("draining", Duration::from_secs(10)));
    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(130)
    );
    assert_logged(Scenario::Forced, &s.logs());
}

#[test]
fn shutdown_quotes_loading() {
    let mut cmd = support::etl_serve();
    cmd.arg("--plugin")
        .arg(fixture(None))
        .args(["--plugin-config", "slow_init", "--port", "0"]);
    let mut p = Spawned::new(cmd);
    assert!(p.wait_for_log("loading the plugin", Duration::from_secs(10)));
    p.signal(SIGTERM);
    assert_eq!(
        p.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(143)
    );
    assert_logged(Scenario::Loading, &p.logs());
}

#[test]
fn shutdown_quotes_cut() {
    let mut s = Server::start(&fixture(None), &["--graceful-timeout", "1s"]);
    // A 100 MB answer whose client reads only its head.
    let (_reader, _) = crate::edges::huge_answer_started(&s);
    s.signal(SIGTERM);
    assert_eq!(
        s.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(75)
    );
    assert_logged(Scenario::Cut, &s.logs());
}
