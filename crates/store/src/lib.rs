//! Durable state of the control plane behind a small [`Store`] trait.
//!
//! The SQLite engine is the embedded default; other engines (etcd) implement
//! the same trait and must pass the same [`conformance`] suite.

pub mod backup;
pub mod conformance;
pub mod copy;
#[cfg(feature = "etcd")]
pub mod etcd;
mod sqlite;

use async_trait::async_trait;
use rollwave_core::{
    ActiveVersion, AuditEntry, NodeView, Release, Rollout, RolloutSummary, SignatureRecord,
    TokenRecord,
};

#[cfg(feature = "etcd")]
pub use etcd::{EtcdOptions, EtcdStore};
pub use sqlite::SqliteStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A compare-and-swap lost: someone else wrote the record first.
    #[error(
        "rollout {id} was changed concurrently (expected generation {expected}, found {found})"
    )]
    Conflict { id: u64, expected: u64, found: u64 },
    #[error("rollout {0} not found")]
    NotFound(u64),
    #[error("rollout {0} already exists")]
    AlreadyExists(u64),
    #[error("storage failure: {0}")]
    Backend(String),
    #[error("corrupt record {key}: {message}")]
    Corrupt { key: String, message: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Outcome of [`Store::put_release`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutRelease {
    Created(Release),
    /// The same service@version with the same sha256 was already stored.
    Unchanged(Release),
    /// The same service@version exists with different content; nothing stored.
    Conflict(Release),
    /// The same content now carries the pushed signature beside those it
    /// had.
    Signed(Release),
    /// The same content with a new signature, but the release carries as
    /// many as it may ([`rollwave_core::MAX_RELEASE_SIGNATURES`]); nothing
    /// stored.
    TooManySignatures(Release),
}

/// One rollout to write, with what changed since the copy its writer read,
/// so that a write costs what changed and not the size of the rollout: a
/// node result rewrites one node record and appends to the log.
///
/// The write compares and swaps on `rollout.generation`, as
/// [`Store::update_rollout`] does.
#[derive(Debug, Clone)]
pub struct RolloutWrite<'a> {
    pub rollout: &'a Rollout,
    /// The nodes whose records changed; `None` rewrites every one.
    pub nodes: Option<Vec<&'a str>>,
    /// How many of `rollout.events` are stored already: only the ones after
    /// them are appended. The log is never rewritten, except by a full write.
    pub events_stored: usize,
    /// Whether the plan (`batches`, `left_out`) changed: it is written at
    /// the start and never after, except by a full write.
    pub plan: bool,
}

impl<'a> RolloutWrite<'a> {
    /// Rewrites everything: nodes, log and plan.
    pub fn full(rollout: &'a Rollout) -> RolloutWrite<'a> {
        RolloutWrite {
            rollout,
            nodes: None,
            events_stored: 0,
            plan: true,
        }
    }

    /// Writes what differs between `stored`, the copy the store holds, and
    /// `next`, its successor. Finding the changed nodes compares every node
    /// in memory, which costs far less than writing them.
    pub fn diff(stored: &Rollout, next: &'a Rollout) -> RolloutWrite<'a> {
        let appended_only = next.events.len() >= stored.events.len();
        if stored.id != next.id || !appended_only {
            return RolloutWrite::full(next);
        }
        let nodes = next
            .nodes
            .iter()
            .filter(|(name, n)| stored.nodes.get(*name) != Some(*n))
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>();
        // A node dropped from the rollout (never done today) needs its
        // record removed: only a full write does that.
        if stored.nodes.len() + nodes.len() < next.nodes.len()
            || stored.nodes.keys().any(|k| !next.nodes.contains_key(k))
        {
            return RolloutWrite::full(next);
        }
        RolloutWrite {
            rollout: next,
            nodes: Some(nodes),
            events_stored: stored.events.len(),
            plan: stored.batches != next.batches || stored.left_out != next.left_out,
        }
    }
}

/// What one call of [`Store::prune_rollouts`] or [`Store::prune_audit`]
/// may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    /// Only records older than this (Unix milliseconds): rollouts that
    /// finished before it, audit entries written before it.
    /// `Timestamp::MAX` lets the count alone decide.
    pub before: rollwave_core::Timestamp,
    /// The newest this many records (by id, active rollouts included) are
    /// kept whatever their age. At least one always is: the newest id stays
    /// in the store, so ids are never handed out again even if a counter
    /// were lost.
    pub keep: usize,
    /// At most this many are deleted by one call, so that a large backlog
    /// is pruned in steps of bounded work (one transaction each on SQLite,
    /// transactions of bounded size on etcd) rather than in one.
    pub limit: usize,
}

/// This replica's leadership, as [`Election::campaign`] won it.
pub struct Lead {
    /// Increases with each election: what tasks carry so that agents can
    /// tell an old leader's from the current one's.
    pub term: u64,
    /// Says why, once leadership is lost (the lease could not be renewed).
    pub lost: tokio::sync::oneshot::Receiver<String>,
}

/// Choosing one leader among the control planes that share a store.
#[async_trait]
pub trait Election: Send + Sync {
    /// Waits until this replica leads, announcing `address` (where the
    /// others reach it). From then on every write through the store
    /// requires that it still leads.
    async fn campaign(&self, address: &str) -> Result<Lead>;
    /// The current leader's address, if one is elected.
    async fn leader(&self) -> Result<Option<String>>;
    /// Lists this replica at `address` while it lives (a lease); the
    /// channel says why once the listing lapsed.
    async fn register(&self, address: &str) -> Result<tokio::sync::oneshot::Receiver<String>>;
    /// The addresses of the replicas listed now, this one included.
    async fn replicas(&self) -> Result<Vec<String>>;
    /// A secret every replica reads from the store, for the requests only
    /// replicas make of each other.
    fn secret(&self) -> &str;
    /// The id the first control plane on this store chose for its cluster.
    fn cluster_id(&self) -> &str;
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Leader election, on engines several control planes can share; `None`
    /// on SQLite, whose one control plane leads by itself.
    fn election(&self) -> Option<&dyn Election> {
        None
    }

    /// Inserts or replaces a node by name. The `online` field is not stored:
    /// it is a property of the live session, not of the node.
    async fn upsert_node(&self, node: &NodeView) -> Result<()> {
        self.upsert_nodes(std::slice::from_ref(node)).await
    }
    /// Inserts or replaces several nodes in one transaction.
    async fn upsert_nodes(&self, nodes: &[NodeView]) -> Result<()>;
    /// Enrolls in one transaction: the join token with its use spent and
    /// the node's new credential, so that neither is stored without the other.
    async fn put_tokens(&self, tokens: &[TokenRecord]) -> Result<()>;
    /// All nodes, ordered by name, with `online = false`.
    async fn list_nodes(&self) -> Result<Vec<NodeView>>;

    /// Stores a new release, or answers a push onto an existing one as
    /// [`Release::repush`] does, in one write.
    async fn put_release(&self, release: &Release) -> Result<PutRelease>;
    /// Adds a signature to the stored release `service@version` as a push
    /// of its own bytes with that signature would; `None` when there is no
    /// such release (nothing stored).
    async fn sign_release(
        &self,
        service: &str,
        version: &str,
        signature: &SignatureRecord,
    ) -> Result<Option<PutRelease>>;
    async fn get_release(&self, service: &str, version: &str) -> Result<Option<Release>>;
    /// All releases ordered by service, then creation time.
    async fn list_releases(&self) -> Result<Vec<Release>>;
    /// Deletes the release `service@version` with its signatures, in one
    /// write; whether it existed (deleting one that does not is not an
    /// error). What uses a release is the caller's to check first.
    async fn delete_release(&self, service: &str, version: &str) -> Result<bool>;

    /// Sets a service's active version (the version gate) in one write.
    async fn set_active_version(&self, active: &ActiveVersion) -> Result<()>;
    /// Every service's active version, by service name.
    async fn list_active_versions(&self) -> Result<Vec<ActiveVersion>>;
    async fn get_active_version(&self, service: &str) -> Result<Option<ActiveVersion>> {
        Ok(self
            .list_active_versions()
            .await?
            .into_iter()
            .find(|a| a.service == service))
    }

    /// Allocates the next rollout id; ids are never reused, even after a crash.
    async fn next_rollout_id(&self) -> Result<u64>;
    /// Stores new rollouts with generation 1, all or none (the rollouts of
    /// one multi-service request); returns them as stored.
    async fn insert_rollouts(&self, rollouts: &[Rollout]) -> Result<Vec<Rollout>>;
    /// Stores one new rollout with generation 1; returns it as stored.
    async fn insert_rollout(&self, rollout: &Rollout) -> Result<Rollout> {
        let mut stored = self.insert_rollouts(std::slice::from_ref(rollout)).await?;
        Ok(stored.remove(0))
    }
    /// Writes several rollouts in one transaction (one sync to disk), each
    /// only if its stored generation equals `rollout.generation`. Each gets
    /// its own outcome, the new generation or why it was refused; a refused
    /// one changes nothing and does not stop the others. `Err` only if
    /// nothing could be written.
    async fn write_rollouts(&self, writes: &[RolloutWrite<'_>]) -> Result<Vec<Result<u64>>>;
    /// Replaces a rollout if its stored generation equals `rollout.generation`;
    /// returns it as stored, with the generation incremented.
    async fn update_rollout(&self, rollout: &Rollout) -> Result<Rollout> {
        let generation = self
            .write_rollouts(&[RolloutWrite::full(rollout)])
            .await?
            .remove(0)?;
        Ok(Rollout {
            generation,
            ..rollout.clone()
        })
    }
    async fn get_rollout(&self, id: u64) -> Result<Option<Rollout>>;
    /// All rollouts, newest first.
    async fn list_rollouts(&self) -> Result<Vec<Rollout>>;
    /// The rollouts the control plane still has to watch
    /// ([`Rollout::is_active`] when they were written), oldest first.
    async fn list_active_rollouts(&self) -> Result<Vec<Rollout>>;
    /// Up to `limit` rollouts with ids below `before` (if given), newest
    /// first, as summaries: reading them costs their node counts, not their
    /// node records.
    async fn list_rollout_summaries(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<RolloutSummary>>;

    /// Deletes up to `prune.limit` rollouts, oldest first, that ended
    /// (their state is terminal and nothing is left to do:
    /// [`Rollout::is_active`] is false) before `prune.before` and are not
    /// among the newest `prune.keep`, with their nodes, plan and log.
    /// Never an active rollout, nor one written since it was looked at.
    /// Returns how many were deleted; fewer than the limit means none is
    /// left to prune. Ids are never reused after.
    async fn prune_rollouts(&self, prune: &Prune) -> Result<usize>;

    /// Appends to the audit trail; returns the entry's id (increasing).
    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64>;
    /// The newest `limit` entries, newest first, with ids below `before` if
    /// given (to page back).
    async fn list_audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>>;
    /// Deletes up to `prune.limit` audit entries, oldest first, written
    /// before `prune.before` and not among the newest `prune.keep`. The
    /// trail is read in id order and the first entry written at or after
    /// `prune.before` ends the step, so a call costs what it deletes.
    /// Returns how many were deleted.
    async fn prune_audit(&self, prune: &Prune) -> Result<usize>;

    /// Inserts or replaces a token by id.
    async fn put_token(&self, token: &TokenRecord) -> Result<()>;
    /// Every token, revoked and expired ones included, oldest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;

    /// Everything the store holds, as of one instant (one SQLite read
    /// transaction, one etcd revision), however much is written meanwhile:
    /// what `store backup` saves and `store copy` moves.
    async fn snapshot(&self) -> Result<Snapshot>;
    /// What terms are counted from: the term itself on SQLite (whose one
    /// control plane leads for good), added to etcd's election revision.
    async fn term_base(&self) -> Result<u64>;
    /// Makes this store continue the history `snapshot` was taken of: the
    /// terms it hands out from now on are above `term`, and (etcd) it takes
    /// the cluster id `cluster`, which replicas' data dirs are bound to.
    async fn continue_from(&self, term: u64, cluster: Option<&str>) -> Result<()>;
}

/// A store's whole content at one instant ([`Store::snapshot`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub nodes: Vec<NodeView>,
    pub tokens: Vec<TokenRecord>,
    /// Oldest first within a service, as [`Store::list_releases`].
    pub releases: Vec<Release>,
    pub active_versions: Vec<ActiveVersion>,
    /// Newest first, as [`Store::list_rollouts`].
    pub rollouts: Vec<Rollout>,
    /// Oldest first.
    pub audit: Vec<AuditEntry>,
    /// At least every term a leader on this store was elected in so far:
    /// agents remember the highest term they saw and refuse lower ones, so
    /// a store that takes over this history must start above it.
    pub term: u64,
    /// The cluster id (etcd); SQLite's lone control plane has none.
    pub cluster: Option<String>,
}

/// Where the control plane keeps its state: `--store sqlite:PATH` or
/// `--store etcd://host1:2379,host2:2379`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// One SQLite file.
    Sqlite(std::path::PathBuf),
    /// etcd's client endpoints (`http://` or `https://` each).
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<StoreUrl, String> {
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(
                    "sqlite: needs a file path, like sqlite:./rollwave-data/rollwave.db".into(),
                );
            }
            return Ok(StoreUrl::Sqlite(path.into()));
        }
        let (scheme, hosts) = if let Some(h) = s.strip_prefix("etcd://") {
            ("http", h)
        } else if let Some(h) = s.strip_prefix("etcds://") {
            ("https", h)
        } else {
            return Err(format!(
                "{s:?}: expected sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)"
            ));
        };
        let mut endpoints = Vec::new();
        for host in hosts.trim_end_matches('/').split(',') {
            let (name, port) = host.rsplit_once(':').ok_or_else(|| {
                format!("{host:?}: an etcd endpoint needs a port, like {host}:2379")
            })?;
            if name.is_empty() || name.contains('/') || port.parse::<u16>().is_err() {
                return Err(format!("{host:?}: not HOST:PORT"));
            }
            endpoints.push(format!("{scheme}://{host}"));
        }
        Ok(StoreUrl::Etcd(endpoints))
    }
}

/// What opening the store needs: where, and for etcd, how to log in.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: StoreUrl,
    /// etcd: the CA that signed its certificate (turns TLS on).
    pub ca_file: Option<std::path::PathBuf>,
    /// etcd: a client certificate and key, for `--client-cert-auth`.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// etcd: its own user and password, when its authentication is on.
    pub user: Option<String>,
    pub password: Option<String>,
    /// etcd: the key prefix every record lives under.
    pub prefix: String,
}

