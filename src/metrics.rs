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
//! | `etl_serve_write_timeouts_total` | counter | |
//! | `etl_serve_plugin_calls_total` | counter | `thread` (inline, blocking) |
//! | `etl_serve_log_lines_dropped_total` | counter | |
//! | `etl_serve_request_body_bytes_held` | gauge | |
//! | `process_start_time_seconds` | gauge | |
//!
//! The series every successful invocation updates are looked up once, at
//! startup; any other labelled update pays one hash lookup under a read
//! lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

/// The invocation-duration histogram of one outcome: the classic
/// Prometheus histogram, with its counts in per-thread cells. (The
/// prometheus-client one locks a mutex per observation, which both workers
/// take on every request: about 100 ns of each request in a profile.)
#[derive(Clone, Debug)]
struct Durations(Arc<DurationsInner>);

#[derive(Debug)]
struct DurationsInner {
    /// Upper bounds in seconds, ascending; the last is +Inf.
    bounds: Box<[f64]>,
    cells: Box<[DurationCell]>,
}

/// One thread's share of a [`Durations`]: observations per bucket, and
/// their sum (an `f64`, as bits).
#[derive(Debug)]
#[repr(align(128))]
struct DurationCell {
    buckets: [AtomicU64; BUCKETS],
    sum: AtomicU64,
}

/// 17 bounds from 100 µs to about 3.5 min, and +Inf.
const BUCKETS: usize = 18;

/// How many cells a histogram spreads its counts over; threads past the
/// first `CELLS` share them.
const CELLS: usize = 8;

/// This thread's cell.
fn cell_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static CELL: usize = NEXT.fetch_add(1, Ordering::Relaxed) % CELLS;
    }
    CELL.with(|c| *c)
}

impl Durations {
    fn new() -> Durations {
        let bounds: Box<[f64]> = exponential_buckets(0.0001, 2.5, (BUCKETS - 1) as u16)
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        assert_eq!(bounds.len(), BUCKETS);
        Durations(Arc::new(DurationsInner {
            bounds,
            cells: (0..CELLS)
                .map(|_| DurationCell {
                    buckets: Default::default(),
                    sum: AtomicU64::new(0f64.to_bits()),
                })
                .collect(),
        }))
    }

    fn observe(&self, seconds: f64) {
        let cell = &self.0.cells[cell_index()];
        // The first bucket whose bound is at least `seconds` (+Inf for NaN).
        let i = self
            .0
            .bounds
            .partition_point(|b| *b < seconds)
            .min(BUCKETS - 1);
        cell.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = cell
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut sum = 0.0;
        let mut buckets: Vec<(f64, u64)> = self.0.bounds.iter().map(|b| (*b, 0)).collect();
        for cell in &self.0.cells[..] {
            sum += f64::from_bits(cell.sum.load(Ordering::Relaxed));
            for (b, n) in buckets.iter_mut().zip(&cell.buckets) {
                b.1 += n.load(Ordering::Relaxed);
            }
        }
        // The count is the buckets' total, so the +Inf bucket always
        // equals it, whatever observations land while this reads.
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
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

/// Where a plugin call ran (see `inline`).
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

/// Why a plugin call failed.
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

/// The log thread's count of dropped lines, read at each scrape.
#[derive(Debug)]
struct LogLinesDropped;

impl TypedMetric for LogLinesDropped {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for LogLinesDropped {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&crate::logging::dropped_lines(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The request body bytes held, read at each scrape.
#[derive(Debug)]
struct BodyBytesHeld;

impl TypedMetric for BodyBytesHeld {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for BodyBytesHeld {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let held = i64::try_from(crate::routes::body::held_bytes()).unwrap_or(i64::MAX);
        encoder.encode_gauge(&held)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<OutcomeLabels, Durations>,
    in_flight: Gauge,
    shutdown_aborts: Counter,
    client_disconnects: Counter,
    failures: Family<FailureLabels, Counter>,
    rejections: Counter,
    write_timeouts: Counter,
    // The series every successful invocation touches, looked up once so
    // the hot path does not hash labels under a lock: about 700
    // instructions of each request (3.6%, `bench/callgrind`).
    invoke_ok: Counter,
    duration_ok: Durations,
    calls_inline: Counter,
    calls_blocking: Counter,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "etl_serve_requests",
            "HTTP requests answered, by route and status",
            requests.clone(),
        );
        let durations: Family<OutcomeLabels, Durations> =
            Family::new_with_constructor(Durations::new);
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
        let write_timeouts = Counter::default();
        registry.register(
            "etl_serve_write_timeouts",
            "Connections closed because the client took none of a response within --write-timeout",
            write_timeouts.clone(),
        );
        let rejections = Counter::default();
        registry.register(
            "etl_serve_concurrency_rejections",
            "Invocations refused with 503 by --limit-concurrency or --plugin-threads",
            rejections.clone(),
        );
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "etl_serve_plugin_calls",
            "Plugin calls, by where they ran: inline on an HTTP worker, or on a blocking thread",
            calls.clone(),
        );
        registry.register(
            "etl_serve_log_lines_dropped",
            "Log lines dropped because stderr did not take them fast enough",
            LogLinesDropped,
        );
        registry.register(
            "etl_serve_request_body_bytes_held",
            "Bytes of request bodies held now, against --max-body-memory",
            BodyBytesHeld,
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
            write_timeouts,
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

    pub fn write_timeout(&self) {
        self.write_timeouts.inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_encode_as_a_classic_histogram_summed_over_threads() {
        let d = Durations::new();
        let mut registry = Registry::default();
        registry.register("d", "test", d.clone());
        d.observe(0.00005); // first bucket (<= 0.0001)
        let other = d.clone();
        std::thread::spawn(move || {
            other.observe(0.0002); // <= 0.00025
            other.observe(1e9); // +Inf
        })
        .join()
        .unwrap();
        d.observe(0.0001); // a bound is inclusive
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "d_sum 1000000000.00035",
            "d_count 4",
            "d_bucket{le=\"0.0001\"} 2",
            "d_bucket{le=\"0.00025\"} 3",
            "d_bucket{le=\"0.000625\"} 3",
            "d_bucket{le=\"+Inf\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}
