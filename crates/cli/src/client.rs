//! A small client of the control plane's HTTP API.

use std::fmt;

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
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl ApiClient {
    /// A client of the control plane at `base`, which it verifies as `tls`
    /// says if `base` is https.
    pub fn new(base: &str, tls: &ClientTls) -> anyhow::Result<ApiClient> {
        let base = base.trim_end_matches('/').to_string();
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
        let http = builder.build().context("building http client")?;
        Ok(ApiClient {
            base,
            http,
            token: None,
        })
    }

    /// Sends `token` as the bearer token of every request.
    pub fn with_token(mut self, token: Option<String>) -> ApiClient {
        self.token = token;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let req = self.http.post(format!("{}{path}", self.base)).json(body);
        self.send(req).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let req = self.http.delete(format!("{}{path}", self.base));
        self.send(req).await
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
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/octet-stream")
            .body(body);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        self.send(req).await
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let req = match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        };
        let resp = req.send().await.map_err(|e| {
            let unreachable = format!("cannot reach the control plane at {}", self.base);
            // The certificate problem alone, without reqwest's and hyper's
            // layers around it.
            match rollwave_tls::describe_error(&e) {
                Some(tls) => anyhow::anyhow!("{unreachable}: {tls}"),
                None => anyhow::Error::new(e).context(unreachable),
            }
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the response")?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).context("decoding the response");
        }
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