impl StoreConfig {
    pub fn sqlite(path: std::path::PathBuf) -> StoreConfig {
        StoreConfig {
            url: StoreUrl::Sqlite(path),
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password: None,
            prefix: String::new(),
        }
    }
}

/// Opens the store a [`StoreConfig`] names. Errors are one line naming the
/// file or the endpoints and the reason.
pub async fn open(config: &StoreConfig) -> Result<std::sync::Arc<dyn Store>> {
    match &config.url {
        StoreUrl::Sqlite(path) => Ok(std::sync::Arc::new(SqliteStore::open(path)?)),
        #[cfg(feature = "etcd")]
        StoreUrl::Etcd(endpoints) => {
            let store = EtcdStore::connect(&EtcdOptions {
                endpoints: endpoints.clone(),
                prefix: config.prefix.clone(),
                ca_file: config.ca_file.clone(),
                cert_file: config.cert_file.clone(),
                key_file: config.key_file.clone(),
                user: config.user.clone(),
                password: config.password.clone(),
            })
            .await?;
            Ok(std::sync::Arc::new(store))
        }
        #[cfg(not(feature = "etcd"))]
        StoreUrl::Etcd(_) => Err(StoreError::Backend(
            "this rollwave was built without the etcd engine: build it with `--features etcd` (needs protoc: apt install protobuf-compiler)".into(),
        )),
    }
}
