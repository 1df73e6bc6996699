//! The node agent: supervises the node's services, and carries out the
//! control plane's tasks on them (stage, verify, back up, switch, gate, roll
//! back), over one outbound session.

pub mod artifact;
pub mod config;
pub mod disk;
pub mod download;
pub mod enroll;
mod executor;
mod fds;
mod gate;
pub use rollwave_hooks::haproxy;
pub mod health;
pub mod layout;
pub mod local;
pub mod logs;
pub mod role;
mod session;
mod supervisor;

pub use session::{dial_session, session_url, Backoff, Dialed, SessionStream, CONNECT_TIMEOUT};

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{mpsc, Notify};

pub use config::AgentConfig;

use crate::executor::{Executor, Service};
use crate::layout::ServiceDirs;

/// Runs the agent until `shutdown` resolves. Services keep running after the
/// agent exits: the next agent re-adopts them.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut config = config;
    // Services run in their release directory and are told paths under the
    // state dir (their active version file, the agent socket), so those
    // paths must not be relative to the agent's working directory.
    config.state_dir = std::path::absolute(&config.state_dir)
        .with_context(|| format!("resolving state dir {}", config.state_dir.display()))?;
    let config = Arc::new(config);
    std::fs::create_dir_all(config.state_dir.join("tasks"))
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let socket = layout::agent_socket(&config.state_dir);
    // Before any service starts: each is told this socket.
    let listener = local::bind(&socket)?;
    // One TLS config for the session and the artifact downloads: both go to
    // the control plane and must trust the same certificate.
    let tls = if config.server.starts_with("https://") {
        Some(config.tls.config().context("ca_file")?)
    } else {
        tracing::warn!(server = %config.server, "the control plane is plain HTTP: tasks, artifacts and this node's reports travel unencrypted, from a server nobody verified");
        None
    };
    let check_client = health::check_client().context("building health check client")?;
    let changed = Arc::new(Notify::new());
    let mut services = BTreeMap::new();
    let mut service_logs = BTreeMap::new();
    for svc in &config.services {
        let dirs = ServiceDirs::new(&config.state_dir, &svc.name);
        dirs.create()
            .with_context(|| format!("creating {}", dirs.root.display()))?;
        // Before the supervisor: a re-adopted process may have written to
        // the pipe while no agent ran, and a new one is started on it.
        let log =
            logs::ServiceLog::start(&config.state_dir, &svc.name, svc.logs).with_context(|| {
                format!(
                    "opening the log of service {} in {}",
                    svc.name,
                    logs::logs_dir(&config.state_dir).display()
                )
            })?;
        service_logs.insert(svc.name.clone(), log.clone());
        let sup = supervisor::spawn(
            config.node.clone(),
            svc.clone(),
            dirs.clone(),
            changed.clone(),
            check_client.clone(),
            socket.clone(),
            log,
        );
        services.insert(
            svc.name.clone(),
            Arc::new(Service::new(svc.clone(), dirs, sup)),
        );
    }
    // After the services started: they are supervised while the agent
    // waits for a control plane to enroll with.
    let credential = {
        let client = http_client(None, tls.as_deref())?;
        enroll::credential(&config, &client).await?
    };
    let client = http_client(Some(&credential), tls.as_deref())?;
    let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
    let log_replies = outbox_tx.clone();
    let executor = Executor::new(
        config.state_dir.clone(),
        config.server.clone(),
        client,
        services.clone(),
        outbox_tx,
        changed.clone(),
        config.trusted_keys.clone(),
        config.disk,
    );
    executor.set_node(&config.node);
    let endpoint = local::router(
        services
            .iter()
            .map(|(name, svc)| (name.clone(), svc.dirs.clone()))
            .collect(),
    );
    tracing::info!(node = %config.node, server = %config.server, services = services.len(), socket = %socket.display(), "agent started");
    if config.trusted_keys.is_empty() {
        tracing::warn!("releases are not signature-checked: set trusted_keys or trusted_key_files in the agent config to install only releases signed by those keys");
    } else {
        tracing::info!(trusted = %config.trusted_keys.ids(), "releases must be signed by a trusted key");
    }
    tokio::select! {
        _ = session::run(
            config.clone(),
            tls,
            credential,
            services,
            executor,
            (outbox_rx, log_replies),
            changed,
            Arc::new(service_logs),
        ) => {}
        r = local::serve(listener, endpoint) => {
            r.with_context(|| format!("serving the agent socket {}", socket.display()))?;
        }
        _ = shutdown => tracing::info!("agent stopping; services keep running"),
    }
    Ok(())
}

/// The client for the control plane: with the node's credential on every
/// request once it has one. Redirects are not followed, so the credential
/// never goes anywhere else.
fn http_client(
    credential: Option<&str>,
    tls: Option<&rollwave_tls::ClientConfig>,
) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = credential {
        headers.insert(reqwest::header::AUTHORIZATION, enroll::auth_header(token)?);
    }
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        // A download that stalls fails the task instead of holding it forever.
        .read_timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers);
    let client = match tls {
        Some(tls) => client.use_preconfigured_tls(tls.clone()),
        None => client,
    };
    client.build().context("building http client")
}

/// The shim between the agent and a service that takes sockets: sets
/// `LISTEN_PID` to its own pid and replaces itself with the service (same
/// pid), as socket activation requires. Returns only on failure.
pub fn listen_exec(program: &std::ffi::OsStr, args: &[std::ffi::OsString]) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(program)
        .args(args)
        .env("LISTEN_PID", std::process::id().to_string())
        .exec()
}
