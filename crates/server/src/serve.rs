//! The serving loop: the router over hyper, with the limits `axum::serve`
//! does not set. A client gets `header_read_timeout` to send its request's
//! headers (hyper closes the connection after it), and each source address
//! may hold at most `max_pending_per_ip` connections that have not yet sent
//! a first request; past that, new ones from it are closed at once. A
//! connection that has sent a request (an agent's session, a dashboard's
//! event stream) no longer counts, so many agents behind one address, or
//! `rollwave sim` on loopback, are not limited by it.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tower::ServiceExt;

/// Limits on connections that have not sent a request yet.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// How long a client has for its request's headers.
    pub header_read_timeout: Duration,
    /// Connections without a first request, per source address.
    pub max_pending_per_ip: usize,
}

pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Far above what honest clients need (`rollwave sim` dials 128 at a time
/// by default), far below what exhausts the server's descriptors.
pub const DEFAULT_MAX_PENDING_PER_IP: usize = 256;

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_pending_per_ip: DEFAULT_MAX_PENDING_PER_IP,
        }
    }
}

/// Connections without a first request, by source address.
#[derive(Default)]
struct Pending(Mutex<HashMap<IpAddr, usize>>);

/// One pending connection, counted until dropped.
struct PendingGuard {
    pending: Arc<Pending>,
    ip: IpAddr,
}

impl Pending {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PendingGuard> {
        let mut by_ip = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = by_ip.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PendingGuard {
            pending: self.clone(),
            ip,
        })
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut by_ip = self.pending.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on the connections `listener` hands over until
/// `shutdown` resolves, then lets requests in flight finish (as
/// `axum::serve`'s graceful shutdown does: idle connections close at once).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let pending = Arc::new(Pending::default());
    // Dropped at shutdown, which each connection task watches for; each
    // task holds a receiver of `closed_rx` until it ends.
    let (signal_tx, signal_rx) = watch::channel(());
    let (closed_tx, closed_rx) = watch::channel(());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            conn = listener.accept() => conn,
            _ = &mut shutdown => break,
        };
        let Some(guard) = pending.enter(addr.ip(), limits.max_pending_per_ip) else {
            tracing::debug!(%addr, max = limits.max_pending_per_ip, "too many connections without a request from this address; closed");
            drop(io);
            continue;
        };
        let guard = Arc::new(Mutex::new(Some(guard)));
        let router = router.clone();
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            // Its headers are in: the connection is a client's, not a
            // pending one, whatever it does next.
            guard.lock().unwrap_or_else(|e| e.into_inner()).take();
            request.extensions_mut().insert(ConnectInfo(addr));
            router.clone().oneshot(request.map(Body::new))
        });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut signal_rx = signal_rx.clone();
        let closed_rx = closed_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = signal_rx.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::trace!(%addr, error = %e, "connection ended");
            }
            drop(closed_rx);
        });
    }
    drop(listener);
    drop(signal_rx);
    drop(signal_tx);
    drop(closed_rx);
    closed_tx.closed().await;
}
