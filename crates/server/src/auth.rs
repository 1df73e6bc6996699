//! Who is calling: every request but the health check and the dashboard's
//! static files carries a token (`Authorization: Bearer rw_<id>_<secret>`),
//! and the route it asks for names the [`Access`] it needs.
//!
//! Tokens live in the store (hashed) and in memory here, so checking one
//! costs a map lookup and a sha256, never a query. Every change (create,
//! revoke, an enrollment spending a join token) goes to the store first and
//! is serialised by one lock, so two enrollments cannot both spend the last
//! use of a one-time token.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rollwave_api::ErrorCode;
use rollwave_core::{
    hash_secret, split_token, validate_token_name, Access, Role, Timestamp, TokenProblem,
    TokenRecord,
};
use rollwave_store::Store;

use crate::{now_ms, ApiError, Shared};

/// The authenticated caller of a request, in its extensions (and in its
/// response's, for the audit trail).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    pub role: Role,
    /// `agent`: the node its credential belongs to.
    pub node: Option<String>,
    /// The token's id, to spend a join token's use.
    pub token_id: String,
}

/// The bootstrap admin token's file name, in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

pub struct Tokens {
    by_id: RwLock<HashMap<String, TokenRecord>>,
    write: tokio::sync::Mutex<()>,
}

/// A new token and its secret, which exists only in this answer.
pub struct Issued {
    pub record: TokenRecord,
    pub token: String,
}

impl Tokens {
    pub async fn load(store: &dyn Store) -> anyhow::Result<Tokens> {
        let by_id = store
            .list_tokens()
            .await?
            .into_iter()
            .map(|t| (t.id.clone(), t))
            .collect();
        Ok(Tokens {
            by_id: RwLock::new(by_id),
            write: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, TokenRecord>> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The record a presented token stands for, if it is live now.
    pub fn authenticate(&self, token: &str, now: Timestamp) -> Result<TokenRecord, TokenProblem> {
        let (id, secret) = split_token(token)?;
        let record = self.read().get(id).cloned().ok_or(TokenProblem::Unknown)?;
        record.check(secret, now)?;
        Ok(record)
    }

    /// Whether the token `id` is still live: sessions ask this as they run,
    /// so a revoked or expired credential ends its session.
    pub fn is_live(&self, id: &str, now: Timestamp) -> bool {
        self.read().get(id).is_some_and(|t| t.is_live(now))
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        let mut all: Vec<TokenRecord> = self.read().values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        all
    }

    /// Creates the first admin token if there is no token at all, and writes
    /// it to `data_dir/admin.token`, readable by its owner only.
    pub async fn bootstrap(&self, store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
        if !self.read().is_empty() {
            return Ok(());
        }
        let issued = self
            .issue(
                store,
                BOOTSTRAP_ADMIN,
                Role::Admin,
                "rollwave server",
                None,
                None,
                None,
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        rollwave_tls::write_atomic(&path, format!("{}\n", issued.token).as_bytes(), 0o600)?;
        tracing::warn!(path = %path.display(), "first start: wrote the bootstrap admin token");
        println!("bootstrap admin token written to {}", path.display());
        Ok(())
    }

    /// Creates a token; its name must not be taken by a live token.
    #[allow(clippy::too_many_arguments)]
    pub async fn issue(
        &self,
        store: &dyn Store,
        name: &str,
        role: Role,
        created_by: &str,
        ttl_ms: Option<u64>,
        uses: Option<u32>,
        node: Option<String>,
    ) -> Result<Issued, ApiError> {
        let _write = self.write.lock().await;
        self.issue_locked(store, name, role, created_by, ttl_ms, uses, node)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn issue_locked(
        &self,
        store: &dyn Store,
        name: &str,
        role: Role,
        created_by: &str,
        ttl_ms: Option<u64>,
        uses: Option<u32>,
        node: Option<String>,
    ) -> Result<Issued, ApiError> {
        validate_token_name("name", name)?;
        let now = now_ms();
        if self
            .read()
            .values()
            .any(|t| t.name == name && t.is_live(now))
        {
            return Err(ApiError::conflict(format!(
                "name: a live token is already called {name:?}; revoke it first or choose another name"
            )));
        }
        let id = random_hex(6)?;
        let secret = random_hex(32)?;
        let record = TokenRecord {
            id: id.clone(),
            name: name.to_string(),
            role,
            node,
            secret_sha256: hash_secret(&secret),
            created_at: now,
            created_by: created_by.to_string(),
            expires_at: ttl_ms.map(|ttl| now.saturating_add(ttl)),
            revoked_at: None,
            uses_left: uses,
        };
        store.put_token(&record).await?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), record.clone());
        Ok(Issued {
            record,
            token: format!("rw_{id}_{secret}"),
        })
    }

    /// Revokes the live token called `name` (or with id `name`); returns it.
    pub async fn revoke(&self, store: &dyn Store, name: &str) -> Result<TokenRecord, ApiError> {
        let _write = self.write.lock().await;
        let now = now_ms();
        let mut record = {
            let all = self.read();
            let mut found = all
                .values()
                .filter(|t| (t.name == name || t.id == name) && t.revoked_at.is_none());
            match (found.next(), found.next()) {
                (Some(t), None) => t.clone(),
                (Some(_), Some(_)) => {
                    return Err(ApiError::conflict(format!(
                        "more than one token is called {name:?}: revoke it by id"
                    )))
                }
                (None, _) => {
                    return Err(ApiError::not_found(format!(
                        "no unrevoked token is called {name:?}"
                    )))
                }
            }
        };
        record.revoked_at = Some(now);
        self.put(store, record).await
    }

    async fn put(&self, store: &dyn Store, record: TokenRecord) -> Result<TokenRecord, ApiError> {
        store.put_token(&record).await?;
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone(), record.clone());
        Ok(record)
    }

    /// Spends one use of the join token `join_id` and issues `node` its own
    /// credential. A node that already holds a live credential is refused:
    /// a join token must not let anyone take over an enrolled node's name.
    pub async fn enroll(
        &self,
        store: &dyn Store,
        join_id: &str,
        node: &str,
    ) -> Result<Issued, ApiError> {
        let _write = self.write.lock().await;
        let now = now_ms();
        let Some(mut join) = self.read().get(join_id).cloned() else {
            return Err(unauthorized(TokenProblem::Unknown.to_string()));
        };
        if !join.is_live(now) {
            // Raced with a revocation or another enrollment.
            return Err(unauthorized(TokenProblem::UsedUp.to_string()));
        }
        if self
            .read()
            .values()
            .any(|t| t.role == Role::Agent && t.node.as_deref() == Some(node) && t.is_live(now))
        {
            return Err(ApiError::conflict(format!(
                "node {node:?} is already enrolled; revoke its credential (rollwave token revoke agent@{node}) to enroll it again"
            )));
        }
        if let Some(left) = join.uses_left.as_mut() {
            *left -= 1;
        }
        // The use is spent before the credential exists: a crash in between
        // costs a use, never grants a second one.
        let join_name = join.name.clone();
        self.put(store, join).await?;
        self.issue_locked(
            store,
            &format!("agent@{node}"),
            Role::Agent,
            &join_name,
            None,
            None,
            Some(node.to_string()),
        )
        .await
    }
}

fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| ApiError::internal(format!("the system's random source failed: {e}")))?;
    Ok(hex::encode(buf))
}

