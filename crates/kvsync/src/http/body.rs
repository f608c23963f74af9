//! A request body within its limits: at most [`MAX_BODY`] bytes kept, a larger one drained (up to
//! [`MAX_DRAIN`]) and answered 413, a stalled one answered 408 after the body timeout.

use super::error;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt;
use std::time::Duration;

/// Largest request body accepted.
pub const MAX_BODY: usize = 4 << 20;

/// Largest body read and discarded after `MAX_BODY` is exceeded, so that the client, still
/// writing, reads the 413 and keeps its connection. Past it (or past a declared length over it)
/// the answer carries `Connection: close` and the rest is never read.
pub const MAX_DRAIN: usize = 64 << 20;

/// Default of `AppState::body_timeout`.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// `r` with `Connection: close`: the server closes the connection after it (the rest of the
/// request body is not read).
pub(super) fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The request body, at most `MAX_BODY` bytes, within `timeout`. A longer one is a 413:
/// read to its end first when it is no longer than `MAX_DRAIN`, so that a client which sends the
/// whole body before reading (most do) gets the answer rather than a reset, and its connection
/// stays usable; beyond that, or when the client waits for `100 Continue`, it is refused
/// before the body is sent and the connection closed.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    timeout: Duration,
) -> Result<Bytes, Response> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = |close: bool| {
        let r = error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        );
        if close {
            closing(r)
        } else {
            r
        }
    };
    // A client that waits for `100 Continue` has not sent the body: refuse it unread (hyper
    // sends the 100 only once the body is read).
    let waits = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let limit = if waits { MAX_BODY } else { MAX_DRAIN };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(true));
    }
    let mut kept = Vec::with_capacity(declared.map_or(0, |n| n.min(MAX_BODY as u64) as usize));
    let mut seen = 0usize;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("unreadable request body: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            seen = seen.saturating_add(data.len());
            if seen <= MAX_BODY {
                kept.extend_from_slice(&data);
            } else if seen > MAX_DRAIN {
                break;
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(closing(error(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {timeout:?}"),
        ))),
        Ok(Err(e)) => Err(error(StatusCode::BAD_REQUEST, e)),
        Ok(Ok(())) if seen > MAX_DRAIN => Err(too_large(true)),
        Ok(Ok(())) if seen > MAX_BODY => Err(too_large(false)),
        Ok(Ok(())) => Ok(Bytes::from(kept)),
    }
}
