//! The integration tests: the built `etl-serve` binary, real plugin
//! libraries (Rust, C, and deliberately broken fixtures), real loopback
//! sockets and real signals. One test crate, so that the shared `support`
//! module is compiled once.
//!
//! - `abi`: ABI 1.1 as plugins see it, and a 1.0 plugin still working;
//! - `contract`: every route and error case of the etl plugin contract;
//! - `differential`: the same requests to etl-uvicorn 0.1.0 and etl-serve;
//! - `docs`: the commands and log lines the docs show, against the binary;
//! - `edges`: responses, bodies and streams still moving at shutdown;
//! - `loading`: plugins that load, and the ones that must not;
//! - `operations`: settings, limits, logs, metrics and probes;
//! - `python`: the Python bridge's own behaviour (its wire is in `differential`);
//! - `reliability`: plugin faults, bad input, and SIGTERM under load;
//! - `shutdown`: the shutdown sequence, driven with real signals;
//! - `signals`: every other signal, as PID 1 and not.

mod abi;
mod contract;
mod differential;
mod docs;
mod edges;
mod loading;
mod operations;
mod python;
mod reliability;
mod shutdown;
mod signals;
mod support;
