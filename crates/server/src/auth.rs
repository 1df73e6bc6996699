//! Who is calling: every request but the health check and the dashboard's
//! static files carries a token (`Authorization: Bearer rw_<id>_<secret>`),
//! and the route it asks for names the [`Access`] it needs.
//!
//! Tokens live in the store (hashed) and in memory here, so checking one
//! costs a map lookup and a sha256, never a query. Every change (create,
//! revoke, an enrollment spending a join token) is serialised by one lock,
//! so two enrollments cannot both spend the last use of a one-time token,
//! and is in the store before anyone holds the token's secret.

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
    by_id: RwLock<Table>,
    write: tokio::sync::Mutex<()>,
}

/// Every token by id, with the lookups that would otherwise scan them all
/// (an enrollment asks whether its node already has a credential, and
/// whether the name is taken: thousands of enrollments would cost
/// thousands of scans each). A token's name and node never change.
#[derive(Default)]
struct Table {
    by_id: HashMap<String, TokenRecord>,
    by_name: HashMap<String, Vec<String>>,
    by_node: HashMap<String, Vec<String>>,
}

impl Table {
    fn insert(&mut self, t: TokenRecord) {
        let id = t.id.clone();
        let (name, node) = (t.name.clone(), t.node.clone());
        if self.by_id.insert(id.clone(), t).is_none() {
            self.by_name.entry(name).or_default().push(id.clone());
            if let Some(node) = node {
                self.by_node.entry(node).or_default().push(id);
            }
        }
    }

    fn remove(&mut self, id: &str) {
        let Some(t) = self.by_id.remove(id) else {
            return;
        };
        if let Some(ids) = self.by_name.get_mut(&t.name) {
            ids.retain(|i| i != id);
        }
        if let Some(ids) = t.node.as_ref().and_then(|n| self.by_node.get_mut(n)) {
            ids.retain(|i| i != id);
        }
    }

    fn get(&self, id: &str) -> Option<&TokenRecord> {
        self.by_id.get(id)
    }

    fn values(&self) -> impl Iterator<Item = &TokenRecord> {
        self.by_id.values()
    }

    fn named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a TokenRecord> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
    }

    fn of_node<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a TokenRecord> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
    }
}

/// A new token and its secret, which exists only in this answer.
pub struct Issued {
    pub record: TokenRecord,
    pub token: String,
}

impl Tokens {
    pub async fn load(store: &dyn Store) -> anyhow::Result<Tokens> {
        let mut by_id = Table::default();
        for t in store.list_tokens().await? {
            by_id.insert(t);
        }
        Ok(Tokens {
            by_id: RwLock::new(by_id),
            write: tokio::sync::Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.by_id.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.by_id.write().unwrap_or_else(|e| e.into_inner())
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
        if !self.read().by_id.is_empty() {
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
        if self.read().named(name).any(|t| t.is_live(now)) {
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
        self.table().insert(record.clone());
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
        // Replaces the record under its id; its name and node are the same.
        self.table().by_id.insert(record.id.clone(), record.clone());
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
        let name = format!("agent@{node}");
        validate_token_name("name", &name)?;
        let (id, secret) = (random_hex(6)?, random_hex(32)?);
        let write = self.write.lock().await;
        let now = now_ms();
        let (join, credential) = {
            let mut table = self.table();
            let Some(mut join) = table.get(join_id).cloned() else {
                return Err(unauthorized(TokenProblem::Unknown.to_string()));
            };
            if !join.is_live(now) {
                // Raced with a revocation or another enrollment.
                return Err(unauthorized(TokenProblem::UsedUp.to_string()));
            }
            if table
                .of_node(node)
                .any(|t| t.role == Role::Agent && t.is_live(now))
            {
                return Err(ApiError::conflict(format!(
                    "node {node:?} is already enrolled; revoke its credential (rollwave token revoke {name}) to enroll it again"
                )));
            }
            if table.named(&name).any(|t| t.is_live(now)) {
                return Err(ApiError::conflict(format!(
                    "name: a live token is already called {name:?}; revoke it first"
                )));
            }
            let spent = match join.uses_left.as_mut() {
                Some(left) => {
                    *left -= 1;
                    true
                }
                None => false,
            };
            let credential = TokenRecord {
                id: id.clone(),
                name: name.clone(),
                role: Role::Agent,
                node: Some(node.to_string()),
                secret_sha256: hash_secret(&secret),
                created_at: now,
                created_by: join.name.clone(),
                expires_at: None,
                revoked_at: None,
                uses_left: None,
            };
            // Taken in memory now, before the disk, so that a second
            // enrollment of the node is refused while this one is written.
            // Nobody holds the secret until the write is durable.
            table.insert(credential.clone());
            table.by_id.insert(join.id.clone(), join.clone());
            (spent.then_some(join), credential)
        };
        // A join token with a use count is written under the lock, with the
        // credential in one transaction: two enrollments cannot store their
        // counts out of order. One without (a fleet's join token) changes
        // nothing of its own, so enrollments release the lock and their
        // writes share commits.
        let (records, _held) = match join {
            Some(join) => (vec![join, credential.clone()], Some(write)),
            None => {
                drop(write);
                (vec![credential.clone()], None)
            }
        };
        if let Err(e) = store.put_tokens(&records).await {
            // Never handed out: forget it. A use spent in memory only grants
            // nothing; the store still has it, as after a crash.
            self.table().remove(&id);
            return Err(e.into());
        }
        Ok(Issued {
            record: credential,
            token: format!("rw_{id}_{secret}"),
        })
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
