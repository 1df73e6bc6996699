//! A small client of the control plane's HTTP API.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use rollwave_api::ErrorBody;
use rollwave_tls::ClientTls;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bad input: shown as is, exit code 2.
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

pub fn user_error(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UserError(msg.into()))
}

#[derive(Clone)]
pub struct ApiClient {
    /// Every control plane replica given (`--server a,b,c`).
    bases: Arc<Vec<String>>,
    /// The one that answered last, tried first.
    current: Arc<AtomicUsize>,
    http: reqwest::Client,
    token: Option<String>,
}

/// How long a command keeps going round the replicas before it gives up on
/// reaching a leader: a leader election (the lease running out, then the
/// new leader loading the state) several times over, on a loaded etcd.
/// Counted in time rather than rounds, so that replicas refusing at once
/// do not use it up before the lease has even lapsed.
const RIDE_OUT: std::time::Duration = std::time::Duration::from_secs(30);

impl ApiClient {
    /// A client of the control plane at `base`, which it verifies as `tls`
    /// says if `base` is https.
    pub fn new(servers: &str, tls: &ClientTls) -> anyhow::Result<ApiClient> {
        let bases: Vec<String> = servers
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .collect();
        if let Some(other) = bases
            .iter()
            .find(|b| b.starts_with("https://") != bases[0].starts_with("https://"))
        {
            return Err(user_error(format!(
                "--server: {other:?} and {:?} mix http:// and https://; replicas are reached the same way",
                bases[0]
            )));
        }
        let base = bases[0].clone();
        let builder = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5));
        let builder = if base.starts_with("https://") {
            let config = tls.config().map_err(|e| user_error(e.to_string()))?;
            builder.use_preconfigured_tls((*config).clone())
        } else if base.starts_with("http://") {
            // Verifying nothing while asked to would be worse than failing.
            if tls.ca_file.is_some() || tls.pin.is_some() {
                return Err(user_error(format!(
                    "--server: {base} is plain HTTP, which --ca-file and --pin cannot verify; use https://"
                )));
            }
            builder
        } else {
            return Err(user_error(format!(
                "--server: {base:?} must start with http:// or https://"
            )));
        };
        if let Some(bad) = bases
            .iter()
            .find(|b| !b.starts_with("http://") && !b.starts_with("https://"))
        {
            return Err(user_error(format!(
                "--server: {bad:?} must start with http:// or https://"
            )));
        }
        let http = builder.build().context("building http client")?;
        Ok(ApiClient {
            bases: Arc::new(bases),
            current: Arc::default(),
            http,
            token: None,
        })
    }

    /// Sends `token` as the bearer token of every request.
    pub fn with_token(mut self, token: Option<String>) -> ApiClient {
        self.token = token;
        self
    }

    /// The replica that answered last (the first given, until one did).
    pub fn base(&self) -> &str {
        &self.bases[self.current.load(Ordering::Relaxed) % self.bases.len()]
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(|base| self.http.get(format!("{base}{path}")))
            .await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(|base| self.http.post(format!("{base}{path}")).json(body))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(|base| self.http.delete(format!("{base}{path}")))
            .await
    }

    /// Starts a rollout of `spec` (`POST /v1/rollouts`), whatever its plan.
    pub async fn start_rollout(
        &self,
        spec: rollwave_api::RolloutFile,
    ) -> anyhow::Result<rollwave_api::RolloutResponse> {
        let body = rollwave_api::StartRollout {
            spec,
            plan_id: None,
        };
        self.post("/v1/rollouts", &body).await
    }

    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<T> {
        self.post_bytes_with(path, body, &[]).await
    }

    /// [`ApiClient::post_bytes`] with more request headers.
    pub async fn post_bytes_with<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> anyhow::Result<T> {
        let body = bytes::Bytes::from(body);
        self.send(|base| {
            let mut req = self
                .http
                .post(format!("{base}{path}"))
                .header("content-type", "application/octet-stream")
                .body(body.clone());
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            req
        })
        .await
    }

    /// Sends the request `build` makes for a replica's address. With
    /// several replicas, one that cannot be reached (the request never
    /// left) or has no leader to pass it to (503) is passed over for the
    /// next, round after round with a pause, so that a command rides out
    /// the election of a new leader; nothing that reached a leader is sent
    /// twice.
    async fn send<T: DeserializeOwned>(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = self.send_raw(build).await?;
        let bytes = resp.bytes().await.context("reading the response")?;
        serde_json::from_slice(&bytes).context("decoding the response")
    }

    /// A GET whose successful answer is not JSON (text, or a stream to read
    /// as it comes); failures as [`ApiClient::get`] reports them.
    pub async fn get_response(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.send_raw(|base| self.http.get(format!("{base}{path}")))
            .await
    }

    /// [`ApiClient::send`] up to a successful response, unread.
    async fn send_raw(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let n = self.bases.len();
        let first = self.current.load(Ordering::Relaxed);
        let began = std::time::Instant::now();
        let mut attempt = 0;
        let resp = loop {
            let at = (first + attempt) % n;
            let base = &self.bases[at];
            let req = build(base);
            let req = match &self.token {
                Some(token) => req.bearer_auth(token),
                None => req,
            };
            attempt += 1;
            let retry = n > 1 && began.elapsed() < RIDE_OUT;
            match req.send().await {
                Ok(resp) if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE && retry => {}
                Ok(resp) => {
                    self.current.store(at, Ordering::Relaxed);
                    break resp;
                }
                Err(e) if e.is_connect() && retry => {}
                Err(e) => {
                    let unreachable = format!("cannot reach the control plane at {base}");
                    // The certificate problem alone, without reqwest's and
                    // hyper's layers around it.
                    return Err(match rollwave_tls::describe_error(&e) {
                        Some(tls) => anyhow::anyhow!("{unreachable}: {tls}"),
                        None => anyhow::Error::new(e).context(unreachable),
                    });
                }
            }
            if attempt % n == 0 {
                tokio::time::sleep(jittered(std::time::Duration::from_millis(500))).await;
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.context("reading the response")?;
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| format!("http {status}: {}", String::from_utf8_lossy(&bytes)));
        if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            Err(user_error(format!(
                "{message} (no token given: set --token, ROLLWAVE_TOKEN or ROLLWAVE_TOKEN_FILE)"
            )))
        } else if status.is_client_error() {
            Err(user_error(message))
        } else {
            Err(anyhow::anyhow!("control plane error ({status}): {message}"))
        }
    }
}

/// Between `d` and twice `d`: clients that lost the same leader do not
/// all come back at once.
fn jittered(d: std::time::Duration) -> std::time::Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    d + d.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX))
}
