//! The control plane: HTTP API, agent sessions and the rollout reconciler.
//!
//! Data flow: agents hold a WebSocket session ([`session`]) over which they
//! report their services and receive tasks; the [`reconciler`] owns every
//! active rollout, runs the pure planner on each change and persists each
//! decision in the [`Store`] before sending the tasks it implies.

mod audit;
mod auth;
mod blobs;
mod downloads;
mod error;
mod events;
mod http;
mod metrics;
mod node_writes;
mod openapi;
mod reconciler;
mod routes;
mod serve;
mod session;
mod tokens;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rollwave_core::{Fleet, Timestamp};
use rollwave_store::{SqliteStore, Store};
use tokio::net::TcpListener;

pub use auth::{ADMIN_TOKEN_FILE, BOOTSTRAP_ADMIN};
pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// HTTPS with this certificate; plain HTTP without.
    pub tls: Option<rollwave_tls::ServerTls>,
    /// Artifact streams served at once; past it, `429` with `Retry-After`.
    pub max_downloads: usize,
    /// Header read timeout and the per-address cap on connections that have
    /// not sent a request.
    pub limits: ConnLimits,
}

pub use downloads::DEFAULT_MAX_DOWNLOADS;
pub use serve::{ConnLimits, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_PENDING_PER_IP};

/// State shared by the HTTP handlers, the sessions and the reconciler.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub blobs: blobs::Blobs,
    /// The cap on concurrent artifact streams.
    pub downloads: downloads::Downloads,
    /// The fleet as observed through agent sessions (and, for offline nodes,
    /// as last stored).
    pub fleet: Mutex<Fleet>,
    pub sessions: session::Sessions,
    /// The reconciler's active rollouts, for readers.
    pub live: Mutex<std::collections::BTreeMap<u64, Arc<rollwave_core::Rollout>>>,
    pub reconciler: reconciler::Handle,
    pub metrics: metrics::Metrics,
    /// Every change of a rollout or a node, for `GET /v1/events`.
    pub events: Arc<events::Events>,
    pub tokens: auth::Tokens,
    /// Node views waiting to be stored together.
    pub node_writes: Arc<node_writes::NodeWrites>,
}

/// Every service's active version, as agents receive it.
pub(crate) async fn active_versions(
    shared: &Shared,
) -> Result<std::collections::BTreeMap<String, String>, rollwave_store::StoreError> {
    Ok(shared
        .store
        .list_active_versions()
        .await?
        .into_iter()
        .map(|a| (a.service, a.version))
        .collect())
}

/// Decodes a JSON request body; the error names where in the body it is
/// wrong (`spec.strategy.max_failures: invalid value ...`), not only what.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    what: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::bad_request(format!("invalid {what}: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid {what}: {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))?;
    Ok(value)
}

pub(crate) fn now_ms() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Timestamp)
        .unwrap_or(0)
}

/// Opens the data dir, binds the listener and serves until `shutdown` resolves.
/// Prints `rollwave server listening on https://ADDR` (`http://` without
/// TLS) once ready.
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let db = config.data_dir.join("rollwave.db");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&db).with_context(|| format!("opening store {}", db.display()))?,
    );
    let blobs = blobs::Blobs::open(config.data_dir.join("blobs"))?;
    let mut fleet = Fleet::new();
    for node in store.list_nodes().await.context("loading nodes")? {
        fleet.insert(node.name.clone(), node);
    }
    let tokens = auth::Tokens::load(store.as_ref())
        .await
        .context("loading tokens")?;
    tokens
        .bootstrap(store.as_ref(), &config.data_dir)
        .await
        .context("creating the bootstrap admin token")?;
    let (handle, events) = reconciler::channel();
    let metrics = metrics::Metrics::new();
    let downloads = downloads::Downloads::new(
        config.max_downloads,
        metrics.downloads_in_flight.clone(),
        metrics.downloads_refused.clone(),
    );
    let shared = Arc::new(Shared {
        store,
        blobs,
        downloads,
        fleet: Mutex::new(fleet),
        sessions: session::Sessions::default(),
        live: Mutex::default(),
        reconciler: handle,
        metrics,
        events: Arc::new(events::Events::new(events::CAPACITY)),
        tokens,
        node_writes: Arc::default(),
    });
    shared.node_writes.clone().spawn(shared.store.clone());
    reconciler::spawn(shared.clone(), events)
        .await
        .context("loading rollouts")?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = match &config.tls {
        Some(tls) => {
            tracing::info!(%addr, data_dir = %config.data_dir.display(), pin = %tls.pin, "control plane started");
            "https"
        }
        None => {
            tracing::info!(%addr, data_dir = %config.data_dir.display(), "control plane started");
            tracing::warn!(%addr, "serving plain HTTP (--insecure-plain-http): anyone on the network path can read and alter requests, artifacts and agent sessions");
            "http"
        }
    };
    println!("rollwave server listening on {scheme}://{addr}");
    let stream = shared.events.clone();
    let app = http::router(shared);
    // Event streams never end by themselves: end them, or the graceful
    // shutdown would wait for every open dashboard.
    let shutdown = async move {
        shutdown.await;
        stream.close();
    };
    match config.tls {
        Some(tls) => {
            let listener = rollwave_tls::TlsListener::new(listener, tls.config);
            serve::serve(listener, app, config.limits, shutdown).await
        }
        None => serve::serve(listener, app, config.limits, shutdown).await,
    }
    Ok(())
}
