//! The promise that a shutdown loses nothing and that nothing a client or a
//! plugin does takes the server down silently. See docs/reliability.md.

mod support;

use std::time::Duration;

use support::load::{round, Outcomes, Round};

/// Rounds and clients of the short run in `cargo test`; the soak script
/// raises them through these variables.
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn run(cooperative: bool, timeout: &'static str, expected_exit: i32) -> Outcomes {
    let rounds = setting("ETL_SERVE_SOAK_ROUNDS", 3);
    let mut total = Outcomes::default();
    for n in 0..rounds {
        for clients in [32, setting("ETL_SERVE_SOAK_CLIENTS", 64)] {
            let r = Round {
                clients,
                cooperative,
                graceful_timeout: timeout,
                warmup: Duration::from_millis(400),
            };
            let o = round(&r);
            eprintln!("round {n}, {clients} clients, cooperative={cooperative}: {o:?}");
            assert_eq!(
                o.lost(),
                0,
                "requests lost in round {n} with {clients} clients: {o:?}"
            );
            // The closing race needs a handshake to complete in the instant
            // the listener closes: rare, never systematic.
            assert!(o.closing_race <= 2, "round {n}: {o:?}");
            assert_eq!(o.exit_code, Some(expected_exit), "{o:?}");
            assert!(o.ok > 0, "some requests were answered normally: {o:?}");
            assert!(
                o.shutdown_abort > 0,
                "some requests were cut by the shutdown: {o:?}"
            );
            total.ok += o.ok;
            total.shutdown_abort += o.shutdown_abort;
            total.connect_refused += o.connect_refused;
            total.write_failed += o.write_failed;
            total.closing_race += o.closing_race;
        }
    }
    eprintln!("total, cooperative={cooperative}: {total:?}");
    total
}

#[test]
fn sigterm_under_load_loses_nothing_with_a_cooperative_plugin() {
    let total = run(true, "10s", 0);
    assert_eq!(total.write_failed, 0, "{total:?}");
}

#[test]
fn sigterm_under_load_loses_nothing_when_the_plugin_ignores_the_flag() {
    let total = run(false, "1s", 75);
    assert_eq!(total.write_failed, 0, "{total:?}");
}