pub fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, message)
}

/// The access each route needs, by method and route pattern.
pub type AccessTable = Arc<HashMap<(Method, &'static str), Access>>;

/// Authenticates the caller and checks its role against the route's
/// [`Access`]; answers 401 or 403 otherwise. The caller goes into the
/// request's extensions and into the response's, where the audit trail,
/// which runs outside this layer, reads it.
pub async fn authorize(
    State((shared, table)): State<(Arc<Shared>, AccessTable)>,
    mut request: Request,
    next: Next,
) -> Response {
    let access = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| table.get(&(request.method().clone(), p.as_str())).copied())
        // Unknown routes answer 404 to callers who may read, 401 to others.
        .unwrap_or(Access::Read);
    if access == Access::Public {
        return next.run(request).await;
    }
    let record = match presented(&request) {
        None => Err(unauthorized(
            "a token is required: pass --token (or ROLLWAVE_TOKEN), or send Authorization: Bearer <token>",
        )),
        Some(token) => shared
            .tokens
            .authenticate(&token, now_ms())
            .map_err(|p| unauthorized(p.to_string())),
    };
    let record = match record {
        Ok(record) => record,
        Err(e) => {
            let mut response = e.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    let caller = Caller {
        name: record.name.clone(),
        role: record.role,
        node: record.node.clone(),
        token_id: record.id.clone(),
    };
    let mut response = if record.role.allows(access) {
        request.extensions_mut().insert(caller.clone());
        next.run(request).await
    } else {
        ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "token {:?} has the {} role; this needs {}",
                record.name,
                record.role,
                access.roles()
            ),
        )
        .into_response()
    };
    response.extensions_mut().insert(caller);
    response
}

/// The token a request carries: its bearer token, or, for the change
/// stream only, `access_token` in the query, as browsers open event streams
/// without custom headers.
fn presented(request: &Request) -> Option<String> {
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    if request.uri().path() != rollwave_api::EVENTS_PATH {
        return None;
    }
    request.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "access_token").then(|| v.to_string())
    })
}
