//! `rollwave token`: API tokens, as admins manage them.

use std::process::ExitCode;

use rollwave_api::{CreateToken, CreatedToken};
use rollwave_core::{Role, TokenView};

use crate::cli::{Cli, TokenCommand};
use crate::client::{user_error, ApiClient};
use crate::commands::{now_ms, print_json};
use crate::render;

/// How client commands reach the control plane, from the global flags.
pub struct Connection {
    server: String,
    tls: rollwave_tls::ClientTls,
    token: Option<String>,
    token_file: Option<std::path::PathBuf>,
}

impl Cli {
    pub fn connection(&self) -> Connection {
        Connection {
            server: self.server.clone(),
            tls: rollwave_tls::ClientTls {
                ca_file: self.ca_file.clone(),
                pin: self.pin,
            },
            token: self.token.clone(),
            token_file: self.token_file.clone(),
        }
    }
}

impl Connection {
    /// The control plane's address, as given.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// How the control plane's certificate is verified.
    pub fn tls(&self) -> &rollwave_tls::ClientTls {
        &self.tls
    }

    /// The API client for this command line: its server, how to verify it,
    /// and its token.
    pub fn api(&self) -> anyhow::Result<ApiClient> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        user_error(format!("--token-file: reading {}: {e}", path.display()))
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(ApiClient::new(&self.server, &self.tls)?.with_token(token))
    }
}

pub async fn run(api: ApiClient, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create {
            role,
            name,
            ttl,
            once,
            uses,
            node,
            json,
        } => {
            let role = Role::parse("--role", &role).map_err(|e| user_error(e.to_string()))?;
            let uses = if once { Some(1) } else { uses };
            let created: CreatedToken = api
                .post(
                    "/v1/tokens",
                    &CreateToken {
                        name,
                        role,
                        ttl,
                        uses,
                        node,
                    },
                )
                .await?;
            if json {
                print_json(&created)?;
            } else {
                let v = &created.view;
                eprintln!(
                    "created {} token {} (id {}){}; it is shown only now:",
                    v.role,
                    v.name,
                    v.id,
                    v.expires_at
                        .map(|at| format!(", expires in {}", render::duration_until(now_ms(), at)))
                        .unwrap_or_default()
                );
                crate::outln!("{}", created.token);
            }
        }
        TokenCommand::List { json } => {
            let tokens: Vec<TokenView> = api.get("/v1/tokens").await?;
            if json {
                print_json(&tokens)?;
            } else {
                crate::out!("{}", render::tokens(&tokens, now_ms()));
            }
        }
        TokenCommand::Revoke { name, json } => {
            let encoded: String = name
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let revoked: TokenView = api.delete(&format!("/v1/tokens/{encoded}")).await?;
            if json {
                print_json(&revoked)?;
            } else {
                crate::outln!(
                    "revoked {} token {} (id {})",
                    revoked.role,
                    revoked.name,
                    revoked.id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
