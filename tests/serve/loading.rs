//! A plugin that cannot be loaded stops etl-serve before it binds a port,
//! with exit code 65 and one line naming the file and the reason.

use crate::support;

use std::path::Path;

use support::{fixture, plugin, Server};

/// Starts etl-serve on `path`, expects it to refuse, and returns its one
/// error line.
fn refusal(path: &Path) -> String {
    let failed = Server::start_with(path, &[], &[])
        .err()
        .expect("etl-serve should refuse this plugin");
    assert_eq!(
        failed.status.code(),
        Some(65),
        "exit code for {}: {}",
        path.display(),
        failed.stderr
    );
    assert!(
        !failed.stderr.contains("listening on"),
        "it must not bind: {}",
        failed.stderr
    );
    let lines: Vec<&str> = failed
        .stderr
        .lines()
        .filter(|l| l.contains("error"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line, got: {}", failed.stderr);
    lines[0].to_owned()
}

#[test]
fn a_missing_file() {
    let line = refusal(Path::new("/nonexistent/libnothing.so"));
    assert_eq!(
        line,
        "etl-serve: error: cannot load plugin /nonexistent/libnothing.so: cannot read the plugin file: No such file or directory (os error 2)"
    );
}

#[test]
fn a_fifo_or_a_directory_is_refused_without_opening_it() {
    // dlopen would block opening a FIFO until a writer comes.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let fifo = dir.join("libfifo_plugin.so");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success(), "mkfifo");
    assert_eq!(
        refusal(&fifo),
        format!(
            "etl-serve: error: cannot load plugin {}: not a regular file: it is a FIFO",
            fifo.display()
        )
    );
    assert_eq!(
        refusal(dir),
        format!(
            "etl-serve: error: cannot load plugin {}: not a regular file: it is a directory",
            dir.display()
        )
    );
}

#[test]
fn a_library_for_another_machine_is_named_as_such() {
    // A real plugin whose ELF header says aarch64 (or x86_64, on aarch64).
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("libother_machine.so");
    let mut elf = std::fs::read(plugin("wordcount")).unwrap();
    let (other, name, host) = if cfg!(target_arch = "aarch64") {
        (62u16, "x86_64", "aarch64")
    } else {
        (183u16, "aarch64", "x86_64")
    };
    elf[18..20].copy_from_slice(&other.to_le_bytes());
    std::fs::write(&path, elf).unwrap();
    assert_eq!(
        refusal(&path),
        format!(
            "etl-serve: error: cannot load plugin {}: the library is built for {name}, and this etl-serve runs on {host}; build the plugin for {host}",
            path.display()
        )
    );
}

#[test]
fn a_file_that_is_not_a_shared_library() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("libnot_a_library.so");
    std::fs::write(&path, "this is text, not ELF\n").unwrap();
    let line = refusal(&path);
    assert!(
        line.starts_with(&format!(
            "etl-serve: error: cannot load plugin {}: not a loadable shared library: ",
            path.display()
        )),
        "{line}"
    );
}

#[test]
fn a_library_without_the_entry_symbol() {
    let path = fixture(Some("NO_ENTRY"));
    assert_eq!(
        refusal(&path),
        format!(
            "etl-serve: error: cannot load plugin {}: the library does not export the entry symbol `etl_plugin_entry` (is it an etl-serve plugin?)",
            path.display()
        )
    );
}

#[test]
fn an_unknown_abi_major_version() {
    let path = fixture(Some("WRONG_ABI"));
    assert_eq!(
        refusal(&path),
        format!(
            "etl-serve: error: cannot load plugin {}: the plugin was built for plugin ABI 99.0 but this etl-serve speaks ABI 1.1; rebuild the plugin against this etl-serve's include/etl_plugin.h",
            path.display()
        )
    );
}

#[test]
fn an_init_that_fails() {
    let path = fixture(Some("INIT_FAILS"));
    assert_eq!(
        refusal(&path),
        format!(
            "etl-serve: error: cannot load plugin {}: the plugin's init failed: missing API key (set FAULTY_KEY)",
            path.display()
        )
    );
}

#[test]
fn a_schema_that_is_not_json() {
    let path = fixture(Some("SCHEMA_NOT_JSON"));
    let line = refusal(&path);
    assert!(
        line.starts_with(&format!(
            "etl-serve: error: cannot load plugin {}: invalid plugin schema: `inputs_schema` is not JSON: ",
            path.display()
        )),
        "{line}"
    );
}

#[test]
fn a_schema_that_is_not_a_json_schema() {
    let path = fixture(Some("SCHEMA_INVALID"));
    let line = refusal(&path);
    assert!(
        line.starts_with(&format!(
            "etl-serve: error: cannot load plugin {}: invalid plugin schema: `inputs_schema` is not a valid JSON Schema: ",
            path.display()
        )),
        "{line}"
    );
}

#[test]
fn the_plugin_can_come_from_the_environment() {
    let mut cmd = support::etl_serve();
    cmd.env("ETL_SERVE_PLUGIN", "/nonexistent/from-env.so");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot load plugin /nonexistent/from-env.so"));
}

#[test]
fn a_bad_flag_is_a_usage_error() {
    let out = support::etl_serve()
        .args(["--plugin", "x.so", "--max-body-size", "lots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-body-size") && err.contains("`lots` is not a size"),
        "{err}"
    );

    // With no arguments at all: what is missing, how to run it, and where
    // to look.
    let out = support::etl_serve().output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "etl-serve: error: the following required arguments were not provided: --plugin <PATH>\n\
         usage: etl-serve --plugin PATH [--host ADDR] [--port N] [OPTIONS]\n\
         run `etl-serve --help` for every option\n"
    );
}

