//! Reading a request body, within three limits: its size
//! (`--max-body-size`, 413), how long it may pause (`--body-read-timeout`,
//! 408), and the bytes of all the bodies held at once
//! (`--max-body-memory`, 503), so that slow or many uploads can pin neither
//! a connection nor memory without bound.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::reply::{detail, Body};

/// The limits a body is read within.
pub struct BodyLimits {
    /// Largest body, in bytes.
    pub max: u64,
    /// Longest pause between two parts of a body.
    pub pause: Duration,
    pub memory: MemoryBudget,
}

/// The bytes of request bodies held at once, from their first byte until
/// their response starts, against `--max-body-memory`.
pub struct MemoryBudget {
    max: u64,
}

/// The bytes held now, for the whole process (there is one budget).
static HELD: AtomicU64 = AtomicU64::new(0);

/// The bytes of request bodies held now (`/metrics`).
pub fn held_bytes() -> u64 {
    HELD.load(Ordering::Relaxed)
}

/// Bytes of the budget held for one body until dropped.
#[must_use]
pub struct Held {
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(max: u64) -> MemoryBudget {
        MemoryBudget { max }
    }

    /// Holds `bytes` more for `held`; false, holding nothing more, when
    /// that would go over the budget.
    fn grow(&self, held: &mut Held, bytes: u64) -> bool {
        let fits = HELD
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                now.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok();
        if fits {
            held.bytes += bytes;
        }
        fits
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            HELD.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Reads the whole body. Refuses one over the size limit with 413 (at once
/// when its Content-Length says so), one that pauses too long with 408, and
/// one the memory budget cannot hold with 503. The body is held against
/// the budget until the returned [`Held`] drops.
///
/// A small body arrives in one frame, which is returned as it is: no copy,
/// and no list of buffers to gather it in.
pub async fn read_body(
    mut body: Incoming,
    limits: &BodyLimits,
) -> Result<(Bytes, Held), Response<Body>> {
    let max = limits.max;
    let too_large = |len: Option<u64>| {
        let text = match len {
            Some(n) => format!(
                "request body is {n} bytes, over the limit of {max} bytes (--max-body-size)"
            ),
            None => format!("request body is over the limit of {max} bytes (--max-body-size)"),
        };
        unread_rest(detail(StatusCode::PAYLOAD_TOO_LARGE, &text))
    };
    let declared = body.size_hint().exact();
    if let Some(len) = declared.filter(|len| *len > max) {
        return Err(too_large(Some(len)));
    }
    let budget = &limits.memory;
    let mut held = Held { bytes: 0 };
    // What the Content-Length announces is held at once, so that a body
    // that cannot be held is refused before any of it is read.
    if !budget.grow(&mut held, declared.unwrap_or(0)) {
        return Err(over_budget(budget.max));
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    let mut len = 0u64;
    loop {
        let frame = {
            let mut next = pin!(body.frame());
            // Most bodies are already here: no timer for them.
            match futures_util::poll!(next.as_mut()) {
                Poll::Ready(frame) => frame,
                Poll::Pending => match tokio::time::timeout(limits.pause, next).await {
                    Ok(frame) => frame,
                    Err(_) => return Err(paused(limits.pause)),
                },
            }
        };
        let Some(frame) = frame else {
            break;
        };
        // A body whose framing broke leaves the connection unusable.
        let frame = frame.map_err(|e| {
            unread_rest(detail(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            ))
        })?;
        // Trailers carry nothing the plugin reads.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len() as u64;
        if len > max {
            return Err(too_large(None));
        }
        let more = len.saturating_sub(held.bytes);
        if more > 0 && !budget.grow(&mut held, more) {
            return Err(over_budget(budget.max));
        }
        match (&mut joined, first.take()) {
            (Some(all), _) => all.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut all = Vec::with_capacity(declared.unwrap_or(0).max(len) as usize);
                all.extend_from_slice(&earlier);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    let body = joined.map(Bytes::from).or(first).unwrap_or_default();
    Ok((body, held))
}

/// The rest of the body is not read, so the connection cannot be reused.
pub fn unread_rest(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn paused(pause: Duration) -> Response<Body> {
    unread_rest(detail(
        StatusCode::REQUEST_TIMEOUT,
        &format!(
            "the request body stopped arriving: nothing for {} (--body-read-timeout)",
            humantime::format_duration(pause)
        ),
    ))
}

fn over_budget(max: u64) -> Response<Body> {
    let mut r = unread_rest(detail(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "too many request bytes held at once, over the limit of {max} bytes (--max-body-memory); retry later"
        ),
    ));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_holds_up_to_its_limit_and_frees_on_drop() {
        let budget = MemoryBudget::new(100);
        let mut a = Held { bytes: 0 };
        assert!(budget.grow(&mut a, 60));
        let mut b = Held { bytes: 0 };
        assert!(!budget.grow(&mut b, 41), "60 + 41 is over 100");
        assert!(budget.grow(&mut b, 40));
        drop(a);
        assert!(budget.grow(&mut b, 60));
        assert_eq!(b.bytes, 100);
        drop(b);
        assert_eq!(held_bytes(), 0);
    }
}
