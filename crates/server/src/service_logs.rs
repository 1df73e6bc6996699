//! `GET /v1/nodes/{node}/services/{service}/logs`: a service's output on a
//! node, read from the node's agent over its session (nodes have no
//! inbound port). A request costs that one session a message each way;
//! a follower holds one long poll at a time on it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use rollwave_api::{
    ErrorCode, LogChunk, LogsOutcome, LogsRequest,
    SERVICE_LOGS_TRUNCATED_HEADER as TRUNCATED_HEADER,
};
use rollwave_core::validate_service_name;
use serde::Deserialize;

use crate::session::AskError;
use crate::{now_ms, ApiError, Shared};

/// What one answer carries at most: the newest 1 MiB of lines.
pub const MAX_BYTES: u64 = 1 << 20;
/// How long an agent holds a follower's request for new lines.
const FOLLOW_WAIT: Duration = Duration::from_secs(10);
/// Beyond the agent's own wait: its read, and the way back.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// A followed node that is gone this long ends the stream; a shorter
/// absence (an agent restarting) only pauses it, and it resumes where it
/// was: the position survives the agent.
const FOLLOW_OFFLINE_LIMIT: Duration = Duration::from_secs(30);
const OFFLINE_RETRY: Duration = Duration::from_millis(500);
/// Comments sent while nothing else is: a client that went away is
/// noticed, and proxies do not close a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines written since: a duration back from now (`10m`, `2h`)
    /// or a time (`2026-01-02T15:04:05Z`).
    since: Option<String>,
    /// `true`: keep the response open and send new lines as server-sent
    /// events.
    follow: Option<String>,
}

/// A service's output on a node
///
/// Lines of `<RFC 3339 time> <line>`, oldest first, as the node's agent
/// stamped them when the service wrote them: the newest 1 MiB, or what
/// was written since `since`. With `follow=true`, server-sent events
/// instead: `lines` (data: the lines, one per data line) as they are
/// written, `gap` when lines were rotated away before they could be sent,
/// and `error` (data: an `ErrorBody`) just before the stream ends, when the
/// node has been offline for 30 s or its log cannot be read.
#[utoipa::path(
    get,
    path = "/v1/nodes/{node}/services/{service}/logs",
    tag = "fleet",
    params(
        ("node" = String, Path, description = "Node name"),
        ("service" = String, Path, description = "Service name"),
        LogsQuery,
    ),
    responses(
        (status = 200, description = "The lines (`text/plain`); the `rollwave-logs-truncated: true` header says older ones matched but did not fit in 1 MiB. With `follow=true`, a `text/event-stream`", content_type = "text/plain", body = String,
            headers(("rollwave-logs-truncated" = String, description = "`true` when older matching lines were left out"))),
        (status = 400, description = "A bad `since`, `follow` or service name", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such node, or the node has no such service", body = rollwave_api::ErrorBody),
        (status = 500, description = "The agent could not read the log", body = rollwave_api::ErrorBody),
        (status = 503, description = "The node is offline, or its agent did not answer", body = rollwave_api::ErrorBody),
    )
)]
pub async fn logs(
    State(shared): State<Arc<Shared>>,
    Path((node, service)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    validate_service_name("service", &service)?;
    let since_ms = match q.since.as_deref() {
        Some(text) => Some(parse_since(text, now_ms())?),
        None => None,
    };
    let follow = match q.follow.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "follow: {other:?} is not true or false"
            )))
        }
    };
    let has_service = {
        let fleet = shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
        let Some(view) = fleet.get(&node) else {
            return Err(ApiError::not_found(format!("node {node:?} not found")));
        };
        view.services.contains_key(&service)
    };
    if !has_service {
        return Err(no_service(&node, &service));
    }
    let req = LogsRequest {
        id: 0,
        service: service.clone(),
        since_ms,
        after: None,
        max_bytes: MAX_BYTES,
        wait_ms: 0,
    };
    let first = ask(&shared, &node, &service, req, ANSWER_WITHIN).await?;
    if !follow {
        let mut resp = (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            first.text,
        )
            .into_response();
        if first.truncated {
            resp.headers_mut()
                .insert(TRUNCATED_HEADER, header::HeaderValue::from_static("true"));
        }
        return Ok(resp);
    }
    let events = follow_stream(shared, node, service, first);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

fn no_service(node: &str, service: &str) -> ApiError {
    ApiError::not_found(format!("node {node:?} has no service {service:?}"))
}

