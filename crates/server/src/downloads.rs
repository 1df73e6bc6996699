//! Serving release artifacts to a crowd of agents.
//!
//! Every node of a rollout downloads the release as soon as the rollout
//! starts, so a fleet of a thousand asks for it in the same second. Two
//! things keep that from turning into timeouts:
//!
//! - **A cap on concurrent streams** (`rollwave server --max-downloads`). A
//!   stream holds a permit from its first byte until its last, or until the
//!   client goes away (the body is dropped). Past the cap the answer is at
//!   once `429` with `Retry-After`, before any work (no store read, no file
//!   opened): an agent waiting costs the server nothing, and the agent
//!   retries with backoff and jitter.
//! - **Ranges**, so that a download cut mid-way resumes where it stopped
//!   instead of starting over. A single range (`bytes=a-b`, `a-`, `-n`) is
//!   answered `206` with `Content-Range`; one that starts beyond the end,
//!   `416` with `Content-Range: bytes */SIZE`. A multi-range request, a
//!   malformed one or another unit is answered with the whole artifact
//!   (`200`), as RFC 9110 allows: agents never send one, and a client that
//!   does still gets correct bytes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rollwave_api::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ApiError;

/// Concurrent artifact streams by default. A handful of streams already
/// fills a link (one TCP stream moves hundreds of MB/s on a LAN), so 64 lose
/// no throughput, while each still gets at least 1/64 of the link: a client
/// never waits long for its next bytes, far from the agent's 30 s read
/// timeout, however many nodes ask at once. Their socket and read buffers
/// stay bounded too (64 x a few MiB at worst).
pub const DEFAULT_MAX_DOWNLOADS: usize = 64;

/// What a refused agent is told to wait. Short: with the cap reached a
/// stream ends every few milliseconds for a small artifact, and agents add
/// their own jitter on top, so the waiting crowd does not come back at once.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Read size of a stream: fewer, larger chunks than the 4 KiB default.
const CHUNK: usize = 64 * 1024;

/// The cap on concurrent artifact streams, and its metrics.
pub struct Downloads {
    permits: Arc<Semaphore>,
    max: usize,
    in_flight: Gauge,
    refused: Counter,
}

/// One stream's share of the cap; released when dropped.
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

impl Downloads {
    /// `max` is at least 1 (the command line refuses 0).
    pub fn new(max: usize, in_flight: Gauge, refused: Counter) -> Downloads {
        let max = max.max(1);
        Downloads {
            permits: Arc::new(Semaphore::new(max)),
            max,
            in_flight,
            refused,
        }
    }

    /// A permit, or why not: [`Busy`] answers `429`.
    pub fn try_start(&self) -> Result<Permit, Busy> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            self.refused.inc();
            Busy { max: self.max }
        })?;
        self.in_flight.inc();
        Ok(Permit {
            _permit: permit,
            in_flight: self.in_flight.clone(),
        })
    }
}

/// Every stream is taken: `429` with `Retry-After` and a JSON error.
#[derive(Debug)]
pub struct Busy {
    max: usize,
}

impl IntoResponse for Busy {
    fn into_response(self) -> Response {
        let err = ApiError::new(
            ErrorCode::TooManyRequests,
            format!(
                "{} artifact downloads are in progress, the most this control plane \
                 serves at once (--max-downloads): retry after {RETRY_AFTER_SECS}s",
                self.max
            ),
        );
        (
            [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
            with_accept_ranges(err.into_response()),
        )
            .into_response()
    }
}

/// What a `Range` header asks of an artifact of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No range, or one answered with the whole artifact (see the module
    /// documentation).
    Whole,
    /// Bytes `start..=end`, both within the artifact.
    Part { start: u64, end: u64 },
    /// Starts beyond the end (or asks for the last 0 bytes).
    Unsatisfiable,
}

