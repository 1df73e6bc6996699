//! A [`Store`] on etcd (v3 API, 3.4 or later), for control planes that must
//! outlive one machine: every record is a small JSON value under one key
//! prefix (default `/rollwave/`), and every decision is an etcd transaction.
//!
//! Keys, below the prefix:
//!
//! ```text
//! meta                          engine schema version, cluster id, replicas' secret
//! leader/<lease>                the election (etcd's election service)
//! replicas/<lease>              each live replica's address
//! nodes/<name>                  node views
//! releases/<service>/<version>  release records (never the artifacts)
//! active/<service>              each service's active version
//! counters/rollout_id           the last rollout id handed out
//! counters/audit_id             the last audit entry id
//! gen/<id>                      a rollout's generation: what writes compare
//! rollout/<id>                  its header (everything but what grows with the fleet)
//! plan/<id>                     its batches and left-out nodes
//! rnode/<id>/<name>             one record per node of the rollout
//! rlog/<id>/<seq>               its log, one record per entry
//! summary/<id>                  counts per node state and the first problems
//! live/<id>                     present while the control plane watches it
//! audit/<id>                    the audit trail
//! tokens/<id>                   API tokens
//! ```
//!
//! Ids and sequence numbers are zero-padded to 20 digits so that etcd's key
//! order is their numeric order. A rollout write compares `gen/<id>` and
//! writes what changed ([`RolloutWrite`]) in the same transaction. etcd caps
//! a transaction's operations (`--max-txn-ops`, 128 by default) and a
//! request's size (1.5 MiB): a write larger than that is split, its parts
//! first (each part still compares the generation, so none lands on a
//! rollout that moved on) and the header and generation last, so a reader
//! never sees the new generation before every part of it. Split writes rely
//! on one writer per rollout, the leader's reconciler.

mod leader;
pub use leader::LEASE_TTL;
mod rollouts;
pub mod testing;
#[cfg(test)]
mod tests;

use std::sync::PoisonError;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use rollwave_core::{
    ActiveVersion, AuditEntry, NodeView, Release, Repush, Rollout, RolloutSummary, SignatureRecord,
    TokenRecord,
};
use serde::{Deserialize, Serialize};

use crate::{Prune, PutRelease, Result, RolloutWrite, Snapshot, Store, StoreError};