/// `since` as Unix milliseconds: a duration back from `now`, or a time.
fn parse_since(text: &str, now: u64) -> Result<u64, ApiError> {
    let trimmed = text.trim();
    if let Ok(d) = humantime::parse_duration(trimmed) {
        return Ok(now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(trimmed) {
        if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
            return Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
    }
    Err(ApiError::bad_request(format!(
        "since: {text:?} is neither a duration like 10m nor a time like 2026-01-02T15:04:05Z"
    )))
}

/// One request to the node's agent, its failures as API errors.
async fn ask(
    shared: &Shared,
    node: &str,
    service: &str,
    req: LogsRequest,
    within: Duration,
) -> Result<LogChunk, ApiError> {
    let patience = within + Duration::from_millis(req.wait_ms);
    match shared.sessions.logs(node, req, patience).await {
        Ok(LogsOutcome::Lines(chunk)) => Ok(chunk),
        Ok(LogsOutcome::UnknownService) => Err(no_service(node, service)),
        Ok(LogsOutcome::Failed { reason }) => Err(ApiError::internal(format!(
            "node {node:?} could not read the log of {service:?}: {reason}"
        ))),
        Err(e) => Err(unreachable(node, e, patience)),
    }
}

fn unreachable(node: &str, e: AskError, patience: Duration) -> ApiError {
    let message = match e {
        AskError::Offline => format!("node {node:?} is offline: its logs are read from its agent"),
        AskError::Gone => format!("node {node:?} went offline before it answered"),
        AskError::NoAnswer => format!(
            "node {node:?} did not answer within {}s (an agent older than the control plane does not serve logs)",
            patience.as_secs()
        ),
    };
    ApiError::new(ErrorCode::Unavailable, message)
}

enum Step {
    /// The first answer, to send before asking again.
    First(LogChunk),
    /// Asking for what follows `cursor`.
    After {
        cursor: String,
    },
    Done,
}

/// The first answer, then a long poll after another: each asks the agent
/// for the lines after the last answer's cursor.
fn follow_stream(
    shared: Arc<Shared>,
    node: String,
    service: String,
    first: LogChunk,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    stream::unfold(Step::First(first), move |step| {
        let (shared, node, service) = (shared.clone(), node.clone(), service.clone());
        async move {
            let mut offline_since: Option<tokio::time::Instant> = None;
            let mut cursor = match step {
                Step::Done => return None,
                Step::First(chunk) => {
                    let events = chunk_events(&chunk);
                    return Some((
                        events,
                        Step::After {
                            cursor: chunk.cursor,
                        },
                    ));
                }
                Step::After { cursor } => cursor,
            };
            loop {
                let req = LogsRequest {
                    id: 0,
                    service: service.clone(),
                    since_ms: None,
                    after: Some(cursor.clone()),
                    max_bytes: MAX_BYTES,
                    wait_ms: FOLLOW_WAIT.as_millis() as u64,
                };
                match ask(&shared, &node, &service, req, ANSWER_WITHIN).await {
                    Ok(chunk) => {
                        offline_since = None;
                        cursor = chunk.cursor.clone();
                        let events = chunk_events(&chunk);
                        if !events.is_empty() {
                            return Some((events, Step::After { cursor }));
                        }
                    }
                    // Unreachable for now: an agent restarting comes back
                    // with the same log, and the cursor still points into it.
                    Err(e) if e.code == ErrorCode::Unavailable => {
                        let since = *offline_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= FOLLOW_OFFLINE_LIMIT {
                            return Some((vec![error_event(e)], Step::Done));
                        }
                        tokio::time::sleep(OFFLINE_RETRY).await;
                    }
                    Err(e) => return Some((vec![error_event(e)], Step::Done)),
                }
            }
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)))
}

fn chunk_events(chunk: &LogChunk) -> Vec<SseEvent> {
    let mut out = Vec::new();
    if chunk.skipped {
        out.push(
            SseEvent::default()
                .event("gap")
                .data("lines were rotated away before they could be sent"),
        );
    }
    // Each line is one data line; the last newline would add an empty one.
    let text = chunk.text.strip_suffix('\n').unwrap_or(&chunk.text);
    if !chunk.text.is_empty() {
        out.push(SseEvent::default().event("lines").data(text));
    }
    out
}

fn error_event(e: ApiError) -> SseEvent {
    let body = rollwave_api::ErrorBody {
        error: rollwave_api::ErrorDetail {
            code: e.code,
            message: e.message,
        },
    };
    SseEvent::default()
        .event("error")
        .data(serde_json::to_string(&body).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_a_duration_back_or_a_time() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_since("10m", now).unwrap(), now - 600_000);
        assert_eq!(parse_since(" 1h ", now).unwrap(), now - 3_600_000);
        assert_eq!(
            parse_since("2026-01-02T15:04:05Z", now).unwrap(),
            1_767_366_245_000
        );
        assert_eq!(
            parse_since("2026-01-02T15:04:05.250Z", now).unwrap(),
            1_767_366_245_250
        );
        for bad in ["", "yesterday", "10 parsecs", "2026-13-01T00:00:00Z"] {
            let e = parse_since(bad, now).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.starts_with("since: "), "{}", e.message);
        }
    }
}
