//! The node's credential: traded once for a join token, then kept in the
//! state dir. Everything the agent asks of the control plane carries it,
//! and the control plane accepts it for this node only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use rollwave_api::{CreatedToken, Enroll, ErrorBody};

use crate::config::AgentConfig;

pub const CREDENTIAL_FILE: &str = "credential";

pub fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CREDENTIAL_FILE)
}

/// The node's credential: the stored one, or a new one enrolled with the
/// join token. Waits for an unreachable control plane (agents may start
/// first); a refusal is final, as retrying cannot change it.
pub async fn credential(config: &AgentConfig, client: &reqwest::Client) -> anyhow::Result<String> {
    let path = credential_path(&config.state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("reading the node credential {}: {e}", path.display()),
    }
    let Some(join) = &config.join_token else {
        bail!(
            "this node has no credential ({}) and agent.toml sets no join_token or join_token_file: create one with `rollwave token create --role join --name <name>`",
            path.display()
        );
    };
    let token = enroll(client, &config.servers, join, &config.node).await?;
    // Never readable by others, nor half written.
    rollwave_tls::write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("storing the node credential {}", path.display()))?;
    tracing::info!(node = %config.node, path = %path.display(), "enrolled");
    Ok(token)
}

/// Trades `join` for a new credential of `node` at the control plane at
/// one of `servers` (replicas: any passes the request to the leader).
/// Waits for an unreachable or failing control plane, trying the next one
/// each time, with backoff; a refusal (4xx) is final. Shared with
/// `rollwave sim`.
pub async fn enroll(
    client: &reqwest::Client,
    servers: &[String],
    join: &str,
    node: &str,
) -> anyhow::Result<String> {
    let mut backoff = Duration::from_millis(100);
    for attempt in 0.. {
        let server = &servers[attempt % servers.len()];
        let url = format!("{server}/v1/enroll");
        let sent = client
            .post(&url)
            .bearer_auth(join)
            .json(&Enroll {
                node: node.to_string(),
            })
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => {
                let created: CreatedToken = resp.json().await.context("decoding the enrollment")?;
                return Ok(created.token);
            }
            Ok(resp) if resp.status().is_client_error() => {
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                let message = serde_json::from_slice::<ErrorBody>(&body)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
                bail!("the control plane refused to enroll node {node} ({status}): {message}");
            }
            Ok(resp) => {
                tracing::warn!(status = %resp.status(), retry_in = ?backoff, "enrolling: the control plane failed");
            }
            Err(e) => match rollwave_tls::describe_error(&e) {
                Some(tls) => {
                    tracing::error!(server = %server, error = %tls, retry_in = ?backoff, "enrolling: the control plane's certificate refused")
                }
                None => {
                    tracing::warn!(server = %server, error = %rollwave_core::error_chain(&e), retry_in = ?backoff, "enrolling: control plane unreachable")
                }
            },
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
    unreachable!("the attempts never end")
}

/// The `Authorization` header for the node's requests, marked sensitive so
/// that it is never logged.
pub fn auth_header(token: &str) -> anyhow::Result<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .context("the node credential is not a valid header value")?;
    value.set_sensitive(true);
    Ok(value)
}
