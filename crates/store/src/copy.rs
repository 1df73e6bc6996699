//! `rollwave store copy`: moves a control plane's state from one store to
//! another (SQLite to etcd when it outgrows one machine) through the
//! [`Store`] trait, so any pair of engines works.
//!
//! What is copied is the source as of one instant ([`Store::snapshot`]).
//! Idempotent: a record the target already holds is left as it is, so a copy
//! cut short can be run again. A target that holds anything is refused
//! unless forced, so that two clusters' states are never mixed by mistake.
//! Run it with the source's control plane stopped: what it writes after
//! the snapshot would be missed.

use std::collections::HashSet;

use rollwave_core::{AuditEntry, Release};

use crate::{PutRelease, Snapshot, Store, StoreError};

/// What a copy did, per kind of record: copied, and already there.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub nodes: usize,
    pub tokens: usize,
    pub releases: (usize, usize),
    pub active_versions: usize,
    pub rollouts: (usize, usize),
    pub audit: (usize, usize),
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "the target store is not empty ({0}): copy into an empty one, or pass --force to add to it"
    )]
    NotEmpty(String),
    #[error("release {0} is in both stores with different content (sha256 {1} here, {2} there): nothing more copied")]
    ReleaseConflict(String, String, String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

async fn what_is_in(to: &dyn Store) -> Result<Option<String>, StoreError> {
    let mut held = Vec::new();
    if !to.list_nodes().await?.is_empty() {
        held.push("nodes");
    }
    if !to.list_releases().await?.is_empty() {
        held.push("releases");
    }
    if !to.list_rollout_summaries(1, None).await?.is_empty() {
        held.push("rollouts");
    }
    if !to.list_tokens().await?.is_empty() {
        held.push("tokens");
    }
    if !to.list_audit(1, None).await?.is_empty() {
        held.push("audit entries");
    }
    Ok((!held.is_empty()).then(|| format!("it holds {}", held.join(", "))))
}

fn key(r: &Release) -> String {
    format!("{}@{}", r.service, r.version)
}

/// Copies everything `from` holds, as of one instant, into `to`.
pub async fn copy(from: &dyn Store, to: &dyn Store, force: bool) -> Result<Copied, CopyError> {
    let empty = check_empty(to, force).await?;
    let snapshot = from.snapshot().await?;
    import(&snapshot, to, snapshot.term, empty).await
}

/// Whether `to` is empty; an error if it is not and not `force`d.
pub(crate) async fn check_empty(to: &dyn Store, force: bool) -> Result<bool, CopyError> {
    match what_is_in(to).await? {
        None => Ok(true),
        Some(_) if force => Ok(false),
        Some(held) => Err(CopyError::NotEmpty(held)),
    }
}

/// Writes `snapshot` into `to`, keeping what `to` holds already; `to`
/// hands out terms above `term` from then on and, if it was `empty`, takes
/// the snapshot's cluster id (a store that held a cluster of its own keeps
/// its id, which its replicas' data dirs are bound to).
pub(crate) async fn import(
    snapshot: &Snapshot,
    to: &dyn Store,
    term: u64,
    empty: bool,
) -> Result<Copied, CopyError> {
    let mut done = Copied::default();
    // First: a control plane started on the target before the copy
    // finishes must already lead above the old history's terms.
    let cluster = snapshot.cluster.as_deref().filter(|_| empty);
    to.continue_from(term, cluster).await?;

    to.upsert_nodes(&snapshot.nodes).await?;
    done.nodes = snapshot.nodes.len();
    to.put_tokens(&snapshot.tokens).await?;
    done.tokens = snapshot.tokens.len();

    for release in &snapshot.releases {
        match to.put_release(release).await? {
            PutRelease::Created(_) | PutRelease::Signed(_) => done.releases.0 += 1,
            PutRelease::Unchanged(_) | PutRelease::TooManySignatures(_) => done.releases.1 += 1,
            PutRelease::Conflict(there) => {
                return Err(CopyError::ReleaseConflict(
                    key(release),
                    release.sha256.clone(),
                    there.sha256,
                ))
            }
        }
    }
    for a in &snapshot.active_versions {
        to.set_active_version(a).await?;
    }
    done.active_versions = snapshot.active_versions.len();

    // Oldest first, one at a time: a rollout's records can be large, and
    // one that is there already is left as it is.
    for r in snapshot.rollouts.iter().rev() {
        if to.get_rollout(r.id).await?.is_some() {
            done.rollouts.1 += 1;
            continue;
        }
        to.insert_rollouts(std::slice::from_ref(r)).await?;
        done.rollouts.0 += 1;
    }

    // Audit entries get new ids in the target, in the same order; those it
    // holds already (same time, actor, action, target) are not repeated.
    let strip = |e: &AuditEntry| AuditEntry { id: 0, ..e.clone() };
    let there: HashSet<String> = to
        .snapshot()
        .await?
        .audit
        .iter()
        .map(|e| serde_json::to_string(&strip(e)).unwrap_or_default())
        .collect();
    for entry in &snapshot.audit {
        let entry = strip(entry);
        if there.contains(&serde_json::to_string(&entry).unwrap_or_default()) {
            done.audit.1 += 1;
            continue;
        }
        to.append_audit(&entry).await?;
        done.audit.0 += 1;
    }
    Ok(done)
}