/// Reads a `Range` header against an artifact of `len` bytes.
pub fn parse_range(value: Option<&HeaderValue>, len: u64) -> Range {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once('='))
        .filter(|(unit, _)| unit.trim().eq_ignore_ascii_case("bytes"))
        .map(|(_, spec)| spec.trim())
    else {
        return Range::Whole;
    };
    if spec.contains(',') {
        return Range::Whole;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Range::Whole;
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // `-n`: the last n bytes.
        (true, false) => match number(last) {
            None => Range::Whole,
            Some(0) => Range::Unsatisfiable,
            Some(_) if len == 0 => Range::Unsatisfiable,
            Some(n) => Range::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        },
        // `a-`: from a to the end.
        (false, true) => match number(first) {
            None => Range::Whole,
            Some(a) if a >= len => Range::Unsatisfiable,
            Some(a) => Range::Part {
                start: a,
                end: len - 1,
            },
        },
        // `a-b`; a last position before the first is an invalid range,
        // which is ignored.
        (false, false) => match (number(first), number(last)) {
            (Some(a), Some(b)) if b >= a => {
                if a >= len {
                    Range::Unsatisfiable
                } else {
                    Range::Part {
                        start: a,
                        end: b.min(len - 1),
                    }
                }
            }
            _ => Range::Whole,
        },
        (true, true) => Range::Whole,
    }
}

/// The `416` for a range beyond an artifact of `len` bytes.
pub fn unsatisfiable(value: Option<&HeaderValue>, len: u64) -> Response {
    let asked = value.and_then(|v| v.to_str().ok()).unwrap_or("");
    let err = ApiError::new(
        ErrorCode::RangeNotSatisfiable,
        format!("range {asked:?} is beyond the artifact's {len} bytes"),
    );
    (
        [(header::CONTENT_RANGE, format!("bytes */{len}"))],
        with_accept_ranges(err.into_response()),
    )
        .into_response()
}

/// Streams `range` of `file` (`len` bytes long), holding `permit` until the
/// stream ends or the client goes away.
pub async fn serve(
    mut file: tokio::fs::File,
    len: u64,
    range: Range,
    permit: Permit,
) -> Result<Response, ApiError> {
    let (status, start, count) = match range {
        Range::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        // The handler answers an unsatisfiable range before taking a permit;
        // should one get here, the whole artifact is still a correct answer.
        Range::Whole | Range::Unsatisfiable => (StatusCode::OK, 0, len),
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start)).await?;
    }
    let stream = Held {
        inner: tokio_util::io::ReaderStream::with_capacity(file.take(count), CHUNK),
        permit: Some(permit),
    };
    let mut response = (
        status,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, count.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response();
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {start}-{}/{len}", start + count - 1);
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
    }
    Ok(with_accept_ranges(response))
}

/// Every answer of the artifact route says that ranges work.
pub fn with_accept_ranges(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    response
}

/// A body stream that gives its permit back as soon as it has ended or
/// failed, without waiting for the HTTP layer to drop it; dropped early (the
/// client went away), it gives it back then.
struct Held<S> {
    inner: S,
    permit: Option<Permit>,
}

