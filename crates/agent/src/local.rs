//! The agent's local HTTP endpoint, on the Unix socket `state_dir/agent.sock`
//! (`ROLLWAVE_AGENT_SOCKET` in every service's environment): how a service
//! asks the agent for its active version without parsing files.
//!
//! ```text
//! GET /v1/services/{name}/active-version   200 "2.0.0\n", or 404 with a one-line reason
//! GET /v1/active-versions                  200 {"api": "2.0.0", ...}, services with one set
//! ```
//!
//! Answers are read from the services' `active_version` files on every
//! request, so the endpoint can never disagree with them.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::UnixListener;

use crate::layout::ServiceDirs;

type Dirs = Arc<BTreeMap<String, ServiceDirs>>;

/// The endpoint's routes over the services configured on this node.
pub fn router(services: BTreeMap<String, ServiceDirs>) -> Router {
    Router::new()
        .route("/v1/services/{name}/active-version", get(service_version))
        .route("/v1/active-versions", get(all_versions))
        .with_state(Arc::new(services))
}

/// Binds the socket at `path`, replacing a stale one left by an agent that
/// died, but never one another agent is still serving. Must be called in a
/// tokio runtime. Errors name the socket path.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let named = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "agent socket {}: another agent is serving it (same state_dir?)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path).map_err(|e| named("removing the stale agent socket", e))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "agent socket {}: exists and is not a socket",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named("checking the agent socket", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| named("binding the agent socket", e))?;
    // Services may run as another user of the agent's group.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| named("setting the mode of the agent socket", e))?;
    Ok(listener)
}

/// Serves `router` on `listener` until the future is dropped.
pub async fn serve(listener: UnixListener, router: Router) -> io::Result<()> {
    axum::serve(listener, router).await
}

async fn service_version(State(dirs): State<Dirs>, UrlPath(name): UrlPath<String>) -> Response {
    let Some(d) = dirs.get(&name) else {
        return not_found(format!("no service named {name} on this node"));
    };
    match d.active_version() {
        Ok(Some(v)) => format!("{v}\n").into_response(),
        Ok(None) => not_found(format!("no active version set for service {name}")),
        Err(e) => unreadable(d, e),
    }
}

async fn all_versions(State(dirs): State<Dirs>) -> Response {
    let mut out = BTreeMap::new();
    for (name, d) in dirs.iter() {
        match d.active_version() {
            Ok(Some(v)) => {
                out.insert(name.clone(), v);
            }
            Ok(None) => {}
            Err(e) => return unreadable(d, e),
        }
    }
    Json(out).into_response()
}

fn not_found(message: String) -> Response {
    (StatusCode::NOT_FOUND, format!("{message}\n")).into_response()
}

fn unreadable(d: &ServiceDirs, e: io::Error) -> Response {
    let message = format!("reading {}: {e}\n", d.active_version_file().display());
    (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
}
