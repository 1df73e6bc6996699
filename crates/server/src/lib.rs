//! The control plane: HTTP API, agent sessions and the rollout reconciler.
//!
//! Data flow: agents hold a WebSocket session ([`session`]) over which they
//! report their services and receive tasks; the [`reconciler`] owns every
//! active rollout, runs the pure planner on each change and persists each
//! decision in the [`Store`] before sending the tasks it implies.

mod analysis;
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
mod replicas;
mod retention;
mod routes;
mod serve;
mod service_logs;
mod session;
mod tokens;
mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rollwave_core::{Fleet, Timestamp};
use rollwave_store::Store;
use tokio::net::TcpListener;

pub use auth::{ADMIN_TOKEN_FILE, BOOTSTRAP_ADMIN};
pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Release artifacts, the bootstrap admin token and, by default, the
    /// SQLite store.
    pub data_dir: PathBuf,
    /// Where the state lives; `None`: `sqlite:<data_dir>/rollwave.db`.
    pub store: Option<rollwave_store::StoreConfig>,
    /// Among replicas: the address the others pass requests to when this
    /// one leads (default: the scheme and the address it listens on).
    pub advertise_url: Option<String>,
    /// Among replicas over HTTPS: the CA the leader's certificate chains to.
    pub replica_ca_file: Option<PathBuf>,
    /// HTTPS with this certificate; plain HTTP without.
    pub tls: Option<rollwave_tls::ServerTls>,
    /// Artifact streams served at once; past it, `429` with `Retry-After`.
    pub max_downloads: usize,
    /// Header read timeout and the per-address cap on connections that have
    /// not sent a request.
    pub limits: ConnLimits,
    /// How much history (rollouts, audit entries) is kept.
    pub retention: Retention,
}

pub use retention::{
    Retention, DEFAULT_MAX_AUDIT_ENTRIES, DEFAULT_MAX_ROLLOUTS, DEFAULT_RETENTION,
};

pub use downloads::DEFAULT_MAX_DOWNLOADS;
pub use serve::{ConnLimits, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_PENDING_PER_IP};

/// The control plane could not start with what it was given (a store it
/// cannot open or use): the operator's input to fix, not a crash.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

/// State shared by the HTTP handlers, the sessions and the reconciler.
pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<blobs::Blobs>,
    /// Among replicas: copies artifacts to the others.
    pub copies: Option<Arc<replicas::Copies>>,
    /// The term this control plane leads in (on its own store: 0, or above
    /// the terms of the store it was restored or copied from), told to
    /// agents.
    pub term: u64,
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
/// TLS) once ready. On a store shared by several control planes (etcd),
/// serves as a follower until elected leader (see `replicas`).
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let store_config = config.store.clone().unwrap_or_else(|| {
        rollwave_store::StoreConfig::sqlite(config.data_dir.join("rollwave.db"))
    });
    let store: Arc<dyn Store> = rollwave_store::open(&store_config)
        .await
        .map_err(|e| BadConfig(format!("--store: {e}")))?;
    if let Some(election) = store.election() {
        check_cluster(&config.data_dir, election.cluster_id())?;
    }
    let blobs = Arc::new(blobs::Blobs::open(config.data_dir.join("blobs"))?);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    // Event streams never end by themselves: they are ended at shutdown,
    // or the graceful shutdown would wait for every open dashboard.
    let streams: Arc<OnceLock<Arc<events::Events>>> = Arc::default();
    let app = if store.election().is_some() {
        let secret = store.election().map(|e| e.secret().to_string());
        let address = replicas::advertised(config.advertise_url.as_deref(), scheme, addr)
            .map_err(BadConfig)?;
        let replica = replicas::Replica::new(
            config.replica_ca_file.as_deref(),
            blobs.clone(),
            secret.unwrap_or_default(),
        )
        .map_err(BadConfig)?;
        replica.watch_leader(store.clone());
        replicas::register(store.clone(), address.clone());
        let copies = replicas::Copies::new(store.clone(), address.clone(), &replica, blobs.clone());
        let (lead_config, lead_store, lead_streams) =
            (config.clone(), store.clone(), streams.clone());
        replicas::campaign(replica.clone(), store, address, move |term| async move {
            if let Some(copies) = copies.clone() {
                // In the background: agents retry a download that finds
                // nothing yet.
                tokio::spawn(async move { copies.fill().await });
            }
            let (app, events) = lead(&lead_config, lead_store, blobs, copies, term).await?;
            tracing::info!(term, "leading");
            let _ = lead_streams.set(events);
            Ok(app)
        });
        axum::Router::new()
            .fallback(replicas::dispatch)
            .with_state(replica)
    } else {
        // 0, unless this store took over a replicated one's history.
        let term = store
            .term_base()
            .await
            .map_err(|e| BadConfig(format!("--store: {e}")))?;
        let (app, events) = lead(&config, store, blobs, None, term).await?;
        let _ = streams.set(events);
        app
    };
    let shutdown = async move {
        shutdown.await;
        if let Some(stream) = streams.get() {
            stream.close();
        }
    };
    serve(&config, listener, app, shutdown).await
}

/// A replica's data dir holds artifacts of one cluster: it records the
/// cluster id on first use and refuses to serve another cluster's store, so
/// that two clusters' artifacts and tokens are never mixed by a wrong
/// `--store` or `--store-prefix`.
fn check_cluster(data_dir: &std::path::Path, cluster: &str) -> anyhow::Result<()> {
    let path = data_dir.join("cluster");
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == cluster => Ok(()),
        Ok(found) => Err(BadConfig(format!(
            "--store: this store belongs to cluster {cluster}, but data dir {} was used by cluster {}: use that cluster's store, or another data dir",
            data_dir.display(),
            found.trim()
        ))
        .into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            rollwave_tls::write_atomic(&path, format!("{cluster}\n").as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Loads the state and starts the reconciler: what the one control plane,
/// or the elected leader, does.
async fn lead(
    config: &ServerConfig,
    store: Arc<dyn Store>,
    blobs: Arc<blobs::Blobs>,
    copies: Option<Arc<replicas::Copies>>,
    term: u64,
) -> anyhow::Result<(axum::Router, Arc<events::Events>)> {
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
        copies,
        term,
    });
    shared.node_writes.clone().spawn(shared.store.clone());
    reconciler::spawn(shared.clone(), events)
        .await
        .context("loading rollouts")?;
    retention::spawn(shared.clone(), config.retention);
    let stream = shared.events.clone();
    Ok((http::router(shared), stream))
}

async fn serve(
    config: &ServerConfig,
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
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
    match config.tls.clone() {
        Some(tls) => {
            let listener = rollwave_tls::TlsListener::new(listener, tls.config);
            serve::serve(listener, app, config.limits, shutdown).await
        }
        None => serve::serve(listener, app, config.limits, shutdown).await,
    }
    Ok(())
}
