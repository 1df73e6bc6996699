//! The demo fleet's service: a small HTTP server whose version and behaviour
//! come from the release it runs (`release.toml` in the release directory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// The share of requests to `/` answered with 500 (0.1: every tenth),
    /// while `/healthz` still passes: a release only an analysis of its
    /// traffic can catch.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub error_rate: f64,
}

fn yes() -> bool {
    true
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// Requests answered, by status code, for `/metrics`. `/healthz` and
/// `/metrics` are not counted: they are the agent's and Prometheus's, not
/// the service's traffic.
#[derive(Default)]
struct Counts {
    served: std::sync::atomic::AtomicU64,
    by_code: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Counts {
    /// Whether the next request to `/` fails, as `rate` says: the n-th
    /// fails when it takes floor(n * rate) up by one, so exactly that share
    /// fails, evenly spread.
    fn next_fails(&self, rate: f64) -> bool {
        let n = self
            .served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
        ((n + 1.0) * rate).floor() > (n * rate).floor()
    }

    fn count(&self, code: u16) {
        let mut by = self.by_code.lock().unwrap_or_else(|e| e.into_inner());
        *by.entry(code).or_default() += 1;
    }

    /// The Prometheus text format.
    fn render(&self, version: &str) -> String {
        let by = self.by_code.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from(
            "# HELP demo_requests_total Requests answered, by status code.\n# TYPE demo_requests_total counter\n",
        );
        for (code, n) in by.iter() {
            out.push_str(&format!(
                "demo_requests_total{{code=\"{code}\",version=\"{version}\"}} {n}\n"
            ));
        }
        out
    }
}

/// Builds a demo release tarball in memory.
pub fn tarball(release: &DemoRelease) -> anyhow::Result<Vec<u8>> {
    tarball_with(release, &[])
}

/// A release archive with more files beside `release.toml`, each as
/// (path, content, mode): e.g. a `rollwave.toml` and the scripts it names.
pub fn tarball_with(release: &DemoRelease, files: &[(&str, &str, u32)]) -> anyhow::Result<Vec<u8>> {
    let toml = toml::to_string(release)?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let all = std::iter::once(("release.toml", toml.as_str(), 0o644)).chain(files.iter().copied());
    for (path, content, mode) in all {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        builder.append_data(&mut header, path, content.as_bytes())?;
    }
    Ok(builder.into_inner()?.finish()?)
}

pub async fn run(
    release_dir: &Path,
    listen: Option<SocketAddr>,
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
    let active_file = std::env::var_os("ROLLWAVE_ACTIVE_VERSION_FILE").map(PathBuf::from);
    let counts = std::sync::Arc::new(Counts::default());
    // Both series from the start, at 0: a ratio of errors to requests then
    // has a numerator before the first error.
    for code in [200, 500] {
        counts
            .by_code
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(code, 0);
    }
    let error_rate = release.error_rate;
    let (served, metrics) = (counts.clone(), counts.clone());
    let metrics_version = version.clone();
    let answered = version.clone();
    let app = Router::new()
        .route(
            "/",
            get(move || async move {
                if served.next_fails(error_rate) {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("api {version} failed this request\n"),
                    )
                } else {
                    (StatusCode::OK, format!("api {version}\n"))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics.render(&metrics_version),
                )
            }),
        )
        // What a health check with `expect_json` reads: the version from
        // `release.toml`, which a release built from old code gets wrong.
        .route(
            "/version",
            get(move || async move { axum::Json(serde_json::json!({ "version": answered })) }),
        )
        .route(
            "/healthz",
            get(move || async move {
                if healthy {
                    (StatusCode::OK, "ok\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "this release is broken\n")
                }
            }),
        )
        .route(
            "/active-version",
            get(move || async move { active_version(active_file.as_deref()).await }),
        )
        .layer(axum::middleware::from_fn(log_request))
        .layer(axum::middleware::from_fn(move |req, next| {
            count_request(counts.clone(), req, next)
        }));
    let listeners = match listen {
        Some(addr) => vec![tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?],
        None => activated()?,
    };
    // Every socket is served, the private health socket included. On
    // shutdown all stop accepting at once (the shared sockets stay open in
    // the agent, so the next version takes the new connections); only after
    // DRAIN_DELAY are open connections shut down, so one accepted just
    // before the stop still has its request read and answered.
    let (stop_accepting, accepting) = tokio::sync::watch::channel(true);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let mut stopped = stopped.clone();
        let listener = Stoppable {
            inner: listener,
            accepting: accepting.clone(),
        };
        let app = app.clone();
        servers.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
    }
    say(format_args!(
        "api {} serving (pid {})",
        release.version,
        std::process::id()
    ));
    tokio::spawn(async move {
        shutdown.await;
        say(format_args!("stopping: draining open connections"));
        let _ = stop_accepting.send(false);
        tokio::time::sleep(DRAIN_DELAY).await;
        let _ = stop.send(true);
    });
    while let Some(r) = servers.join_next().await {
        r??;
    }
    Ok(())
}

/// One line of output, as a service writes its log: to stdout, which the
/// agent keeps in the service's log. A write that fails is dropped (the
/// service must serve whether or not anyone reads its output).
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_fmt(format_args!("{line}\n"))
        .and_then(|()| out.flush());
}

/// A line per request, as an access log, but for the health checks and
/// metric scrapes, which come every interval and say nothing.
async fn log_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    if path != "/healthz" && path != "/metrics" {
        say(format_args!("{method} {path} {}", resp.status().as_u16()));
    }
    resp
}

async fn count_request(
    counts: std::sync::Arc<Counts>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if path != "/healthz" && path != "/metrics" {
        counts.count(resp.status().as_u16());
    }
    resp
}

/// The active version the agent delivered, read on every request because
/// the agent rewrites the file while the service runs; `none` before any.
async fn active_version(file: Option<&Path>) -> (StatusCode, String) {
    let Some(file) = file else {
        return (StatusCode::OK, "none".to_string());
    };
    match tokio::fs::read_to_string(file).await {
        Ok(text) => (StatusCode::OK, text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (StatusCode::OK, "none".to_string()),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading {}: {e}\n", file.display()),
        ),
    }
}

const DRAIN_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// A listener that stops accepting when told, without closing the socket.
struct Stoppable {
    inner: tokio::net::TcpListener,
    accepting: tokio::sync::watch::Receiver<bool>,
}

impl axum::serve::Listener for Stoppable {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if !*self.accepting.borrow() {
                return std::future::pending().await;
            }
            tokio::select! {
                r = self.inner.accept() => match r {
                    Ok(conn) => return conn,
                    // Out of fds or similar: back off briefly, as axum does.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                },
                _ = self.accepting.changed() => {}
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The sockets passed by socket activation (`LISTEN_FDS`, `LISTEN_PID`).
fn activated() -> anyhow::Result<Vec<tokio::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        anyhow::bail!("no --listen address and no sockets passed in LISTEN_FDS");
    }
    let mut out = Vec::new();
    for i in 0..fds.len() {
        let l = fds
            .take_tcp_listener(i)
            .with_context(|| format!("taking passed socket {i}"))?
            .with_context(|| format!("passed socket {i} is not a TCP listener"))?;
        l.set_nonblocking(true)?;
        out.push(tokio::net::TcpListener::from_std(l)?);
    }
    Ok(out)
}
