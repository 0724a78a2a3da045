//! `GET /metrics`: Prometheus metrics through the prometheus-client crate,
//! in the OpenMetrics text format.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `etl_serve_requests_total` | counter | `route`, `status` |
//! | `etl_serve_invocation_duration_seconds` | histogram | `outcome` (ok, failed, shutdown) |
//! | `etl_serve_invocations_in_flight` | gauge | |
//! | `etl_serve_shutdown_aborts_total` | counter | |
//! | `etl_serve_client_disconnect_cancels_total` | counter | |
//! | `etl_serve_plugin_failures_total` | counter | `kind` (error, contract_violation) |
//! | `etl_serve_concurrency_rejections_total` | counter | |
//! | `process_start_time_seconds` | gauge | |
//!
//! The hot path pays one hash lookup under a read lock per labelled update.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::{self, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A counter that every request may update, from either worker: alone on
/// its cache lines, so that the updates do not slow down whatever else
/// would share them.
type HotCounter = Counter<u64, Aligned>;

/// A counter value alone on its cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Aligned(AtomicU64);

impl counter::Atomic<u64> for Aligned {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    fn inc_by(&self, v: u64) -> u64 {
        self.0.fetch_add(v, Ordering::Relaxed)
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The routes, as a closed set of label values.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Route {
    invoke,
    schema,
    id,
    precheck,
    metadata,
    openapi,
    docs,
    root,
    healthz,
    readyz,
    metrics,
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    status: u16,
}

/// How an invocation ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    ok,
    failed,
    shutdown,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

/// Why a plugin call failed.
/// Where a plugin call ran (see `dispatch`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CallThread {
    inline,
    blocking,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    thread: CallThread,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureKind {
    /// The plugin reported a failure (or panicked, in a Rust plugin).
    error,
    /// The plugin broke the ABI contract.
    contract_violation,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: FailureKind,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, HotCounter>,
    durations: Family<OutcomeLabels, Histogram>,
    in_flight: Gauge,
    shutdown_aborts: Counter,
    client_disconnects: Counter,
    failures: Family<FailureLabels, Counter>,
    rejections: Counter,
    // The series every successful invocation touches, looked up once so
    // the hot path does not hash labels under a lock.
    invoke_ok: HotCounter,
    duration_ok: Histogram,
    calls_inline: HotCounter,
    calls_blocking: HotCounter,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, HotCounter>::default();
        registry.register(
            "etl_serve_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let durations = Family::<OutcomeLabels, Histogram>::new_with_constructor(|| {
            // 100 µs to about 3.5 min.
            Histogram::new(exponential_buckets(0.0001, 2.5, 17))
        });
        registry.register(
            "etl_serve_invocation_duration_seconds",
            "Time from a request reaching the plugin to its answer, by outcome",
            durations.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "etl_serve_invocations_in_flight",
            "Requests waiting on the plugin",
            in_flight.clone(),
        );
        let shutdown_aborts = Counter::default();
        registry.register(
            "etl_serve_shutdown_aborts",
            "Requests answered with the 503 shutdown-abort",
            shutdown_aborts.clone(),
        );
        let client_disconnects = Counter::default();
        registry.register(
            "etl_serve_client_disconnect_cancels",
            "Invocations cancelled because their client went away",
            client_disconnects.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "etl_serve_plugin_failures",
            "Plugin calls that failed, by kind",
            failures.clone(),
        );
        let rejections = Counter::default();
        registry.register(
            "etl_serve_concurrency_rejections",
            "Invocations refused with 503 by --limit-concurrency",
            rejections.clone(),
        );
        let calls = Family::<CallLabels, HotCounter>::default();
        registry.register(
            "etl_serve_plugin_calls",
            "Plugin calls, by where they ran: inline on an HTTP worker, or on a blocking thread",
            calls.clone(),
        );
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        registry.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch",
            start,
        );
        let invoke_ok = requests
            .get_or_create(&RequestLabels {
                route: Route::invoke,
                status: 200,
            })
            .clone();
        let duration_ok = durations
            .get_or_create(&OutcomeLabels {
                outcome: Outcome::ok,
            })
            .clone();
        let call = |thread| calls.get_or_create(&CallLabels { thread }).clone();
        let (calls_inline, calls_blocking) = (call(CallThread::inline), call(CallThread::blocking));
        Metrics {
            registry,
            requests,
            durations,
            in_flight,
            shutdown_aborts,
            client_disconnects,
            failures,
            rejections,
            invoke_ok,
            duration_ok,
            calls_inline,
            calls_blocking,
        }
    }

    pub fn request(&self, route: Route, status: u16) {
        if route == Route::invoke && status == 200 {
            self.invoke_ok.inc();
        } else {
            self.requests
                .get_or_create(&RequestLabels { route, status })
                .inc();
        }
    }

    pub fn invocation(&self, outcome: Outcome, elapsed: Duration) {
        if outcome == Outcome::ok {
            self.duration_ok.observe(elapsed.as_secs_f64());
        } else {
            self.durations
                .get_or_create(&OutcomeLabels { outcome })
                .observe(elapsed.as_secs_f64());
        }
    }

    pub fn plugin_call(&self, thread: CallThread) {
        match thread {
            CallThread::inline => self.calls_inline.inc(),
            CallThread::blocking => self.calls_blocking.inc(),
        };
    }

    pub fn failure(&self, kind: FailureKind) {
        self.failures.get_or_create(&FailureLabels { kind }).inc();
    }

    pub fn shutdown_abort(&self) {
        self.shutdown_aborts.inc();
    }

    pub fn client_disconnect(&self) {
        self.client_disconnects.inc();
    }

    pub fn rejection(&self) {
        self.rejections.inc();
    }

    /// The OpenMetrics text, with the in-flight gauge read now.
    pub fn encode(&self, in_flight: usize) -> String {
        self.in_flight.set(in_flight as i64);
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