/// The layout of keys this code writes and understands.
const SCHEMA_VERSION: u64 = 1;
/// Operations per transaction: under etcd's default `--max-txn-ops` (128),
/// with room for the compares.
const MAX_TXN_OPS: usize = 100;
/// Bytes of values per transaction: well under etcd's default request limit
/// (1.5 MiB).
const MAX_TXN_BYTES: usize = 512 << 10;
/// Keys per page when reading a range, so that no response nears gRPC's
/// message limit however large the fleet.
const PAGE: i64 = 500;
/// How often a lost compare-and-swap on a counter or a release is retried
/// before the store gives up (each loss means another writer succeeded).
const CAS_ATTEMPTS: usize = 64;

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port` (a bare `host:port` is
    /// plain HTTP).
    pub endpoints: Vec<String>,
    /// Key prefix; `/rollwave/` if empty.
    pub prefix: String,
    /// The CA that signed etcd's certificate (implies TLS).
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate and its key, for etcd's `--client-cert-auth`.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
    /// etcd's own users, when its authentication is on.
    pub user: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    schema: u64,
    /// Chosen by the first control plane that used the prefix; every
    /// replica logs it, so that two clusters sharing an etcd by mistake
    /// read apart.
    cluster: String,
    /// What replicas show each other on the requests only they make
    /// (copying release artifacts): whoever reads etcd holds the cluster
    /// anyway.
    #[serde(default)]
    secret: String,
}

pub struct EtcdStore {
    client: Client,
    /// For campaigning alone: without the request timeout, since etcd
    /// resigns a campaign whose call is cancelled (deleting its key), and
    /// a replica campaigning again would go to the back of the line,
    /// behind one that started later.
    campaigner: Client,
    /// While this replica leads: its election key and that key's creation
    /// revision, which every write requires.
    fence: std::sync::RwLock<Option<(Vec<u8>, i64)>>,
    prefix: String,
    /// For messages: which etcd this is.
    endpoints: String,
    cluster: String,
    secret: String,
}

impl EtcdStore {
    /// Connects and checks (or, on an empty prefix, writes) the schema
    /// version. Errors name the endpoints and the reason in one line.
    pub async fn connect(options: &EtcdOptions) -> Result<EtcdStore> {
        let endpoints = options.endpoints.join(",");
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("etcd {endpoints}: {what}: {e}"))
        };
        if options.endpoints.is_empty() {
            return Err(StoreError::Backend("etcd: no endpoint given".into()));
        }
        // Keep-alive pings find a dead connection, timeouts or not.
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_require_leader(true);
        if let (Some(user), password) = (&options.user, &options.password) {
            connect = connect.with_user(user, password.clone().unwrap_or_default());
        }
        let tls = options.ca_file.is_some()
            || options.cert_file.is_some()
            || options.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &options.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| fail(&format!("reading --store-ca-file {}", ca.display()), &e))?;
                t = t.ca_certificate(Certificate::from_pem(pem));
            }
            match (&options.cert_file, &options.key_file) {
                (Some(cert), Some(key)) => {
                    let read = |p: &std::path::Path| {
                        std::fs::read(p).map_err(|e| fail(&format!("reading {}", p.display()), &e))
                    };
                    t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => return Err(StoreError::Backend(
                    "etcd: a client certificate needs both --store-cert-file and --store-key-file"
                        .into(),
                )),
            }
            connect = connect.with_tls(t);
        }
        let urls: Vec<String> = options
            .endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else if tls {
                    format!("https://{e}")
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let campaigner = Client::connect(&urls, Some(connect.clone()))
            .await
            .map_err(|e| fail("connecting", &e))?;
        let connect = connect.with_timeout(Duration::from_secs(10));
        let client = Client::connect(&urls, Some(connect))
            .await
            .map_err(|e| fail("connecting", &e))?;
        let prefix = if options.prefix.is_empty() {
            "/rollwave/".to_string()
        } else if options.prefix.ends_with('/') {
            options.prefix.clone()
        } else {
            format!("{}/", options.prefix)
        };
        let mut store = EtcdStore {
            client,
            campaigner,
            fence: Default::default(),
            prefix,
            endpoints,
            cluster: String::new(),
            secret: String::new(),
        };
        let meta = store.check_meta().await?;
        store.cluster = meta.cluster;
        store.secret = meta.secret;
        Ok(store)
    }

    /// Reads the schema record, or writes it on a prefix never used; refuses
    /// a newer schema.
    async fn check_meta(&self) -> Result<Meta> {
        let key = self.key("meta");
        let fresh = Meta {
            schema: SCHEMA_VERSION,
            cluster: random_id()?,
            secret: format!("{}{}", random_id()?, random_id()?),
        };
        let resp = self
            .txn(
                vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                vec![TxnOp::put(key.clone(), encode("meta", &fresh)?, None)],
                vec![TxnOp::get(key.clone(), None)],
                "reading the schema version",
            )
            .await?;
        if resp.succeeded() {
            return Ok(fresh);
        }
        let Some(kv) = first_kv(&resp) else {
            return Err(self.backend("reading the schema version", "meta record vanished"));
        };
        let meta: Meta = decode("meta", kv.value())?;
        if meta.schema > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "etcd {} prefix {}: schema version {}, newer than version {SCHEMA_VERSION} this rollwave understands: upgrade rollwave",
                self.endpoints, self.prefix, meta.schema
            )));
        }
        Ok(meta)
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    fn backend(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(format!("etcd {}: {what}: {e}", self.endpoints))
    }

    /// Runs `then` if every compare holds, `or_else` otherwise. Once this
    /// replica leads, every transaction also requires that it still does
    /// (its election key, at the revision it was elected with): a leader
    /// that lost its lease (paused, partitioned) changes nothing, and is
    /// told so rather than seeing a lost compare-and-swap.
    async fn txn(
        &self,
        mut compares: Vec<Compare>,
        then: Vec<TxnOp>,
        or_else: Vec<TxnOp>,
        what: &str,
    ) -> Result<etcd_client::TxnResponse> {
        let fence = self
            .fence
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some((key, rev)) = &fence {
            compares.push(Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                *rev,
            ));
        }
        let resp = self
            .client
            .kv_client()
            .txn(Txn::new().when(compares).and_then(then).or_else(or_else))
            .await
            .map_err(|e| self.backend(what, e))?;
        if let (false, Some((key, rev))) = (resp.succeeded(), fence) {
            let held = self.get(key, what).await?;
            if held.map(|kv| kv.create_revision()) != Some(rev) {
                return Err(self.backend(what, "this replica is no longer the leader"));
            }
        }
        Ok(resp)
    }

    async fn get(&self, key: Vec<u8>, what: &str) -> Result<Option<KeyValue>> {
        let mut resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(|e| self.backend(what, e))?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Every key under `prefix` (below `end` if given), in key order, read
    /// page by page at one revision (the first page's, or `revision`), so
    /// that the whole range is one consistent view. Returns the revision.
    async fn range(
        &self,
        prefix: &[u8],
        revision: Option<i64>,
        what: &str,
    ) -> Result<(Vec<KeyValue>, i64)> {
        let end = prefix_end(prefix);
        let mut start = prefix.to_vec();
        let mut out = Vec::new();
        let mut revision = revision.unwrap_or(0);
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let mut resp = self
                .client
                .kv_client()
                .get(start.clone(), Some(options))
                .await
                .map_err(|e| self.backend(what, e))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            start = last.key().to_vec();
            start.push(0);
            out.extend(kvs);
            if !more {
                break;
            }
        }
        Ok((out, revision))
    }

    /// Up to `limit` keys under `prefix` and below `before` (a full key),
    /// last first.
    async fn range_back(
        &self,
        prefix: &[u8],
        before: Option<Vec<u8>>,
        limit: usize,
        what: &str,
    ) -> Result<Vec<KeyValue>> {
        let end = before.unwrap_or_else(|| prefix_end(prefix));
        let options = GetOptions::new()
            .with_range(end)
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut resp = self
            .client
            .kv_client()
            .get(prefix.to_vec(), Some(options))
            .await
            .map_err(|e| self.backend(what, e))?;
        Ok(resp.take_kvs())
    }

    /// How many keys there are under `prefix`.
    async fn count(&self, prefix: &[u8], what: &str) -> Result<usize> {
        let options = GetOptions::new()
            .with_range(prefix_end(prefix))
            .with_count_only();
        let resp = self
            .client
            .kv_client()
            .get(prefix.to_vec(), Some(options))
            .await
            .map_err(|e| self.backend(what, e))?;
        Ok(usize::try_from(resp.count()).unwrap_or(0))
    }

    /// Up to `limit` keys from `start` to (not including) `end`, in key
    /// order, and whether more follow.
    async fn range_page(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        what: &str,
    ) -> Result<(Vec<KeyValue>, bool)> {
        let options = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut resp = self
            .client
            .kv_client()
            .get(start.to_vec(), Some(options))
            .await
            .map_err(|e| self.backend(what, e))?;
        let more = resp.more();
        Ok((resp.take_kvs(), more))
    }

    /// Runs `ops` in as few transactions as etcd takes, each under
    /// `compares`; `Ok(false)` as soon as one's compares fail.
    async fn put_chunked(&self, compares: &[Compare], ops: Vec<Op>, what: &str) -> Result<bool> {
        for chunk in chunks(ops) {
            let ops = chunk.into_iter().map(Op::into_txn).collect();
            if !self
                .txn(compares.to_vec(), ops, Vec::new(), what)
                .await?
                .succeeded()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Increments a counter and returns the new value; `floor` raises it
    /// first (the ids found in use, if the counter was lost).
    async fn bump(&self, name: &str, floor: u64, extra: impl Fn(u64) -> Vec<Op>) -> Result<u64> {
        let key = self.key(&format!("counters/{name}"));
        let what = format!("allocating a {name}");
        for _ in 0..CAS_ATTEMPTS {
            let current = self.get(key.clone(), &what).await?;
            let (value, compare) = match &current {
                None => (
                    0,
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                ),
                Some(kv) => (
                    parse_u64(&format!("counter {name}"), kv.value())?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
            };
            let next = value.max(floor) + 1;
            let mut ops = vec![TxnOp::put(key.clone(), next.to_string(), None)];
            ops.extend(extra(next).into_iter().map(Op::into_txn));
            if self
                .txn(vec![compare], ops, Vec::new(), &what)
                .await?
                .succeeded()
            {
                return Ok(next);
            }
        }
        Err(self.backend(&what, "too many concurrent writers"))
    }

    /// A release read with its revision, for a compare-and-swap.
    async fn read_release(
        &self,
        key: &[u8],
        service: &str,
        version: &str,
    ) -> Result<Option<(Release, i64)>> {
        let what = format!("reading release {service}@{version}");
        match self.get(key.to_vec(), &what).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((
                decode(&format!("release {service}@{version}"), kv.value())?,
                kv.mod_revision(),
            ))),
        }
    }

    /// Answers a push onto the stored release, storing a new signature only
    /// if nobody changed the record since it was read.
    async fn repush(
        &self,
        key: &[u8],
        existing: Release,
        revision: i64,
        pushed: &Release,
    ) -> Result<Option<PutRelease>> {
        Ok(Some(match existing.repush(pushed) {
            Repush::Same => PutRelease::Unchanged(existing),
            Repush::OtherContent => PutRelease::Conflict(existing),
            Repush::TooManySignatures => PutRelease::TooManySignatures(existing),
            Repush::Sign(signed) => {
                let what = format!("signing release {}@{}", signed.service, signed.version);
                let same = Compare::mod_revision(key.to_vec(), CompareOp::Equal, revision);
                let put = TxnOp::put(key.to_vec(), encode(&what, &*signed)?, None);
                if !self
                    .txn(vec![same], vec![put], Vec::new(), &what)
                    .await?
                    .succeeded()
                {
                    return Ok(None);
                }
                PutRelease::Signed(*signed)
            }
        }))
    }
}

/// One write of a multi-part change.
pub(crate) enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Every key from the first to (not including) the second.
    DeleteRange(Vec<u8>, Vec<u8>),
}

impl Op {
    fn size(&self) -> usize {
        match self {
            Op::Put(k, v) => k.len() + v.len(),
            Op::Delete(k) => k.len(),
            Op::DeleteRange(a, b) => a.len() + b.len(),
        }
    }

    fn into_txn(self) -> TxnOp {
        match self {
            Op::Put(k, v) => TxnOp::put(k, v, None),
            Op::Delete(k) => TxnOp::delete(k, None),
            Op::DeleteRange(a, b) => {
                TxnOp::delete(a, Some(etcd_client::DeleteOptions::new().with_range(b)))
            }
        }
    }
}

/// Splits `ops` into groups that fit one transaction, in order.
fn chunks(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out: Vec<Vec<Op>> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = op.size();
        match out.last_mut() {
            Some(last) if last.len() < MAX_TXN_OPS && bytes + size <= MAX_TXN_BYTES => {
                bytes += size;
                last.push(op);
            }
            _ => {
                bytes = size;
                out.push(vec![op]);
            }
        }
    }
    out
}

/// How many transactions `ops` would take.
fn chunks_needed<'a>(ops: impl Iterator<Item = &'a Op>) -> usize {
    let (mut n, mut len, mut bytes) = (0, 0, 0);
    for op in ops {
        let size = op.size();
        if n == 0 || len >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES {
            n += 1;
            len = 0;
            bytes = 0;
        }
        len += 1;
        bytes += size;
    }
    n
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn first_kv(resp: &etcd_client::TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
        _ => None,
    })
}

/// An id or sequence number as a key part: zero-padded so that key order
/// is numeric order.
fn padded(n: u64) -> String {
    format!("{n:020}")
}

fn encode<T: Serialize + ?Sized>(what: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encoding {what}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn parse_u64(key: &str, bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt {
            key: key.to_string(),
            message: format!("not a number: {:?}", String::from_utf8_lossy(bytes)),
        })
}

fn random_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| StoreError::Backend(format!("choosing a cluster id: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[async_trait]
impl Store for EtcdStore {
    fn election(&self) -> Option<&dyn crate::Election> {
        Some(self)
    }

    async fn upsert_nodes(&self, nodes: &[NodeView]) -> Result<()> {
        let mut ops = Vec::with_capacity(nodes.len());
        for n in nodes {
            let node = NodeView {
                online: false,
                ..n.clone()
            };
            ops.push(Op::Put(
                self.key(&format!("nodes/{}", n.name)),
                encode(&format!("node {}", n.name), &node)?,
            ));
        }
        // Each node view stands alone: a batch split across transactions
        // stores each one whole.
        self.put_chunked(&[], ops, "storing nodes").await?;
        Ok(())
    }

    async fn put_tokens(&self, tokens: &[TokenRecord]) -> Result<()> {
        let mut ops = Vec::new();
        for t in tokens {
            ops.push(TxnOp::put(
                self.key(&format!("tokens/{}", t.id)),
                encode(&format!("token {}", t.name), t)?,
                None,
            ));
        }
        if ops.len() > MAX_TXN_OPS {
            return Err(self.backend("storing tokens", "too many tokens for one transaction"));
        }
        // All or none: a join token's use and the credential it bought.
        self.txn(Vec::new(), ops, Vec::new(), "storing tokens")
            .await?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<NodeView>> {
        let (kvs, _) = self
            .range(&self.key("nodes/"), None, "listing nodes")
            .await?;
        nodes_of(&kvs)
    }

    async fn put_release(&self, release: &Release) -> Result<PutRelease> {
        let key = self.key(&format!("releases/{}/{}", release.service, release.version));
        let what = format!("storing release {}@{}", release.service, release.version);
        for _ in 0..CAS_ATTEMPTS {
            let resp = self
                .txn(
                    vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                    vec![TxnOp::put(key.clone(), encode(&what, release)?, None)],
                    vec![TxnOp::get(key.clone(), None)],
                    &what,
                )
                .await?;
            if resp.succeeded() {
                return Ok(PutRelease::Created(release.clone()));
            }
            let Some(kv) = first_kv(&resp) else { continue };
            let existing: Release = decode(&what, kv.value())?;
            if let Some(answer) = self
                .repush(&key, existing, kv.mod_revision(), release)
                .await?
            {
                return Ok(answer);
            }
        }
        Err(self.backend(&what, "too many concurrent writers"))
    }

    async fn sign_release(
        &self,
        service: &str,
        version: &str,
        signature: &SignatureRecord,
    ) -> Result<Option<PutRelease>> {
        let key = self.key(&format!("releases/{service}/{version}"));
        for _ in 0..CAS_ATTEMPTS {
            let Some((existing, revision)) = self.read_release(&key, service, version).await?
            else {
                return Ok(None);
            };
            let pushed = Release {
                signatures: vec![signature.clone()],
                ..existing.clone()
            };
            if let Some(answer) = self.repush(&key, existing, revision, &pushed).await? {
                return Ok(Some(answer));
            }
        }
        Err(self.backend(
            &format!("signing release {service}@{version}"),
            "too many concurrent writers",
        ))
    }

    async fn get_release(&self, service: &str, version: &str) -> Result<Option<Release>> {
        let key = self.key(&format!("releases/{service}/{version}"));
        Ok(self
            .read_release(&key, service, version)
            .await?
            .map(|(r, _)| r))
    }

    async fn list_releases(&self) -> Result<Vec<Release>> {
        let (kvs, _) = self
            .range(&self.key("releases/"), None, "listing releases")
            .await?;
        releases_of(&kvs)
    }

    async fn delete_release(&self, service: &str, version: &str) -> Result<bool> {
        let key = self.key(&format!("releases/{service}/{version}"));
        let what = format!("deleting release {service}@{version}");
        // Its signatures are part of its record.
        let resp = self
            .txn(
                vec![Compare::create_revision(
                    key.clone(),
                    CompareOp::NotEqual,
                    0,
                )],
                vec![TxnOp::delete(key, None)],
                Vec::new(),
                &what,
            )
            .await?;
        Ok(resp.succeeded())
    }

    async fn set_active_version(&self, active: &ActiveVersion) -> Result<()> {
        let key = self.key(&format!("active/{}", active.service));
        let what = format!("storing the active version of {}", active.service);
        let put = TxnOp::put(key, encode(&what, active)?, None);
        self.txn(Vec::new(), vec![put], Vec::new(), &what).await?;
        Ok(())
    }

    async fn list_active_versions(&self) -> Result<Vec<ActiveVersion>> {
        let (kvs, _) = self
            .range(&self.key("active/"), None, "listing active versions")
            .await?;
        active_versions_of(&kvs)
    }

    async fn get_active_version(&self, service: &str) -> Result<Option<ActiveVersion>> {
        let what = format!("reading the active version of {service}");
        self.get(self.key(&format!("active/{service}")), &what)
            .await?
            .map(|kv| decode(&what, kv.value()))
            .transpose()
    }

    async fn next_rollout_id(&self) -> Result<u64> {
        // Also above every stored rollout, so that a lost counter still
        // cannot hand out an id in use.
        let last = self
            .range_back(&self.key("gen/"), None, 1, "allocating a rollout id")
            .await?;
        let floor = match last.first() {
            Some(kv) => {
                let key = String::from_utf8_lossy(kv.key()).to_string();
                let id = key.rsplit('/').next().unwrap_or_default();
                parse_u64(&key, id.as_bytes())?
            }
            None => 0,
        };
        self.bump("rollout_id", floor, |_| Vec::new()).await
    }

    async fn insert_rollouts(&self, new: &[Rollout]) -> Result<Vec<Rollout>> {
        rollouts::insert(self, new).await
    }

    async fn write_rollouts(&self, writes: &[RolloutWrite<'_>]) -> Result<Vec<Result<u64>>> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            // A write that could not reach etcd at all fails the call, as
            // in the SQLite engine; a lost compare fails only its rollout.
            match rollouts::update(self, w).await {
                Err(e @ StoreError::Backend(_)) if out.is_empty() => return Err(e),
                other => out.push(other),
            }
        }
        Ok(out)
    }

    async fn get_rollout(&self, id: u64) -> Result<Option<Rollout>> {
        rollouts::read(self, id).await
    }

    async fn list_rollouts(&self) -> Result<Vec<Rollout>> {
        let (kvs, revision) = self
            .range(&self.key("gen/"), None, "listing rollouts")
            .await?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in kvs.iter().rev() {
            let id = rollouts::id_of(kv)?;
            if let Some(r) = rollouts::read_at(self, id, revision).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn list_active_rollouts(&self) -> Result<Vec<Rollout>> {
        let (kvs, revision) = self
            .range(&self.key("live/"), None, "listing active rollouts")
            .await?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let id = rollouts::id_of(kv)?;
            if let Some(r) = rollouts::read_at(self, id, revision).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn prune_rollouts(&self, prune: &Prune) -> Result<usize> {
        rollouts::prune(self, prune).await
    }

    async fn list_rollout_summaries(
        &self,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<RolloutSummary>> {
        let before = before.map(|b| self.key(&format!("summary/{}", padded(b))));
        let kvs = self
            .range_back(&self.key("summary/"), before, limit, "listing rollouts")
            .await?;
        kvs.iter()
            .map(|kv| decode("rollout summary", kv.value()))
            .collect()
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<u64> {
        let json = encode("audit entry", entry)?;
        let prefix = self.key("audit/");
        // The entry and the counter move together: an id is never handed
        // out without its entry, nor reused.
        self.bump("audit_id", 0, |id| {
            let mut key = prefix.clone();
            key.extend_from_slice(padded(id).as_bytes());
            vec![Op::Put(key, json.clone())]
        })
        .await
    }

    async fn list_audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>> {
        let before = before.map(|b| self.key(&format!("audit/{}", padded(b))));
        let kvs = self
            .range_back(
                &self.key("audit/"),
                before,
                limit,
                "listing the audit trail",
            )
            .await?;
        audit_of(&kvs)
    }

    async fn prune_audit(&self, prune: &Prune) -> Result<usize> {
        let what = "pruning the audit trail";
        let prefix = self.key("audit/");
        let allowed = self
            .count(&prefix, what)
            .await?
            .saturating_sub(prune.keep.max(1))
            .min(prune.limit);
        if allowed == 0 {
            return Ok(0);
        }
        let (kvs, _) = self
            .range_page(&prefix, &prefix_end(&prefix), allowed, what)
            .await?;
        // The oldest entries, up to the first written at or after the
        // cutoff: entries are appended as they happen, so the ones after it
        // are newer too (a clock set back only delays their turn).
        let mut last = None;
        for kv in &kvs {
            let e: AuditEntry = decode("audit entry", kv.value())?;
            if e.at >= prune.before {
                break;
            }
            last = Some(kv.key().to_vec());
        }
        let Some(mut end) = last else { return Ok(0) };
        end.push(0);
        // One range, one operation: the entries chosen are the first ones.
        let resp = self
            .txn(
                Vec::new(),
                vec![Op::DeleteRange(prefix, end).into_txn()],
                Vec::new(),
                what,
            )
            .await?;
        let deleted = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Delete(d) => usize::try_from(d.deleted()).unwrap_or(0),
                _ => 0,
            })
            .sum();
        Ok(deleted)
    }

    async fn put_token(&self, token: &TokenRecord) -> Result<()> {
        self.put_tokens(std::slice::from_ref(token)).await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let (kvs, _) = self
            .range(&self.key("tokens/"), None, "listing tokens")
            .await?;
        tokens_of(&kvs)
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        // Every range at the revision of the first: one instant of the
        // whole prefix, however much the leader writes meanwhile.
        let what = "taking a snapshot";
        let (nodes, revision) = self.range(&self.key("nodes/"), None, what).await?;
        let at = Some(revision);
        let tokens = self.range(&self.key("tokens/"), at, what).await?.0;
        let releases = self.range(&self.key("releases/"), at, what).await?.0;
        let active = self.range(&self.key("active/"), at, what).await?.0;
        let audit = self.range(&self.key("audit/"), at, what).await?.0;
        let base = self
            .range(&self.key("counters/term_base"), at, what)
            .await?
            .0;
        let gens = self.range(&self.key("gen/"), at, what).await?.0;
        let mut rollouts = Vec::with_capacity(gens.len());
        for kv in gens.iter().rev() {
            if let Some(r) = rollouts::read_at(self, rollouts::id_of(kv)?, revision).await? {
                rollouts.push(r);
            }
        }
        let base = match base.first() {
            Some(kv) => parse_u64("counter term_base", kv.value())?,
            None => 0,
        };
        Ok(Snapshot {
            nodes: nodes_of(&nodes)?,
            tokens: tokens_of(&tokens)?,
            releases: releases_of(&releases)?,
            active_versions: active_versions_of(&active)?,
            rollouts,
            audit: audit_of(&audit)?,
            // Every election key so far was created at or below this
            // revision, so every term handed out is at most this.
            term: base.saturating_add(u64::try_from(revision).unwrap_or(0)),
            cluster: Some(self.cluster.clone()),
        })
    }

    async fn term_base(&self) -> Result<u64> {
        let what = "reading the term";
        match self.get(self.key("counters/term_base"), what).await? {
            Some(kv) => parse_u64("counter term_base", kv.value()),
            None => Ok(0),
        }
    }

    async fn continue_from(&self, term: u64, cluster: Option<&str>) -> Result<()> {
        let what = "continuing another store's history";
        // Terms are this base plus an election key's revision (at least 1),
        // so every term from now on is above `term`.
        let key = self.key("counters/term_base");
        for _ in 0..CAS_ATTEMPTS {
            let current = self.get(key.clone(), what).await?;
            let (base, compare) = match &current {
                None => (
                    0,
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                ),
                Some(kv) => (
                    parse_u64("counter term_base", kv.value())?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
            };
            if base >= term {
                break;
            }
            let put = TxnOp::put(key.clone(), term.to_string(), None);
            if self
                .txn(vec![compare], vec![put], Vec::new(), what)
                .await?
                .succeeded()
            {
                break;
            }
        }
        let Some(cluster) = cluster else {
            return Ok(());
        };
        let key = self.key("meta");
        let Some(kv) = self.get(key.clone(), what).await? else {
            return Err(self.backend(what, "meta record vanished"));
        };
        let mut meta: Meta = decode("meta", kv.value())?;
        if meta.cluster == cluster {
            return Ok(());
        }
        meta.cluster = cluster.to_string();
        let compare = Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision());
        let put = TxnOp::put(key, encode("meta", &meta)?, None);
        if !self
            .txn(vec![compare], vec![put], Vec::new(), what)
            .await?
            .succeeded()
        {
            return Err(self.backend(
                what,
                "the meta record changed meanwhile: is a control plane running on this store?",
            ));
        }
        Ok(())
    }
}

fn nodes_of(kvs: &[KeyValue]) -> Result<Vec<NodeView>> {
    kvs.iter()
        .map(|kv| {
            let mut n: NodeView = decode("node", kv.value())?;
            n.online = false;
            Ok(n)
        })
        .collect()
}

fn releases_of(kvs: &[KeyValue]) -> Result<Vec<Release>> {
    let mut releases = kvs
        .iter()
        .map(|kv| {
            Ok((
                decode::<Release>("release", kv.value())?,
                kv.create_revision(),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // Creation order within a service; etcd's creation revision breaks
    // ties between releases pushed in the same millisecond.
    releases.sort_by(|(a, ra), (b, rb)| {
        (&a.service, a.created_at, ra).cmp(&(&b.service, b.created_at, rb))
    });
    Ok(releases.into_iter().map(|(r, _)| r).collect())
}

fn active_versions_of(kvs: &[KeyValue]) -> Result<Vec<ActiveVersion>> {
    kvs.iter()
        .map(|kv| decode("active version", kv.value()))
        .collect()
}

/// Entries in the order of `kvs`, with the ids their keys carry.
fn audit_of(kvs: &[KeyValue]) -> Result<Vec<AuditEntry>> {
    kvs.iter()
        .map(|kv| {
            let id = rollouts::id_of(kv)?;
            let mut e: AuditEntry = decode(&format!("audit entry {id}"), kv.value())?;
            e.id = id;
            Ok(e)
        })
        .collect()
}

fn tokens_of(kvs: &[KeyValue]) -> Result<Vec<TokenRecord>> {
    let mut tokens = kvs
        .iter()
        .map(|kv| {
            Ok((
                kv.create_revision(),
                decode::<TokenRecord>("token", kv.value())?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    // Oldest first: a token keeps its creation revision when replaced.
    tokens.sort_by_key(|(rev, _)| *rev);
    Ok(tokens.into_iter().map(|(_, t)| t).collect())
}
