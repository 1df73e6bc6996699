//! `/v1/tokens` (admins manage tokens) and `/v1/enroll` (an agent trades a
//! join token for its own node credential).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use rollwave_api::{CreateToken, CreatedToken, Enroll};
use rollwave_core::{parse_duration, Role, TokenView};

use crate::audit::AuditNote;
use crate::auth::Caller;
use crate::{ApiError, Shared};

type ApiResult<T> = Result<T, ApiError>;

fn json<T: serde::de::DeserializeOwned>(what: &str, body: &Bytes) -> ApiResult<T> {
    crate::json_body(what, body)
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "tokens",
    request_body = CreateToken,
    responses(
        (status = 201, description = "Created; `token` is shown this once", body = CreatedToken),
        (status = 400, description = "Invalid name, role, ttl, uses or node", body = rollwave_api::ErrorBody),
        (status = 401, description = "No valid token", body = rollwave_api::ErrorBody),
        (status = 403, description = "Not an admin token", body = rollwave_api::ErrorBody),
        (status = 409, description = "A live token has that name", body = rollwave_api::ErrorBody),
    )
)]
pub async fn create(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateToken = json("token request", &body)?;
    let ttl_ms = match &req.ttl {
        None => None,
        Some(t) => {
            let ms = parse_duration("ttl", t)?;
            if ms < 1000 {
                return Err(ApiError::bad_request(format!(
                    "ttl: {t:?} is shorter than a second"
                )));
            }
            Some(ms)
        }
    };
    if req.uses.is_some() && req.role != Role::Join {
        return Err(ApiError::bad_request("uses: only join tokens have uses"));
    }
    if req.uses == Some(0) {
        return Err(ApiError::bad_request("uses: must be at least 1"));
    }
    match (&req.node, req.role) {
        (Some(node), Role::Agent) => {
            if !crate::session::valid_node_name(node) {
                return Err(ApiError::bad_request(format!(
                    "node: {node:?} is not a valid node name"
                )));
            }
        }
        (None, Role::Agent) => {
            return Err(ApiError::bad_request(
                "node: an agent token belongs to one node: name it",
            ))
        }
        (Some(_), _) => return Err(ApiError::bad_request("node: only agent tokens have a node")),
        (None, _) => {}
    }
    let issued = shared
        .tokens
        .issue(
            shared.store.as_ref(),
            &req.name,
            req.role,
            &caller.name,
            ttl_ms,
            req.uses,
            req.node,
        )
        .await?;
    let view = TokenView::from(&issued.record);
    let note = format!("created {} token {} (id {})", view.role, view.name, view.id);
    Ok(created(issued, note))
}

#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "tokens",
    responses(
        (status = 200, description = "Every token, revoked and expired ones too, oldest first; never a secret", body = Vec<TokenView>),
        (status = 401, description = "No valid token", body = rollwave_api::ErrorBody),
        (status = 403, description = "Not an admin token", body = rollwave_api::ErrorBody),
    )
)]
pub async fn list(State(shared): State<Arc<Shared>>) -> Json<Vec<TokenView>> {
    Json(shared.tokens.list().iter().map(TokenView::from).collect())
}

#[utoipa::path(
    delete,
    path = "/v1/tokens/{name}",
    tag = "tokens",
    params(("name" = String, Path, description = "The token's name, or its id")),
    responses(
        (status = 200, description = "Revoked; an agent credential's session is closed", body = TokenView),
        (status = 401, description = "No valid token", body = rollwave_api::ErrorBody),
        (status = 403, description = "Not an admin token", body = rollwave_api::ErrorBody),
        (status = 404, description = "No unrevoked token has that name", body = rollwave_api::ErrorBody),
        (status = 409, description = "Several do: revoke by id", body = rollwave_api::ErrorBody),
    )
)]
pub async fn revoke(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let record = shared.tokens.revoke(shared.store.as_ref(), &name).await?;
    if let (Role::Agent, Some(node)) = (record.role, &record.node) {
        shared
            .sessions
            .close(node, "this node's credential was revoked");
    }
    let note = AuditNote(format!("revoked {} token (id {})", record.role, record.id));
    Ok((Extension(note), Json(TokenView::from(&record))).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/enroll",
    tag = "agents",
    request_body = Enroll,
    responses(
        (status = 201, description = "The node's own credential, shown this once", body = CreatedToken),
        (status = 400, description = "Invalid node name or body", body = rollwave_api::ErrorBody),
        (status = 401, description = "No join token, or one that is unknown, revoked, expired or used up", body = rollwave_api::ErrorBody),
        (status = 403, description = "Not a join token", body = rollwave_api::ErrorBody),
        (status = 409, description = "The node is already enrolled", body = rollwave_api::ErrorBody),
    )
)]
pub async fn enroll(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: Enroll = json("enrollment", &body)?;
    if !crate::session::valid_node_name(&req.node) {
        return Err(ApiError::bad_request(format!(
            "node: {:?} is invalid: use 1-128 characters of a-z, A-Z, 0-9, '-', '_', '.'",
            req.node
        )));
    }
    let issued = shared
        .tokens
        .enroll(shared.store.as_ref(), &caller.token_id, &req.node)
        .await?;
    tracing::info!(node = %req.node, join_token = %caller.name, "agent enrolled");
    let note = format!(
        "enrolled node {} (credential id {})",
        req.node, issued.record.id
    );
    Ok(created(issued, note))
}

/// 201 with the new token, shown this once, and what the audit trail says.
fn created(issued: crate::auth::Issued, note: String) -> Response {
    let view = TokenView::from(&issued.record);
    (
        StatusCode::CREATED,
        Extension(AuditNote(note)),
        Json(CreatedToken {
            token: issued.token,
            view,
        }),
    )
        .into_response()
}
