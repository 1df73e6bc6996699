//! The demo fleet's service: a small HTTP server whose version and behaviour
//! come from the release it runs (`release.toml` in the release directory).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};

/// The contents of a demo release's `release.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoRelease {
    pub version: String,
    /// A broken release answers 503 on /healthz forever.
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Nodes (by `ROLLWAVE_NODE`) on which this release is broken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broken_on: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Builds a demo release tarball in memory.
pub fn tarball(release: &DemoRelease) -> anyhow::Result<Vec<u8>> {
    let toml = toml::to_string(release)?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(toml.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, "release.toml", toml.as_bytes())?;
    Ok(builder.into_inner()?.finish()?)
}

pub async fn run(
    release_dir: &Path,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let path = release_dir.join("release.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let release: DemoRelease =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let version = release.version.clone();
    let node = std::env::var("ROLLWAVE_NODE").unwrap_or_default();
    let healthy = release.healthy && !release.broken_on.contains(&node);
    let app = Router::new()
        .route("/", get(move || async move { format!("api {version}\n") }))
        .route(
            "/healthz",
            get(move || async move {
                if healthy {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "this release is broken\n")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
