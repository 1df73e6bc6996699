//! The HTTP API under `/v1`. Handlers validate input and answer JSON errors;
//! anything that changes a rollout goes through the reconciler, so that one
//! task serialises every decision.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rollwave_api::{
    DeleteReleaseResponse, Finalize, FinalizeResponse, PushResponse, RolloutResponse,
    ServiceSummary, StartRollout, AGENT_CONNECT_PATH, SIGNATURE_HEADER,
};
use rollwave_core::{
    normalize_version, validate_service_name, ArtifactFormat, AuditEntry, NodeState, NodeView,
    Release, ReleaseManifest, ReleaseSignature, RolloutSummary, SignatureRecord,
};
use rollwave_store::PutRelease;
use serde::Deserialize;

use crate::audit::{AuditNote, AuditTarget};
use crate::auth::Caller;
use crate::blobs::{discard, UploadError};
use crate::reconciler::{Command, Event};
use crate::routes::Routes;
use crate::{events, now_ms, openapi, service_logs, session, tokens, ui, ApiError, Shared};

type ApiResult<T> = Result<T, ApiError>;

/// Every route the control plane serves, the single list the router is
/// built from. To add a route: a line here, `#[utoipa::path(...)]` on its
/// handler, and the handler in `ApiDoc`'s `paths(...)` (openapi.rs).
/// `openapi::tests::every_route_is_documented` fails until the three agree;
/// a route outside the API (the dashboard's page and files) goes in that
/// test's `NOT_API` list instead.
pub(crate) fn routes() -> Routes<Arc<Shared>> {
    use rollwave_core::Access::*;
    Routes::new()
        .get("/v1/health", Public, health)
        .get(AGENT_CONNECT_PATH, Session, session::connect)
        .post("/v1/enroll", Enroll, tokens::enroll)
        .get("/v1/nodes", Read, list_nodes)
        .get(
            "/v1/nodes/{node}/services/{service}/logs",
            Read,
            service_logs::logs,
        )
        .get("/v1/releases", Read, list_releases)
        .post("/v1/releases/{service}/{version}", Admin, push_release)
        .post(
            "/v1/releases/{service}/{version}/signatures",
            Admin,
            sign_release,
        )
        .get("/v1/releases/{service}/{version}", Read, get_release)
        .delete("/v1/releases/{service}/{version}", Admin, delete_release)
        .get(
            "/v1/releases/{service}/{version}/artifact",
            Download,
            artifact,
        )
        .get("/v1/rollouts", Read, list_rollouts)
        .post("/v1/rollouts", Operate, start_rollout)
        .get("/v1/rollouts/{id}", Read, get_rollout)
        .get("/v1/rollouts/{id}/summary", Read, get_rollout_summary)
        .post("/v1/plan", Read, plan_rollout)
        .post("/v1/rollouts/{id}/{command}", Operate, rollout_command)
        .get("/v1/services", Read, list_services)
        .post("/v1/services/{service}/finalize", Operate, finalize)
        .get("/v1/tokens", Admin, tokens::list)
        .post("/v1/tokens", Admin, tokens::create)
        .delete("/v1/tokens/{name}", Admin, tokens::revoke)
        .get("/v1/openapi.json", Read, openapi::document)
        .get("/v1/audit", Read, list_audit)
        .get(rollwave_api::EVENTS_PATH, Read, events::stream)
        .get("/metrics", Read, metrics)
        // The page and its files: the page asks for a token itself.
        .get("/", Public, ui::index)
        .get("/ui/{file}", Public, ui::asset)
}

/// Add routes to [`routes`], not here: this only adds what answers
/// everything else.
pub fn router(shared: Arc<Shared>) -> Router {
    let routes = routes();
    let access: crate::auth::AccessTable = Arc::new(routes.access_table());
    routes
        .into_router()
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                rollwave_api::ErrorCode::MethodNotAllowed,
                "method not allowed on this endpoint",
            )
        })
        // Innermost: what axum's extractors refuse (a query that does not
        // decode, a body over the limit) gets the same JSON error body as
        // the handlers' own errors.
        .layer(axum::middleware::map_response(crate::error::json_errors))
        // JSON bodies keep axum's default limit (2 MB); artifacts are read as
        // a stream, straight to disk, under their own limit (blobs.rs).
        // Innermost first: who is calling, then the audit trail (which
        // reads the caller off the response), then the request counter.
        .layer(axum::middleware::from_fn_with_state(
            (shared.clone(), access),
            crate::auth::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            count_request,
        ))
        .with_state(shared)
}

/// Counts every request by its route (the pattern, not the path: ids and
/// names would make one series per rollout) and times it. Routes are
/// labelled `/v1/rollouts/:id`: braces in label values trip up some
/// exposition parsers.
async fn count_request(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched".to_string(), |p| {
            p.as_str().replace('{', ":").replace('}', "")
        });
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    shared
        .metrics
        .request(&method, &route, response.status().as_u16(), seconds);
    response
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let agents = shared.sessions.connected();
    // Read in place, in the order `list_nodes` takes the same locks.
    let text = {
        let fleet = shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
        let live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
        shared.metrics.render(&live, &fleet, agents)
    };
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "meta",
    responses(
        (status = 200, description = "The control plane is up", body = rollwave_api::HealthResponse),
    )
)]
async fn health(State(shared): State<Arc<Shared>>) -> Json<rollwave_api::HealthResponse> {
    Json(rollwave_api::HealthResponse {
        status: "ok".into(),
        agents_connected: shared.sessions.connected(),
        leader: true,
        // Among replicas, its own address; alone, none to name.
        leader_url: shared.copies.as_ref().map(|c| c.address().to_string()),
    })
}