impl<S, T, E> Stream for Held<S>
where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    type Item = Result<T, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.permit = None;
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::StreamExt;

    fn range(value: &str, len: u64) -> Range {
        parse_range(Some(&HeaderValue::from_str(value).unwrap()), len)
    }

    fn part(start: u64, end: u64) -> Range {
        Range::Part { start, end }
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        use Range::{Unsatisfiable, Whole};
        assert_eq!(parse_range(None, 100), Whole);
        let cases = [
            ("bytes=0-9", part(0, 9)),
            ("bytes=10-", part(10, 99)),
            ("bytes=-10", part(90, 99)),
            ("bytes=-1000", part(0, 99)),
            ("bytes=90-1000", part(90, 99)),
            ("bytes=99-99", part(99, 99)),
            ("Bytes = 5-6 ", part(5, 6)),
            ("bytes=100-", Unsatisfiable),
            ("bytes=100-200", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            // Ignored: the whole artifact.
            ("bytes=0-1,5-6", Whole),
            ("bytes=5-1", Whole),
            ("bytes=-", Whole),
            ("bytes=a-b", Whole),
            ("bytes=+1-2", Whole),
            ("bytes=1", Whole),
            ("items=0-1", Whole),
            ("0-1", Whole),
        ];
        for (value, want) in cases {
            assert_eq!(range(value, 100), want, "{value}");
        }
        assert_eq!(range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(range("bytes=0-", 0), Unsatisfiable);
    }

    fn downloads(max: usize) -> (Downloads, Gauge, Counter) {
        let (in_flight, refused) = (Gauge::default(), Counter::default());
        let d = Downloads::new(max, in_flight.clone(), refused.clone());
        (d, in_flight, refused)
    }

    const BYTES: &[u8] = b"0123456789abcdefghij";

    async fn file() -> (tempfile::TempDir, tokio::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, BYTES).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        (dir, file)
    }

    fn header(r: &Response, name: header::HeaderName) -> Option<&str> {
        r.headers().get(name).map(|v| v.to_str().unwrap())
    }

    async fn body(r: Response) -> Vec<u8> {
        axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn a_range_is_answered_206_with_its_bytes() {
        let (d, _, _) = downloads(1);
        let (_dir, f) = file().await;
        let r = serve(f, 20, part(5, 9), d.try_start().unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(header(&r, header::CONTENT_RANGE), Some("bytes 5-9/20"));
        assert_eq!(header(&r, header::CONTENT_LENGTH), Some("5"));
        assert_eq!(header(&r, header::ACCEPT_RANGES), Some("bytes"));
        assert_eq!(body(r).await, b"56789");

        let (_dir, f) = file().await;
        let r = serve(f, 20, range("bytes=-3", 20), d.try_start().unwrap())
            .await
            .unwrap();
        assert_eq!(header(&r, header::CONTENT_RANGE), Some("bytes 17-19/20"));
        assert_eq!(body(r).await, b"hij");

        let (_dir, f) = file().await;
        let r = serve(f, 20, Range::Whole, d.try_start().unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, header::CONTENT_RANGE), None);
        assert_eq!(header(&r, header::CONTENT_LENGTH), Some("20"));
        assert_eq!(header(&r, header::ACCEPT_RANGES), Some("bytes"));
        assert_eq!(body(r).await, BYTES);
    }

    #[tokio::test]
    async fn a_range_beyond_the_end_is_a_416_json_error() {
        let value = HeaderValue::from_static("bytes=20-");
        assert_eq!(parse_range(Some(&value), 20), Range::Unsatisfiable);
        let r = unsatisfiable(Some(&value), 20);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&r, header::CONTENT_RANGE), Some("bytes */20"));
        assert_eq!(header(&r, header::ACCEPT_RANGES), Some("bytes"));
        let body: rollwave_api::ErrorBody = serde_json::from_slice(&body(r).await).unwrap();
        assert_eq!(body.error.code, ErrorCode::RangeNotSatisfiable);
        assert_eq!(
            body.error.message,
            "range \"bytes=20-\" is beyond the artifact's 20 bytes"
        );
    }

    #[tokio::test]
    async fn past_the_cap_a_429_says_when_to_retry_until_a_stream_ends() {
        let (d, in_flight, refused) = downloads(1);
        let (_dir, f) = file().await;
        let first = serve(f, 20, Range::Whole, d.try_start().unwrap())
            .await
            .unwrap();
        assert_eq!(in_flight.get(), 1);

        let busy = d.try_start().err().unwrap().into_response();
        assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&busy, header::RETRY_AFTER), Some("1"));
        let body: rollwave_api::ErrorBody = serde_json::from_slice(&body(busy).await).unwrap();
        assert_eq!(body.error.code, ErrorCode::TooManyRequests);
        assert!(
            body.error.message.starts_with(
                "1 artifact downloads are in progress, the most this control plane serves at once (--max-downloads)"
            ),
            "{}",
            body.error.message
        );
        assert_eq!(refused.get(), 1);

        // Read to its end, the stream gives the permit back, though the
        // body itself is still held.
        let mut stream = first.into_body().into_data_stream();
        let mut got = Vec::new();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, BYTES);
        assert_eq!(in_flight.get(), 0);
        let second = d.try_start().unwrap();

        // A client that goes away mid-stream (its body is dropped) gives it
        // back too.
        let (_dir, f) = file().await;
        let r = serve(f, 20, Range::Whole, second).await.unwrap();
        assert!(d.try_start().is_err());
        drop(r);
        assert_eq!(in_flight.get(), 0);
        assert!(d.try_start().is_ok());
        assert_eq!(refused.get(), 2);
    }
}
