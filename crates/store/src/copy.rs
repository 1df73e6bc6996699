//! `rollwave store copy`: moves a control plane's state from one store to
//! another (SQLite to etcd when it outgrows one machine) through the
//! [`Store`] trait, so any pair of engines works.
//!
//! Idempotent: a record the target already holds is left as it is, so a copy
//! cut short can be run again. A target that holds anything is refused
//! unless forced, so that two clusters' states are never mixed by mistake.
//! Run it with the source's control plane stopped: what it writes meanwhile
//! would be missed.

use std::collections::HashSet;

use rollwave_core::{AuditEntry, Release};

use crate::{PutRelease, Store, StoreError};

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

/// Audit pages read at once.
const PAGE: usize = 1000;

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

/// Every audit entry, oldest first.
async fn all_audit(store: &dyn Store) -> Result<Vec<AuditEntry>, StoreError> {
    let mut all = Vec::new();
    let mut before = None;
    loop {
        let page = store.list_audit(PAGE, before).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        let done = page.len() < PAGE;
        all.extend(page);
        if done {
            break;
        }
    }
    all.reverse();
    Ok(all)
}

fn key(r: &Release) -> String {
    format!("{}@{}", r.service, r.version)
}

pub async fn copy(from: &dyn Store, to: &dyn Store, force: bool) -> Result<Copied, CopyError> {
    if !force {
        if let Some(held) = what_is_in(to).await? {
            return Err(CopyError::NotEmpty(held));
        }
    }
    let mut done = Copied::default();

    let nodes = from.list_nodes().await?;
    to.upsert_nodes(&nodes).await?;
    done.nodes = nodes.len();
    let tokens = from.list_tokens().await?;
    for token in &tokens {
        to.put_token(token).await?;
    }
    done.tokens = tokens.len();

    for release in from.list_releases().await? {
        match to.put_release(&release).await? {
            PutRelease::Created(_) | PutRelease::Signed(_) => done.releases.0 += 1,
            PutRelease::Unchanged(_) | PutRelease::TooManySignatures(_) => done.releases.1 += 1,
            PutRelease::Conflict(there) => {
                return Err(CopyError::ReleaseConflict(
                    key(&release),
                    release.sha256,
                    there.sha256,
                ))
            }
        }
    }
    let active = from.list_active_versions().await?;
    for a in &active {
        to.set_active_version(a).await?;
    }
    done.active_versions = active.len();

    // Oldest first, one at a time: a rollout's records can be large, and
    // one that is there already is left as it is.
    let mut rollouts = from.list_rollouts().await?;
    rollouts.reverse();
    for r in rollouts {
        if to.get_rollout(r.id).await?.is_some() {
            done.rollouts.1 += 1;
            continue;
        }
        to.insert_rollouts(std::slice::from_ref(&r)).await?;
        done.rollouts.0 += 1;
    }

    // Audit entries get new ids in the target, in the same order; those it
    // holds already (same time, actor, action, target) are not repeated.
    let strip = |e: &AuditEntry| AuditEntry { id: 0, ..e.clone() };
    let there: HashSet<String> = all_audit(to)
        .await?
        .iter()
        .map(|e| serde_json::to_string(&strip(e)).unwrap_or_default())
        .collect();
    for entry in all_audit(from).await? {
        let entry = strip(&entry);
        if there.contains(&serde_json::to_string(&entry).unwrap_or_default()) {
            done.audit.1 += 1;
            continue;
        }
        to.append_audit(&entry).await?;
        done.audit.0 += 1;
    }
    Ok(done)
}