#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "fleet",
    params(PageQuery),
    responses(
        (status = 200, description = "Every known node, by name; with `limit`, a page of them, the next page in the `Link` header", body = Vec<NodeView>,
            headers(("link" = String, description = "`<...>; rel=\"next\"`: the address of the next page, when there is one"))),
        (status = 400, description = "A limit out of range", body = rollwave_api::ErrorBody),
    )
)]
async fn list_nodes(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    let limit = q.limit(None)?;
    let mut page: Vec<NodeView> = {
        let fleet = shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
        let after = q.cursor.as_deref().unwrap_or("");
        let from = fleet
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .map(|(_, v)| v.clone());
        match limit {
            Some(n) => from.take(n + 1).collect(),
            None => from.collect(),
        }
    };
    let next = match limit {
        Some(n) if page.len() > n => {
            page.truncate(n);
            page.last().map(|v| v.name.clone())
        }
        _ => None,
    };
    let live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
    let mut by_name: std::collections::HashMap<String, usize> = page
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.clone(), i))
        .collect();
    // What completed rollouts still want of the nodes they could not reach.
    for r in live.values().filter(|r| r.converging()) {
        for (name, n) in &r.nodes {
            let converging = n.state == NodeState::Converging;
            if n.state != NodeState::Unreachable && !converging {
                continue;
            }
            let Some(s) = by_name
                .get_mut(name)
                .and_then(|i| page[*i].services.get_mut(&r.spec.service))
            else {
                continue;
            };
            if s.version.as_deref() != Some(r.spec.version.as_str()) {
                s.desired = Some(r.spec.version.clone());
                s.converging = converging;
            }
        }
    }
    drop(live);
    Ok(paged(Json(page).into_response(), "/v1/nodes", limit, next))
}

/// A page of a list: `?limit=N` items from after `?cursor=C` (the last
/// item of the page before, as the `Link` header of that page gives it).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// How many items, 1 to 1,000. Lists of rollouts default to 100;
    /// the node list is whole without it.
    limit: Option<String>,
    /// Where the page starts: the value in the `Link` header's `rel="next"`
    /// address of the page before.
    cursor: Option<String>,
}

/// The largest page a list answers.
const MAX_PAGE: usize = 1_000;

impl PageQuery {
    fn limit(&self, default: Option<usize>) -> ApiResult<Option<usize>> {
        let Some(text) = &self.limit else {
            return Ok(default);
        };
        match text.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad_request(format!(
                "limit: {text:?} is not a whole number between 1 and {MAX_PAGE}"
            ))),
        }
    }
}

/// Adds `Link: <path?limit=N&cursor=C>; rel="next"` when there is a next
/// page, as GitHub's API does: the body stays a plain list.
fn paged(mut resp: Response, path: &str, limit: Option<usize>, next: Option<String>) -> Response {
    if let (Some(limit), Some(next)) = (limit, next) {
        let sep = if path.ends_with(['?', '&']) { "" } else { "?" };
        let link = format!("<{path}{sep}limit={limit}&cursor={next}>; rel=\"next\"");
        if let Ok(value) = header::HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, value);
        }
    }
    resp
}