#[test]
fn the_example_plugins_load() {
    for name in ["wordcount", "wordcount_c", "slow", "ticker"] {
        let s = Server::start(&plugin(name), &[]);
        assert_eq!(s.get("/healthz").status, 200, "{name}");
    }
}

#[test]
fn a_rust_plugin_crate_outside_the_workspace_builds_from_the_docs_and_loads() {
    // The Cargo.toml and the code of the SDK's documented example, as a
    // crate of its own: the SDK must be its only schema dependency, and no
    // C compiler may be needed (CC points at nothing).
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("outside-plugin");
    let _ = std::fs::remove_dir_all(dir.join("src"));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let sdk_docs = std::fs::read_to_string(workspace.join("crates/etl-plugin/src/lib.rs")).unwrap();
    let blocks = doc_code_blocks(&sdk_docs);
    let manifest = blocks
        .iter()
        .find(|b| b.starts_with("[package]"))
        .expect("the documented Cargo.toml")
        .replace(
            "path = \"../etl-serve/crates/etl-plugin\"",
            &format!("path = {:?}", workspace.join("crates/etl-plugin")),
        );
    // Not a member of the workspace this directory happens to sit in.
    std::fs::write(dir.join("Cargo.toml"), format!("{manifest}\n[workspace]\n")).unwrap();
    let code = blocks
        .iter()
        .find(|b| b.contains("export_plugin!(Shout)"))
        .expect("the documented example");
    std::fs::write(dir.join("src/lib.rs"), code).unwrap();
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--offline", "--quiet"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .env("CC", "/nonexistent/cc")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "the documented plugin crate builds");
    let out = support::etl_serve()
        .arg("--plugin")
        .arg(dir.join("target/debug/libshout.so"))
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("plugin:       shout 0.1.0"));
}

/// The fenced code blocks of a Rust file's `//!` documentation.
fn doc_code_blocks(source: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in source.lines().filter_map(|l| l.strip_prefix("//!")) {
        let line = line.strip_prefix(' ').unwrap_or(line);
        if line.starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some(String::new()),
            }
        } else if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
}
