//! The audit trail: every request that may change something (anything but a
//! read, a plan or an agent's session) is recorded after it is answered, with
//! who made it, from where, what it was for, and what came of it, refusals
//! included.
//!
//! Recorded by one middleware rather than in each handler, so that a new
//! route cannot forget it. A handler may say more than the route does by
//! attaching an [`AuditNote`] to its response (e.g. the ids of the rollouts
//! it started).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use rollwave_api::ErrorBody;
use rollwave_core::AuditEntry;

use crate::auth::Caller;
use crate::{now_ms, Shared};

/// What a handler did, for the audit trail, e.g. `started rollouts 7, 8`.
#[derive(Debug, Clone)]
pub struct AuditNote(pub String);

/// What a request acted on when its path does not say (a start names the
/// rollout it made, e.g. `rollout 7`), in place of the route's target.
#[derive(Debug, Clone)]
pub struct AuditTarget(pub String);

pub async fn record(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let Some((action, target)) = route
        .as_deref()
        .and_then(|r| describe(request.method(), r, request.uri().path()))
    else {
        return next.run(request).await;
    };
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string());
    let response = next.run(request).await;
    // Put there by the authorization layer, inside this one; a request
    // refused for its token has no caller.
    let actor = response
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "unauthenticated".to_string(), |c| c.name.clone());
    let status = response.status();
    let target = response
        .extensions()
        .get::<AuditTarget>()
        .map_or(target, |t| t.0.clone());
    let (response, detail) = if status.is_success() {
        let note = response
            .extensions()
            .get::<AuditNote>()
            .map(|n| n.0.clone());
        (response, note.unwrap_or_default())
    } else {
        // The error's message, read and put back. Read whole: it is this
        // server's own answer, already in memory and short (error.rs bounds
        // messages), and a cut one would reach the client empty.
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| e.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        (Response::from_parts(parts, Body::from(bytes)), message)
    };
    let entry = AuditEntry {
        id: 0,
        at: now_ms(),
        actor,
        remote,
        action: action.to_string(),
        target,
        ok: status.is_success(),
        status: status.as_u16(),
        detail,
    };
    if let Err(e) = shared.store.append_audit(&entry).await {
        // The change itself stands; losing its record is logged loudly.
        tracing::error!(error = %e, action = %entry.action, target = %entry.target, "appending to the audit trail");
    }
    response
}

/// The action and target of a request that may change something; `None`
/// for reads.
fn describe(method: &Method, route: &str, path: &str) -> Option<(&'static str, String)> {
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        return None;
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let at = |i: usize| parts.get(i).copied().unwrap_or_default().to_string();
    Some(match route {
        "/v1/plan" => return None,
        "/v1/releases/{service}/{version}" if method == Method::DELETE => {
            ("release.delete", format!("{}@{}", at(2), at(3)))
        }
        "/v1/releases/{service}/{version}" => ("release.push", format!("{}@{}", at(2), at(3))),
        "/v1/rollouts" => ("rollout.start", String::new()),
        "/v1/rollouts/{id}/{command}" => (
            match parts.get(3).copied() {
                Some("pause") => "rollout.pause",
                Some("resume") => "rollout.resume",
                Some("cancel") => "rollout.cancel",
                Some("rollback") => "rollout.rollback",
                Some("promote") => "rollout.promote",
                _ => "rollout.unknown_command",
            },
            format!("rollout {}", at(2)),
        ),
        "/v1/services/{service}/finalize" => ("service.finalize", format!("service {}", at(2))),
        "/v1/tokens" => ("token.create", String::new()),
        "/v1/tokens/{name}" => ("token.revoke", format!("token {}", at(2))),
        "/v1/enroll" => ("agent.enroll", String::new()),
        _ => ("api.other", format!("{method} {path}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_by_their_route() {
        let post = Method::POST;
        assert_eq!(describe(&Method::GET, "/v1/rollouts", "/v1/rollouts"), None);
        assert_eq!(describe(&post, "/v1/plan", "/v1/plan"), None);
        assert_eq!(
            describe(
                &post,
                "/v1/releases/{service}/{version}",
                "/v1/releases/api/2.0.0"
            ),
            Some(("release.push", "api@2.0.0".into()))
        );
        assert_eq!(
            describe(
                &post,
                "/v1/rollouts/{id}/{command}",
                "/v1/rollouts/7/rollback"
            ),
            Some(("rollout.rollback", "rollout 7".into()))
        );
        assert_eq!(
            describe(
                &post,
                "/v1/services/{service}/finalize",
                "/v1/services/api/finalize"
            ),
            Some(("service.finalize", "service api".into()))
        );
        assert_eq!(
            describe(&Method::DELETE, "/v1/tokens/{name}", "/v1/tokens/ci"),
            Some(("token.revoke", "token ci".into()))
        );
        assert_eq!(
            describe(
                &Method::DELETE,
                "/v1/releases/{service}/{version}",
                "/v1/releases/api/1.0.0"
            ),
            Some(("release.delete", "api@1.0.0".into()))
        );
        // A route added later is still recorded, if not by name.
        assert_eq!(
            describe(&Method::PUT, "/v1/things/{name}", "/v1/things/x"),
            Some(("api.other", "PUT /v1/things/x".into()))
        );
    }
}
