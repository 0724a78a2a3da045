//! `GET /precheck`: the plugin's own readiness check, always on the
//! blocking pool (a precheck typically waits on the network).

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};

use super::invoke::{outcome_of, ClientWatch};
use super::reply::{add_retry_headers, internal_error, json, shutdown_abort, threads_busy, Body};
use crate::app::App;
use crate::envelope::{self, Outcome};
use crate::inline;
use crate::invocation::{Collected, Invocation, Kind, RequestInfo};

pub async fn precheck(app: &'static App, request_id: &HeaderValue) -> Response<Body> {
    let _in_flight = app.drain.track();
    if app.drain.is_draining() {
        return shutdown_abort(&Collected::default());
    }
    if !app.plugin.manifest().has_precheck {
        let c = Collected::default();
        return json(
            StatusCode::OK,
            envelope::precheck(&c, &Outcome::Ok(None)).into(),
        );
    }
    if let Some(limit) = inline::pool_full() {
        return threads_busy(limit);
    }
    let plugin = app.plugin;
    let registered = Invocation::start(
        Kind::Precheck,
        None,
        RequestInfo {
            request_id: Some(request_id.clone()),
            ..RequestInfo::default()
        },
    );
    let watch = ClientWatch::new(registered.shared());
    let call = inline::on_blocking_pool(move || {
        let rc = plugin.precheck(registered.invocation());
        registered.finish(rc)
    });
    let collected = tokio::select! {
        biased;
        collected = call => watch.finished(collected),
        () = app.drain.expired() => return shutdown_abort(&watch.abandon()),
    };
    match collected {
        Ok(c) => {
            let outcome = outcome_of(&c, Kind::Precheck);
            let status = if matches!(outcome, Outcome::Shutdown) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            let mut r = json(status, envelope::precheck(&c, &outcome).into());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                add_retry_headers(&mut r);
            }
            r
        }
        Err(e) => internal_error(&e.to_string()),
    }
}
