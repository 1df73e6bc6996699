//! Several control planes on one etcd: one leads, the others follow.
//!
//! The leader is the control plane of a single-replica setup: it runs the
//! reconciler, holds every agent session and answers the API. A follower
//! keeps nothing in memory that could go stale: it answers `/v1/health` and
//! `/metrics` itself, refuses agent sessions (agents move on to the next
//! server in their list until the leader takes them), and passes every
//! other request to the leader as it came, token included, so that any
//! replica serves the API and the dashboard with the leader's answers.
//! When a follower is elected, it loads the state from the store and
//! becomes a leader; a leader that loses its lease exits (as Kubernetes
//! controllers do), since its in-memory state can no longer be trusted,
//! and its service manager starts it again as a follower.

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use rollwave_api::{ErrorCode, HealthResponse, AGENT_CONNECT_PATH, LEADER_HEADER};

use crate::error::ApiError;

/// What a replica knows of the election.
pub(crate) struct Replica {
    /// Release artifacts, which replicas copy to each other.
    pub blobs: Arc<crate::blobs::Blobs>,
    /// The secret replicas show each other, from the store.
    secret: String,
    /// The leader's address, as it announced itself.
    leader_url: RwLock<Option<String>>,
    /// This replica's app, once it leads.
    pub leading: OnceLock<Router>,
    client: reqwest::Client,
}