/// Each service the fleet runs or has an active version for: its active
/// version and how many nodes run each version.
#[utoipa::path(
    get,
    path = "/v1/services",
    tag = "services",
    responses(
        (status = 200, description = "Every service, by name", body = Vec<ServiceSummary>),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn list_services(State(shared): State<Arc<Shared>>) -> ApiResult<Json<Vec<ServiceSummary>>> {
    let mut by: std::collections::BTreeMap<String, ServiceSummary> = Default::default();
    for a in shared.store.list_active_versions().await? {
        by.insert(
            a.service.clone(),
            ServiceSummary {
                service: a.service.clone(),
                active: Some(a),
                running: Default::default(),
            },
        );
    }
    let fleet = shared
        .fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for n in fleet.values() {
        for (name, s) in &n.services {
            let entry = by.entry(name.clone()).or_insert_with(|| ServiceSummary {
                service: name.clone(),
                active: None,
                running: Default::default(),
            });
            let v = s.version.clone().unwrap_or_else(|| "none".into());
            *entry.running.entry(v).or_default() += 1;
        }
    }
    Ok(Json(by.into_values().collect()))
}

#[utoipa::path(
    post,
    path = "/v1/services/{service}/finalize",
    tag = "services",
    params(("service" = String, Path, description = "Service name: 1-64 characters of a-z, A-Z, 0-9, -, _, ., not starting with .")),
    request_body(
        content = Option<Finalize>,
        description = "May be empty: then the newest version any node runs",
    ),
    responses(
        (status = 200, description = "The active version (`changed` false if it already was)", body = FinalizeResponse),
        (status = 400, description = "Invalid service name, version or body", body = rollwave_api::ErrorBody),
        (status = 404, description = "No node runs the service", body = rollwave_api::ErrorBody),
        (status = 409, description = "A node runs an older version, or the version is below the active one", body = rollwave_api::ErrorBody),
        (status = 413, description = "Body above 2 MB, refused by the HTTP layer in plain text", content_type = "text/plain", body = String),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn finalize(
    State(shared): State<Arc<Shared>>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult<Json<FinalizeResponse>> {
    let req: Finalize = if body.is_empty() {
        Finalize::default()
    } else {
        crate::json_body("finalize request", &body)?
    };
    Ok(Json(shared.reconciler.finalize(service, req.to).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// How many entries, 1 to 10,000 (default 100).
    limit: Option<usize>,
    /// Only entries with a smaller id: the next page back.
    before: Option<u64>,
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "The audit trail, newest first", body = Vec<AuditEntry>),
        (status = 400, description = "A limit out of range", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
/// The audit trail, newest first: `?limit=` (default 100, at most 10,000)
/// and `?before=ID` to page back.
async fn list_audit(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad_request(format!(
            "limit: {limit} is not between 1 and 10000"
        )));
    }
    Ok(Json(shared.store.list_audit(limit, q.before).await?))
}

#[utoipa::path(
    get,
    path = "/v1/releases",
    tag = "releases",
    responses(
        (status = 200, description = "Every release", body = Vec<Release>),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn list_releases(State(shared): State<Arc<Shared>>) -> ApiResult<Json<Vec<Release>>> {
    Ok(Json(shared.store.list_releases().await?))
}

/// Checks a release's service name and version (core's rules, one place
/// for every route) and gives the version in the form it is stored under.
fn release_key(service: &str, version: &str) -> ApiResult<String> {
    validate_service_name("service", service)?;
    Ok(normalize_version("version", version)?)
}

#[utoipa::path(
    get,
    path = "/v1/releases/{service}/{version}",
    tag = "releases",
    params(
        ("service" = String, Path, description = "Service name: 1-64 characters of a-z, A-Z, 0-9, -, _, ., not starting with ."),
        ("version" = String, Path, description = "Semantic version, like 2.0.0 or 2.1.0-rc.1+build.7: digits, letters, -, ., +, at most 128 bytes; surrounding whitespace is dropped"),
    ),
    responses(
        (status = 200, description = "The release", body = Release),
        (status = 400, description = "Invalid service name or version", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such release", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn get_release(
    State(shared): State<Arc<Shared>>,
    Path((service, version)): Path<(String, String)>,
) -> ApiResult<Json<Release>> {
    let version = release_key(&service, &version)?;
    let release = shared
        .store
        .get_release(&service, &version)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("release {service}@{version} not found")))?;
    Ok(Json(release))
}

#[derive(Deserialize)]
struct PushQuery {
    filename: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/releases/{service}/{version}",
    tag = "releases",
    params(
        ("service" = String, Path, description = "Service name: 1-64 characters of a-z, A-Z, 0-9, -, _, ., not starting with ."),
        ("version" = String, Path, description = "Semantic version, like 2.0.0 or 2.1.0-rc.1+build.7: digits, letters, -, ., +, at most 128 bytes; surrounding whitespace is dropped"),
        ("filename" = Option<String>, Query, description = "The artifact's file name (default: the service name)"),
        ("rollwave-signature" = Option<String>, Header, description = "The release's minisign signature: the text of its .minisig file (prehashed, as minisign makes by default), base64 encoded. The control plane checks that it parses and stores it; agents with trusted keys verify it over the artifact and require its trusted comment to name `service@version`, as `rollwave release <service>@<version> sha256:<hex>` does. Pushing the same bytes again with another signature adds it beside those the release has (up to 16)"),
    ),
    request_body(
        description = "The artifact: a .tar.gz (may hold a rollwave.toml) or an executable (ELF or #! script), streamed to disk",
        content(("application/octet-stream")),
    ),
    responses(
        (status = 201, description = "Stored", body = PushResponse),
        (status = 200, description = "The same content was pushed before (`created` false); `signature_added` when this push signed it", body = PushResponse),
        (status = 400, description = "Invalid name or version, empty or unrecognised artifact, invalid rollwave.toml, or a signature header that is not a minisign signature", body = rollwave_api::ErrorBody),
        (status = 409, description = "The version exists with other content (releases are immutable), or carries 16 signatures already", body = rollwave_api::ErrorBody),
        (status = 413, description = "Artifact above the size limit", body = rollwave_api::ErrorBody),
        (status = 500, description = "Writing the artifact or the store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn push_release(
    State(shared): State<Arc<Shared>>,
    Path((service, version)): Path<(String, String)>,
    Query(query): Query<PushQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let version = release_key(&service, &version)?;
    // Before the upload: a bad header refuses the push without storing a byte.
    let signature = push_signature(&headers)?;
    let upload = shared
        .blobs
        .receive(body.into_data_stream())
        .await
        .map_err(|e| match e {
            UploadError::TooLarge(_) => {
                ApiError::new(rollwave_api::ErrorCode::PayloadTooLarge, e.to_string())
            }
            UploadError::Empty => ApiError::bad_request(e.to_string()),
            UploadError::Read(_) => ApiError::bad_request(e.to_string()),
            UploadError::Io(_) => ApiError::internal(e.to_string()),
        })?;
    // Sniffed, not declared: a gzip stream is a tarball, anything else must
    // be an executable the agent runs as is.
    let format = if upload.head.starts_with(&[0x1f, 0x8b]) {
        ArtifactFormat::TarGz
    } else if upload.head.starts_with(b"\x7fELF") || upload.head.starts_with(b"#!") {
        ArtifactFormat::Executable
    } else {
        discard(&upload.tmp).await?;
        return Err(ApiError::bad_request(
            "artifact is neither a .tar.gz nor an executable (ELF binary or #! script)",
        ));
    };
    let manifest = match format {
        ArtifactFormat::TarGz => match release_manifest(&upload.tmp).await {
            Ok(m) => m,
            Err(e) => {
                discard(&upload.tmp).await?;
                return Err(ApiError::bad_request(format!(
                    "release {service}@{version} refused: {e}"
                )));
            }
        },
        ArtifactFormat::Executable => None,
    };
    let release = Release {
        service: service.clone(),
        version: version.clone(),
        sha256: upload.sha256.clone(),
        size: upload.size,
        format,
        filename: query.filename.unwrap_or_else(|| service.clone()),
        created_at: now_ms(),
        manifest,
        signatures: signature.iter().map(signature_record).collect(),
    };
    // The blob is durable, here and on every replica, before the release
    // that names it; under the blob's lock, so that a delete of a release
    // with the same bytes cannot remove the blob in between.
    let _held = shared.blobs.lock(&upload.sha256).await;
    shared.blobs.commit(&upload).await?;
    if let Some(copies) = &shared.copies {
        copies.spread(&upload.sha256).await.map_err(|e| {
            ApiError::new(
                rollwave_api::ErrorCode::Unavailable,
                format!("release {service}@{version} not stored: the artifact could not be copied to every replica ({e}); push it again"),
            )
        })?;
    }
    let put = shared.store.put_release(&release).await?;
    if let PutRelease::Created(release) = put {
        tracing::info!(service = %service, version = %version, sha256 = %release.sha256, size = release.size, signed_by = %release.signers(), "release pushed");
        let signed = match release.signatures.first() {
            Some(s) => format!(", signed by key id {}", s.key_id),
            None => String::new(),
        };
        let note = AuditNote(format!(
            "pushed sha256 {}, {} bytes{signed}",
            release.sha256, release.size
        ));
        return Ok((
            StatusCode::CREATED,
            Extension(note),
            Json(PushResponse {
                release,
                created: true,
                signature_added: false,
            }),
        )
            .into_response());
    }
    answer_repush(&shared, put, &release, signature.as_ref())
}

#[utoipa::path(
    delete,
    path = "/v1/releases/{service}/{version}",
    tag = "releases",
    params(
        ("service" = String, Path, description = "Service name: 1-64 characters of a-z, A-Z, 0-9, -, _, ., not starting with ."),
        ("version" = String, Path, description = "Semantic version, like 2.0.0; surrounding whitespace is dropped"),
    ),
    responses(
        (status = 200, description = "Deleted, with its signatures; its artifact too unless another release has the same bytes (`shared_with`)", body = DeleteReleaseResponse),
        (status = 400, description = "Invalid service name or version", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such release", body = rollwave_api::ErrorBody),
        (status = 409, description = "In use: a rollout not finished targets it or may roll nodes back to it, it is the service's active version, or a node runs it or ran it last. The message names which", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
/// Deletes a release nothing uses, then its artifact once no other release
/// names the same bytes.
async fn delete_release(
    State(shared): State<Arc<Shared>>,
    Path((service, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    let version = release_key(&service, &version)?;
    let found = shared
        .store
        .get_release(&service, &version)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("release {service}@{version} not found")))?;
    // Held until the artifact is dealt with: a push of the same bytes
    // waits, so the artifact is never removed under a release it stores.
    let held = shared.blobs.lock(&found.sha256).await;
    let release = shared
        .reconciler
        .delete_release(service.clone(), version.clone(), found.sha256.clone())
        .await?;
    let sha = &release.sha256;
    let shared_with: Vec<String> = shared
        .store
        .list_releases()
        .await?
        .into_iter()
        .filter(|r| &r.sha256 == sha)
        .map(|r| format!("{}@{}", r.service, r.version))
        .collect();
    let artifact_removed = if shared_with.is_empty() {
        // The release is gone either way: an artifact that could not be
        // removed now is removed by the next sweep.
        match shared.blobs.remove(sha, &held).await {
            Ok(_) => {
                if let Some(copies) = &shared.copies {
                    copies.remove(sha).await;
                }
                true
            }
            Err(e) => {
                tracing::warn!(sha256 = %sha, error = %e, "removing the artifact of a deleted release");
                false
            }
        }
    } else {
        false
    };
    drop(held);
    let note = AuditNote(if artifact_removed {
        format!(
            "deleted sha256 {sha}, {} bytes, and its artifact",
            release.size
        )
    } else if shared_with.is_empty() {
        format!("deleted sha256 {sha}; its artifact could not be removed yet")
    } else {
        format!(
            "deleted sha256 {sha}; its artifact stays for {}",
            shared_with.join(", ")
        )
    });
    Ok((
        Extension(note),
        Json(DeleteReleaseResponse {
            release,
            artifact_removed,
            shared_with,
        }),
    )
        .into_response())
}

/// Answers a push onto a release that exists, or a signature added to one.
fn answer_repush(
    shared: &Shared,
    put: PutRelease,
    pushed: &Release,
    signature: Option<&ReleaseSignature>,
) -> ApiResult<Response> {
    let (service, version) = (&pushed.service, &pushed.version);
    match put {
        PutRelease::Created(release) | PutRelease::Unchanged(release) => {
            Ok(Json(PushResponse {
                release,
                created: false,
                signature_added: false,
            })
            .into_response())
        }
        PutRelease::Signed(release) => {
            let id = signature.map(|s| s.key_id()).unwrap_or_default();
            tracing::info!(service = %service, version = %version, signed_by = %id, signers = %release.signers(), "release signed");
            shared.reconciler.send(Event::ReleaseSigned {
                service: service.clone(),
                version: version.clone(),
            });
            let note = AuditNote(format!("signed by key id {id}"));
            Ok((
                Extension(note),
                Json(PushResponse {
                    release,
                    created: false,
                    signature_added: true,
                }),
            )
                .into_response())
        }
        PutRelease::Conflict(existing) => Err(ApiError::conflict(format!(
            "release {service}@{version} already exists with sha256 {}, this upload has sha256 {}: releases are immutable, push a new version",
            existing.sha256, pushed.sha256
        ))),
        PutRelease::TooManySignatures(existing) => Err(ApiError::conflict(format!(
            "release {service}@{version} carries {} signatures already (key ids {}), the most one release may: push a new version",
            existing.signatures.len(),
            existing.signers(),
        ))),
    }
}

#[utoipa::path(
    post,
    path = "/v1/releases/{service}/{version}/signatures",
    tag = "releases",
    params(
        ("service" = String, Path, description = "Service name"),
        ("version" = String, Path, description = "Semantic version, like 2.0.0"),
        ("rollwave-signature" = String, Header, description = "The signature to add: the text of a .minisig file of the release's bytes, base64 encoded, as for a push"),
    ),
    responses(
        (status = 200, description = "The release; `signature_added` false when it carried this signature already (same key and trusted comment)", body = PushResponse),
        (status = 400, description = "Invalid name or version, or a missing or malformed signature header", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such release", body = rollwave_api::ErrorBody),
        (status = 409, description = "The release carries 16 signatures already", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
/// Adds a signature to a release without uploading its bytes again: agents
/// install it when any of its signatures is by a key they trust.
async fn sign_release(
    State(shared): State<Arc<Shared>>,
    Path((service, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    release_key(&service, &version)?;
    let signature = push_signature(&headers)?.ok_or_else(|| {
        ApiError::bad_request(format!(
            "{SIGNATURE_HEADER} header: missing; it holds the .minisig text to add, base64 encoded"
        ))
    })?;
    let record = signature_record(&signature);
    let put = shared
        .store
        .sign_release(&service, &version, &record)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("release {service}@{version} not found")))?;
    let pushed = match &put {
        PutRelease::Created(r)
        | PutRelease::Unchanged(r)
        | PutRelease::Signed(r)
        | PutRelease::Conflict(r)
        | PutRelease::TooManySignatures(r) => r.clone(),
    };
    answer_repush(&shared, put, &pushed, Some(&signature))
}

fn signature_record(signature: &ReleaseSignature) -> SignatureRecord {
    SignatureRecord {
        key_id: signature.key_id().to_string(),
        text: signature.text().to_string(),
    }
}

/// The signature of a push, from its header, parsed; none without the header.
fn push_signature(headers: &HeaderMap) -> ApiResult<Option<ReleaseSignature>> {
    let Some(value) = headers.get(SIGNATURE_HEADER) else {
        return Ok(None);
    };
    let bad = |why: String| ApiError::bad_request(format!("{SIGNATURE_HEADER} header: {why}"));
    let encoded = value
        .to_str()
        .map_err(|_| bad("not ASCII; it holds the .minisig text base64 encoded".into()))?;
    let bytes = BASE64
        .decode(encoded.trim())
        .map_err(|e| bad(format!("not base64: {}", e.to_string().to_lowercase())))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| bad("the decoded signature is not UTF-8 text".into()))?;
    ReleaseSignature::parse(&text)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// Reads and validates the archive's `rollwave.toml`: a release whose
/// manifest no agent would accept is refused at the door.
async fn release_manifest(archive: &std::path::Path) -> Result<Option<ReleaseManifest>, String> {
    let path = archive.to_path_buf();
    let scan = tokio::task::spawn_blocking(move || crate::blobs::read_manifest(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the archive is unreadable: {e}"))?;
    let text = match scan {
        crate::blobs::ManifestScan::Found(text) => text,
        crate::blobs::ManifestScan::Absent => return Ok(None),
        crate::blobs::ManifestScan::Beyond => {
            tracing::warn!(
                archive = %archive.display(),
                "no rollwave.toml among the archive's first {} entries and {}: the release has no manifest, and agents refuse one placed further on",
                rollwave_core::MANIFEST_SCAN_ENTRIES,
                rollwave_core::format_bytes(rollwave_core::MANIFEST_SCAN_BYTES),
            );
            return Ok(None);
        }
    };
    let manifest = ReleaseManifest::parse(&text).map_err(|e| e.to_string())?;
    Ok((!manifest.is_empty()).then_some(manifest))
}

#[utoipa::path(
    get,
    path = "/v1/releases/{service}/{version}/artifact",
    tag = "releases",
    params(
        ("service" = String, Path, description = "Service name: 1-64 characters of a-z, A-Z, 0-9, -, _, ., not starting with ."),
        ("version" = String, Path, description = "Semantic version, like 2.0.0 or 2.1.0-rc.1+build.7: digits, letters, -, ., +, at most 128 bytes; surrounding whitespace is dropped"),
        ("Range" = Option<String>, Header, description = "One byte range, `bytes=a-b`, `bytes=a-` or `bytes=-n`, to resume a download; a multi-range, malformed or non-byte range is answered with the whole artifact"),
    ),
    responses(
        (status = 200, description = "The artifact's bytes, as pushed (always with `Accept-Ranges: bytes`)", content(("application/octet-stream"))),
        (status = 206, description = "The range asked for, with `Content-Range: bytes a-b/SIZE`", content(("application/octet-stream"))),
        (status = 400, description = "Invalid service name or version", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such release", body = rollwave_api::ErrorBody),
        (status = 416, description = "The range starts beyond the artifact; `Content-Range: bytes */SIZE` gives its size", body = rollwave_api::ErrorBody),
        (status = 429, description = "`--max-downloads` artifacts are being streamed already: retry after `Retry-After` seconds", body = rollwave_api::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before asking again"))),
        (status = 500, description = "Reading the artifact or the store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn artifact(
    State(shared): State<Arc<Shared>>,
    Path((service, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    use crate::downloads::{self, Range};
    let version = release_key(&service, &version)?;
    // Before any work: past the cap, refusing must cost next to nothing.
    let permit = match shared.downloads.try_start() {
        Ok(permit) => permit,
        Err(busy) => return Ok(busy.into_response()),
    };
    let release = shared
        .store
        .get_release(&service, &version)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("release {service}@{version} not found")))?;
    // Never serve bytes that are not what the release names: agents would
    // refuse them after the whole download.
    shared
        .blobs
        .verify(&release.sha256)
        .await
        .map_err(ApiError::internal)?;
    let path = shared.blobs.path(&release.sha256);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(format!("opening artifact {}: {e}", path.display())))?;
    let len = file.metadata().await?.len();
    let asked = headers.get(header::RANGE);
    match downloads::parse_range(asked, len) {
        Range::Unsatisfiable => Ok(downloads::unsatisfiable(asked, len)),
        range => downloads::serve(file, len, range, permit).await,
    }
}

#[utoipa::path(
    get,
    path = "/v1/rollouts",
    tag = "rollouts",
    params(PageQuery, RolloutFilter),
    responses(
        (status = 200, description = "A page of rollouts, newest first, as summaries (counts of nodes per state, the problems): `GET /v1/rollouts/{id}` has the nodes and the log. The next page, if any, is in the `Link` header", body = Vec<RolloutSummary>,
            headers(("link" = String, description = "`<...>; rel=\"next\"`: the address of the next page, when there is one"))),
        (status = 400, description = "A limit out of range, a cursor that is not a rollout id, or `active` neither true nor false", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn list_rollouts(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<PageQuery>,
    Query(filter): Query<RolloutFilter>,
) -> ApiResult<Response> {
    let limit = q.limit(Some(100))?.unwrap_or(100);
    let before = match q.cursor.as_deref() {
        None => None,
        Some(c) => Some(
            c.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("cursor: {c:?} is not a rollout id")))?,
        ),
    };
    let service = filter.service.as_deref();
    match filter.active.as_deref() {
        None | Some("false") => {}
        Some("true") => {
            // What the reconciler watches, from memory: a handful, never
            // the whole history.
            let mut active: Vec<RolloutSummary> = {
                let live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
                live.values()
                    .filter(|r| r.is_active() && service.is_none_or(|s| r.spec.service == s))
                    .filter(|r| before.is_none_or(|b| r.id < b))
                    .map(|r| RolloutSummary::of(r))
                    .collect()
            };
            active.sort_by_key(|s| std::cmp::Reverse(s.id));
            active.truncate(limit);
            return Ok(Json(active).into_response());
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "active: {other:?} is neither true nor false"
            )))
        }
    }
    let mut page = Vec::new();
    let mut from = before;
    // One service's rollouts: pages of the history, newest first, until
    // the page is full (the store keeps no index by service; retention
    // bounds the history).
    loop {
        let batch = shared.store.list_rollout_summaries(limit + 1, from).await?;
        let done = batch.len() <= limit;
        from = batch.last().map(|s| s.id);
        page.extend(
            batch
                .into_iter()
                .filter(|s| service.is_none_or(|name| s.service == name)),
        );
        if done || page.len() > limit {
            break;
        }
    }
    let next = (page.len() > limit).then(|| {
        page.truncate(limit);
        page.last().map(|s| s.id.to_string())
    });
    // Active rollouts as the reconciler holds them now, steps not yet
    // written included.
    let live: Vec<Arc<rollwave_core::Rollout>> = {
        let live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
        page.iter()
            .filter_map(|s| live.get(&s.id).cloned())
            .collect()
    };
    for r in live {
        if let Some(s) = page.iter_mut().find(|s| s.id == r.id) {
            *s = RolloutSummary::of(&r);
        }
    }
    let path = match service {
        Some(s) => format!("/v1/rollouts?service={s}&"),
        None => "/v1/rollouts?".to_string(),
    };
    Ok(paged(
        Json(page).into_response(),
        &path,
        Some(limit),
        next.flatten(),
    ))
}

/// Which rollouts a list holds.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RolloutFilter {
    /// Only this service's rollouts.
    service: Option<String>,
    /// `true`: only the rollouts still in progress (running, paused,
    /// rolling back), newest first, on one page.
    active: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/rollouts/{id}/summary",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id")),
    responses(
        (status = 200, description = "The rollout in a few lines: counts of nodes per state and the nodes with a problem (at most 20, with how many in all), without the node list or the log", body = RolloutSummary),
        (status = 400, description = "The id is not a number", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such rollout", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn get_rollout_summary(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutSummary>> {
    let id = parse_id(&id)?;
    if let Some(r) = live_rollout(&shared, id) {
        return Ok(Json(RolloutSummary::of(&r)));
    }
    let found = shared
        .store
        .list_rollout_summaries(1, id.checked_add(1))
        .await?
        .into_iter()
        .find(|s| s.id == id);
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("rollout {id} not found")))
}

/// An active rollout as the reconciler holds it now, steps not yet written
/// included; `None` once it has left the reconciler (read the store).
fn live_rollout(shared: &Shared, id: u64) -> Option<Arc<rollwave_core::Rollout>> {
    shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned()
}

fn parse_id(id: &str) -> ApiResult<u64> {
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("rollout id {id:?} is not a number")))
}

#[utoipa::path(
    get,
    path = "/v1/rollouts/{id}",
    tag = "rollouts",
    params(("id" = u64, Path, description = "Rollout id")),
    responses(
        (status = 200, description = "The rollout, as the reconciler holds it now (`dependents` is always empty here)", body = RolloutResponse),
        (status = 400, description = "The id is not a number", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such rollout", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn get_rollout(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutResponse>> {
    let id = parse_id(&id)?;
    let rollout = match live_rollout(&shared, id) {
        Some(r) => Arc::unwrap_or_clone(r),
        None => shared
            .store
            .get_rollout(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("rollout {id} not found")))?,
    };
    Ok(Json(RolloutResponse {
        rollout,
        dependents: Vec::new(),
        plan_id: None,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/rollouts",
    tag = "rollouts",
    request_body = StartRollout,
    responses(
        (status = 201, description = "Started: the first rollout, and one per further service in dependency order", body = RolloutResponse),
        (status = 400, description = "Invalid spec (the message names the field), a plan the fleet cannot meet, an undeclared downgrade, or an analysis whose trial query failed (`analysis[i].query`: Prometheus rejected it; `analysis[i].prometheus`: no answer)", body = rollwave_api::ErrorBody),
        (status = 403, description = "The token may not start rollouts, or the spec has control-plane exec hooks and the token is not an admin's", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such release", body = rollwave_api::ErrorBody),
        (status = 409, description = "Refused: a rollout of the service is active, or the version is below the active one", body = rollwave_api::ErrorBody),
        (status = 413, description = "Body above 2 MB, refused by the HTTP layer in plain text", content_type = "text/plain", body = String),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn start_rollout(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: StartRollout = crate::json_body("rollout request", &body)?;
    // An exec hook runs on this machine, as the control plane's user:
    // operators may start rollouts, not run commands here.
    let command = req
        .spec
        .hooks
        .as_ref()
        .and_then(|h| h.control_plane_command());
    if let (Some(field), false) = (command, caller.role == rollwave_core::Role::Admin) {
        return Err(ApiError::new(
            rollwave_api::ErrorCode::Forbidden,
            format!("{field}: exec hooks run commands on the control plane and need an admin token; token {:?} has the {} role", caller.name, caller.role),
        ));
    }
    // Before the reconciler, which must not wait on a Prometheus.
    crate::analysis::check(&req.spec).await?;
    let started = shared.reconciler.start(req.spec, req.plan_id).await?;
    let what: Vec<String> = started
        .iter()
        .map(|r| format!("rollout {} of {}@{}", r.id, r.spec.service, r.spec.version))
        .collect();
    let note = AuditNote(format!("started {}", what.join(", ")));
    let ids: Vec<String> = started.iter().map(|r| r.id.to_string()).collect();
    let target = AuditTarget(match ids.as_slice() {
        [one] => format!("rollout {one}"),
        several => format!("rollouts {}", several.join(", ")),
    });
    Ok((
        StatusCode::CREATED,
        Extension(note),
        Extension(target),
        Json(group_response(started)),
    )
        .into_response())
}

/// A dry run: the plan `POST /v1/rollouts` would make now, stored nowhere.
#[utoipa::path(
    post,
    path = "/v1/plan",
    tag = "rollouts",
    request_body = StartRollout,
    responses(
        (status = 200, description = "The rollouts `POST /v1/rollouts` would start now, stored nowhere, and the plan's `plan_id`", body = RolloutResponse),
        (status = 400, description = "Invalid spec (the message names the field), a plan the fleet cannot meet, or an analysis whose trial query failed (`analysis[i].query`: Prometheus rejected it; `analysis[i].prometheus`: no answer)", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such release", body = rollwave_api::ErrorBody),
        (status = 409, description = "Starting it would be refused: a downgrade not asked for or below the active version, or another rollout of the service in progress", body = rollwave_api::ErrorBody),
        (status = 413, description = "Body above 2 MB, refused by the HTTP layer in plain text", content_type = "text/plain", body = String),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn plan_rollout(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> ApiResult<Json<RolloutResponse>> {
    let req: StartRollout = crate::json_body("rollout request", &body)?;
    crate::analysis::check(&req.spec).await?;
    let planned = shared.reconciler.plan(req.spec).await?;
    let plan_id = rollwave_core::plan_id(&planned);
    Ok(Json(RolloutResponse {
        plan_id: Some(plan_id),
        ..group_response(planned)
    }))
}

/// How many nodes a rollback sends back at once, from its optional body.
fn rollback_batch(body: &[u8]) -> ApiResult<Option<rollwave_core::Amount>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let req: rollwave_api::RollbackRequest = crate::json_body("rollback request", body)?;
    match (req.batch, req.all_at_once) {
        (Some(_), true) => Err(ApiError::bad_request(
            "batch: give a batch or all_at_once, not both",
        )),
        (None, true) => Ok(Some(rollwave_core::Amount::Percent(100))),
        (Some(b), false) => {
            let amount = rollwave_core::Amount::parse("batch", &b)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if matches!(
                amount,
                rollwave_core::Amount::Count(0) | rollwave_core::Amount::Percent(0)
            ) {
                return Err(ApiError::bad_request(format!(
                    "batch: {b:?} sends no node back; at least 1"
                )));
            }
            Ok(Some(amount))
        }
        (None, false) => Ok(None),
    }
}

/// The first rollout of a request, with the ones that depend on it.
fn group_response(mut rollouts: Vec<rollwave_core::Rollout>) -> RolloutResponse {
    let rollout = rollouts.remove(0);
    RolloutResponse {
        rollout,
        dependents: rollouts,
        plan_id: None,
    }
}

#[utoipa::path(
    post,
    path = "/v1/rollouts/{id}/{command}",
    tag = "rollouts",
    params(
        ("id" = u64, Path, description = "Rollout id"),
        ("command" = inline(rollwave_api::RolloutCommand), Path, description = "The operator command"),
    ),
    request_body(content = Option<rollwave_api::RollbackRequest>, description = "For `rollback` only, optional: how many nodes go back at once (default: the rollout's `max_unavailable`)"),
    responses(
        (status = 200, description = "The rollout after the command", body = RolloutResponse),
        (status = 400, description = "The id is not a number, or a rollback's body is not valid", body = rollwave_api::ErrorBody),
        (status = 404, description = "No such rollout, or no such command", body = rollwave_api::ErrorBody),
        (status = 409, description = "The command does not apply in the rollout's state", body = rollwave_api::ErrorBody),
        (status = 500, description = "The store failed", body = rollwave_api::ErrorBody),
    )
)]
async fn rollout_command(
    State(shared): State<Arc<Shared>>,
    Path((id, command)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<RolloutResponse>> {
    let id = parse_id(&id)?;
    let command = match command.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "cancel" => Command::Cancel,
        "rollback" => Command::Rollback(rollback_batch(&body)?),
        "promote" => Command::Promote,
        other => {
            return Err(ApiError::not_found(format!(
                "no rollout command {other:?} (pause, resume, cancel, rollback, promote)"
            )))
        }
    };
    let rollout = shared.reconciler.command(id, command).await?;
    Ok(Json(RolloutResponse {
        rollout,
        dependents: Vec::new(),
        plan_id: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_HEADER, value.parse().unwrap());
        h
    }

    #[test]
    fn a_push_signature_is_read_from_its_header_or_refused_naming_it() {
        assert!(push_signature(&HeaderMap::new()).unwrap().is_none());

        let minisign::KeyPair { pk, sk } =
            minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let text = minisign::sign(
            Some(&pk),
            &sk,
            &b"bytes"[..],
            Some("rollwave release api@2.0.0"),
            None,
        )
        .unwrap()
        .into_string();
        let crlf = text.replace('\n', "\r\n");
        let sig = push_signature(&header(&BASE64.encode(&crlf)))
            .unwrap()
            .unwrap();
        assert_eq!(sig.text(), text, "stored as minisign writes it");
        assert!(pk.to_box().unwrap().into_string().contains(sig.key_id()));

        for (value, want) in [
            ("%%%", "rollwave-signature header: not base64"),
            (
                &BASE64.encode([0xff, 0xfe]),
                "rollwave-signature header: the decoded signature is not UTF-8 text",
            ),
            (
                &BASE64.encode(text.replace("\ntrusted comment: ", "\ncomment: ")),
                "rollwave-signature header: signature is not a minisign signature: line 3 must start with \"trusted comment: \"",
            ),
        ] {
            let err = push_signature(&header(value)).unwrap_err();
            assert_eq!(err.code, rollwave_api::ErrorCode::BadRequest);
            assert!(err.message.starts_with(want), "{}", err.message);
        }
    }
}
