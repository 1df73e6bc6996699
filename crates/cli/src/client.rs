//! A small client of the control plane's HTTP API.

use std::fmt;

use anyhow::Context;
use rollwave_api::ErrorBody;
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
}

impl ApiClient {
    pub fn new(base: &str) -> anyhow::Result<ApiClient> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(user_error(format!(
                "--server: {base:?} must start with http:// or https://"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("building http client")?;
        Ok(ApiClient { base, http })
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
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the control plane at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await.context("reading the response")?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).context("decoding the response");
        }
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| format!("http {status}: {}", String::from_utf8_lossy(&bytes)));
        if status.is_client_error() {
            Err(user_error(message))
        } else {
            Err(anyhow::anyhow!("control plane error ({status}): {message}"))
        }
    }
}