impl Replica {
    pub fn new(
        ca_file: Option<&std::path::Path>,
        blobs: Arc<crate::blobs::Blobs>,
        secret: String,
    ) -> Result<Arc<Replica>, String> {
        let mut client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Requests to the leader are the caller's: no redirect is
            // followed for it, and its token goes only where it was sent.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("--replica-ca-file: reading {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--replica-ca-file: {}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--replica-ca-file: {} holds no PEM certificate",
                    ca.display()
                ));
            }
            for cert in certs {
                client = client.add_root_certificate(cert);
            }
        }
        Ok(Arc::new(Replica {
            blobs,
            secret,
            leader_url: RwLock::new(None),
            leading: OnceLock::new(),
            client: client
                .build()
                .map_err(|e| format!("building the replicas' HTTP client: {e}"))?,
        }))
    }

    pub fn is_leader(&self) -> bool {
        self.leading.get().is_some()
    }

    pub fn leader_url(&self) -> Option<String> {
        self.leader_url
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_leader_url(&self, url: Option<String>) {
        *self
            .leader_url
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = url;
    }

    /// Follows the election until this replica leads: who leads is read
    /// every 200 ms, so a follower passes requests (and sends agents) to a
    /// new leader soon after it is elected; one small etcd read each time.
    pub fn watch_leader(self: &Arc<Self>, store: Arc<dyn rollwave_store::Store>) {
        let replica = self.clone();
        tokio::spawn(async move {
            let Some(election) = store.election() else {
                return;
            };
            while !replica.is_leader() {
                match election.leader().await {
                    Ok(url) => replica.set_leader_url(url),
                    Err(e) => tracing::warn!(error = %e, "reading the leader"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
}

/// The address the other replicas reach this one at: `--advertise-url`,
/// checked, or the scheme and the address it listens on. A wildcard
/// listen address names no host another machine could reach, so it needs
/// `--advertise-url`; an `http://` address of a replica serving HTTPS (or
/// the reverse) would fail every request passed to it.
pub(crate) fn advertised(
    advertise_url: Option<&str>,
    scheme: &str,
    listen: std::net::SocketAddr,
) -> Result<String, String> {
    let Some(url) = advertise_url else {
        if listen.ip().is_unspecified() {
            return Err(format!(
                "--advertise-url: needed with --listen {listen} on a shared store: the URL the other replicas reach this one at, e.g. {scheme}://cp1:{}",
                listen.port()
            ));
        }
        return Ok(format!("{scheme}://{listen}"));
    };
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("--advertise-url: {url:?} is not a URL: {e}"))?;
    if parsed.scheme() != scheme || parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "--advertise-url: {url:?} is not an {scheme}:// URL with a host, as this control plane serves {}",
            if scheme == "https" { "HTTPS" } else { "plain HTTP" }
        ));
    }
    if parsed.path() != "/" || parsed.query().is_some() {
        return Err(format!(
            "--advertise-url: {url:?} has a path; give the scheme, host and port only"
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// A failed request to another replica in one line: for a refused
/// certificate, rustls's reason rather than reqwest's "error sending
/// request", and the flag that fixes it.
fn describe(e: &reqwest::Error) -> String {
    match rollwave_tls::describe_error(e) {
        Some(tls) => format!(
            "its certificate was refused ({tls}): is --replica-ca-file the CA that signed it?"
        ),
        None => rollwave_core::error_chain(e),
    }
}

/// Lists this replica in the store for as long as it lives, so that the
/// leader copies artifacts to it; listed again if the listing lapses.
pub(crate) fn register(store: Arc<dyn rollwave_store::Store>, address: String) {
    tokio::spawn(async move {
        let Some(election) = store.election() else {
            return;
        };
        loop {
            match election.register(&address).await {
                Ok(lost) => {
                    let why = lost.await.unwrap_or_default();
                    tracing::warn!(reason = %why, "this replica's listing lapsed: listing it again");
                }
                Err(e) => tracing::warn!(error = %e, "listing this replica"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Every request of a replica: the leader's app once it leads, the
/// follower's answers until then.
pub(crate) async fn dispatch(State(replica): State<Arc<Replica>>, req: Request) -> Response {
    if req.uri().path().starts_with(BLOBS_PATH) {
        return replica_blobs(&replica.blobs, &replica.secret, req).await;
    }
    if let Some(app) = replica.leading.get() {
        use tower::ServiceExt;
        return match app.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
    }
    follow(&replica, req).await
}

async fn follow(replica: &Replica, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let leader = replica.leader_url();
    match path.as_str() {
        "/v1/health" => {
            return Json(HealthResponse {
                status: "ok".into(),
                agents_connected: 0,
                leader: false,
                leader_url: leader,
            })
            .into_response()
        }
        "/metrics" => {
            return (
                [("content-type", "text/plain; version=0.0.4")],
                "# HELP rollwave_leader Whether this control plane leads (1) or follows (0).\n# TYPE rollwave_leader gauge\nrollwave_leader 0\n",
            )
                .into_response()
        }
        _ => {}
    }
    let Some(leader) = leader else {
        return ApiError::new(
            ErrorCode::Unavailable,
            "no control plane is elected leader yet: try again in a few seconds",
        )
        .into_response();
    };
    if path == AGENT_CONNECT_PATH {
        // Sessions live on the leader, where tasks are sent from; the
        // header lets an agent go there next rather than down its list.
        let mut resp = ApiError::new(
            ErrorCode::Unavailable,
            format!("this control plane follows; agents connect to the leader, {leader}"),
        )
        .into_response();
        if let Ok(value) = leader.parse() {
            resp.headers_mut().insert(LEADER_HEADER, value);
        }
        return resp;
    }
    match forward(replica, &leader, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(%leader, error = %e, "passing a request to the leader");
            ApiError::new(
                ErrorCode::Unavailable,
                format!("passing the request to the leader, {leader}: {e}"),
            )
            .into_response()
        }
    }
}

/// Headers that describe one hop, not the request.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

async fn forward(replica: &Replica, leader: &str, req: Request) -> Result<Response, String> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let url = format!("{}{path}", leader.trim_end_matches('/'));
    let mut out = replica.client.request(parts.method.clone(), &url);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out = out.header(name, value);
        }
    }
    let body = reqwest::Body::wrap_stream(body.into_data_stream());
    let resp = out.body(body).send().await.map_err(|e| describe(&e))?;
    let mut answer = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            answer = answer.header(HeaderName::from(name), value);
        }
    }
    let stream = resp.bytes_stream().map_err(std::io::Error::other);
    answer
        .body(Body::from_stream(stream))
        .map_err(|e| e.to_string())
}

/// Campaigns until elected, then builds the leader's app with `lead` and
/// serves it; exits the process if leadership is lost.
pub(crate) fn campaign<F, Fut>(
    replica: Arc<Replica>,
    store: Arc<dyn rollwave_store::Store>,
    address: String,
    lead: F,
) where
    F: FnOnce(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Router>> + Send,
{
    tokio::spawn(async move {
        let Some(election) = store.election() else {
            return;
        };
        let won = loop {
            match election.campaign(&address).await {
                Ok(won) => break won,
                Err(e) => {
                    tracing::warn!(error = %e, "campaigning to lead; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tracing::info!(term = won.term, %address, "elected leader: loading the state from the store");
        let app = match lead(won.term).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "could not start leading: exiting");
                std::process::exit(1);
            }
        };
        replica.set_leader_url(Some(address));
        let _ = replica.leading.set(app);
        let why = won
            .lost
            .await
            .unwrap_or_else(|_| "the lease keeper stopped".into());
        // Whatever this process holds in memory may be stale from here on;
        // the store refuses its writes already. Start again as a follower.
        tracing::error!(reason = %why, "lost leadership: exiting");
        std::process::exit(1);
    });
}

/// The header carrying the replicas' shared secret on the requests they
/// make of each other.
const SECRET_HEADER: &str = "rollwave-replica-secret";
/// Where replicas put and get each other's release artifacts, by sha256.
const BLOBS_PATH: &str = "/v1/replica/blobs/";

/// Release artifacts on every replica. A push is answered only once every
/// replica listed in etcd holds the artifact (copied before the release is
/// stored), so that losing the replica that took it loses nothing; a
/// replica that was down then fetches what it lacks by hash when it is
/// elected. Artifacts never go into etcd.
pub(crate) struct Copies {
    store: Arc<dyn rollwave_store::Store>,
    /// This replica's own address, to skip in the list.
    own: String,
    secret: String,
    client: reqwest::Client,
    blobs: Arc<crate::blobs::Blobs>,
}

impl Copies {
    pub fn new(
        store: Arc<dyn rollwave_store::Store>,
        own: String,
        replica: &Replica,
        blobs: Arc<crate::blobs::Blobs>,
    ) -> Option<Arc<Copies>> {
        let secret = store.election()?.secret().to_string();
        Some(Arc::new(Copies {
            store,
            own,
            secret,
            client: replica.client.clone(),
            blobs,
        }))
    }

    /// This replica's address, as it announces itself.
    pub fn address(&self) -> &str {
        &self.own
    }

    async fn others(&self) -> Result<Vec<String>, String> {
        let election = self.store.election().ok_or("no election")?;
        let mut all = election.replicas().await.map_err(|e| e.to_string())?;
        all.retain(|r| *r != self.own);
        all.sort();
        all.dedup();
        Ok(all)
    }

    /// Copies the artifact `sha256` to every other replica listed now.
    pub async fn spread(&self, sha256: &str) -> Result<(), String> {
        let path = self.blobs.path(sha256);
        for replica in self.others().await? {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let resp = self
                .client
                .put(format!("{replica}{BLOBS_PATH}{sha256}"))
                .header(SECRET_HEADER, &self.secret)
                .body(body)
                .send()
                .await
                .map_err(|e| format!("copying to {replica}: {}", describe(&e)))?;
            if !resp.status().is_success() {
                return Err(format!("copying to {replica}: {}", resp.status()));
            }
        }
        Ok(())
    }

    /// Asks every other replica listed now to drop its copy of the artifact
    /// `sha256`, which no release names any more. A replica that cannot be
    /// reached keeps its copy, which only takes space: it is swept when
    /// that replica leads.
    pub async fn remove(&self, sha256: &str) {
        let others = match self.others().await {
            Ok(others) => others,
            Err(e) => {
                tracing::warn!(sha256, error = %e, "listing replicas to remove an artifact");
                return;
            }
        };
        for replica in others {
            let resp = self
                .client
                .delete(format!("{replica}{BLOBS_PATH}{sha256}"))
                .header(SECRET_HEADER, &self.secret)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(sha256, %replica, status = %r.status(), "a replica kept an artifact no release names")
                }
                Err(e) => {
                    tracing::warn!(sha256, %replica, error = %e, "a replica kept an artifact no release names")
                }
            }
        }
    }

    /// Fetches every stored release's artifact this replica lacks from a
    /// replica that has it, verifying its sha256.
    pub async fn fill(&self) {
        let releases = match self.store.list_releases().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "listing releases to fetch missing artifacts");
                return;
            }
        };
        for release in releases {
            if tokio::fs::try_exists(self.blobs.path(&release.sha256))
                .await
                .unwrap_or(false)
            {
                continue;
            }
            match self.fetch(&release.sha256).await {
                Ok(from) => {
                    tracing::info!(service = %release.service, version = %release.version, %from, "fetched a missing artifact from a replica")
                }
                Err(e) => {
                    tracing::warn!(service = %release.service, version = %release.version, error = %e, "artifact missing here and on every replica reached")
                }
            }
        }
    }

    async fn fetch(&self, sha256: &str) -> Result<String, String> {
        let mut last = "no other replica is listed".to_string();
        for replica in self.others().await? {
            let got = async {
                let resp = self
                    .client
                    .get(format!("{replica}{BLOBS_PATH}{sha256}"))
                    .header(SECRET_HEADER, &self.secret)
                    .send()
                    .await
                    .map_err(|e| describe(&e))?;
                if !resp.status().is_success() {
                    return Err(resp.status().to_string());
                }
                let stream = resp.bytes_stream().map_err(std::io::Error::other);
                store_blob(&self.blobs, sha256, stream).await
            }
            .await;
            match got {
                Ok(()) => return Ok(replica),
                Err(e) => last = format!("{replica}: {e}"),
            }
        }
        Err(last)
    }
}

/// Receives an artifact into `blobs` under `sha256`, only if it hashes to
/// it.
async fn store_blob<S, E>(blobs: &crate::blobs::Blobs, sha256: &str, body: S) -> Result<(), String>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let upload = blobs.receive(body).await.map_err(|e| e.to_string())?;
    if upload.sha256 != sha256 {
        let _ = crate::blobs::discard(&upload.tmp).await;
        return Err(format!("content hashes to {}, not {sha256}", upload.sha256));
    }
    blobs.commit(&upload).await.map_err(|e| e.to_string())
}

/// `PUT`, `GET` and `DELETE /v1/replica/blobs/<sha256>`, answered by any
/// replica to another that shows the secret. Only the leader puts and
/// deletes, each under the blob's lock there, so a replica sees a push's
/// copy and a delete of the same bytes in the order the leader made them.
async fn replica_blobs(blobs: &crate::blobs::Blobs, secret: &str, req: Request) -> Response {
    let shown = req
        .headers()
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // Compared in time independent of where they differ.
    let same = shown.len() == secret.len()
        && shown
            .bytes()
            .zip(secret.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if !same {
        return ApiError::new(ErrorCode::Forbidden, "only replicas copy artifacts").into_response();
    }
    let sha256 = req.uri().path()[BLOBS_PATH.len()..].to_string();
    if !crate::blobs::is_sha256(&sha256) {
        return ApiError::bad_request("not a sha256").into_response();
    }
    match *req.method() {
        axum::http::Method::PUT => {
            match store_blob(blobs, &sha256, req.into_body().into_data_stream()).await {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => ApiError::bad_request(e).into_response(),
            }
        }
        axum::http::Method::GET => match tokio::fs::File::open(blobs.path(&sha256)).await {
            Ok(file) => Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response(),
            Err(_) => ApiError::not_found(format!("no artifact {sha256} here")).into_response(),
        },
        axum::http::Method::DELETE => {
            let held = blobs.lock(&sha256).await;
            match blobs.remove(&sha256, &held).await {
                Ok(_) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => {
                    ApiError::internal(format!("removing artifact {sha256}: {e}")).into_response()
                }
            }
        }
        _ => ApiError::bad_request("PUT, GET or DELETE").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::advertised;

    #[test]
    fn the_advertised_url_is_checked_against_what_the_replica_serves() {
        let local = "127.0.0.1:7700".parse().unwrap();
        let any = "0.0.0.0:7700".parse().unwrap();
        assert_eq!(
            advertised(None, "https", local).unwrap(),
            "https://127.0.0.1:7700"
        );
        assert_eq!(
            advertised(Some("https://cp1:7700/"), "https", any).unwrap(),
            "https://cp1:7700"
        );
        let err = advertised(None, "https", any).unwrap_err();
        assert!(
            err.starts_with("--advertise-url: needed with --listen 0.0.0.0:7700"),
            "{err}"
        );
        for (url, why) in [
            ("cp1:7700", "is not an https:// URL with a host"),
            ("http://cp1:7700", "is not an https:// URL with a host"),
            ("https://cp1:7700/api", "has a path"),
            ("not a url", "is not a URL"),
        ] {
            let err = advertised(Some(url), "https", local).unwrap_err();
            assert!(
                err.starts_with(&format!("--advertise-url: {url:?} {why}")),
                "{url}: {err}"
            );
        }
    }
}
