//! What the control plane keeps of its history, and for how long: rollouts
//! that ended and audit entries older than their retention, or beyond the
//! newest so many, are deleted; artifacts no release names are removed.
//!
//! One task on the leader (the one control plane, or the elected one among
//! replicas: followers never run it) prunes once at start and then every
//! [`INTERVAL`], in steps of bounded size, so that a large backlog (a
//! retention shortened, a control plane upgraded onto years of history)
//! costs many small transactions rather than one that holds up the
//! reconciler's writes.

use std::sync::Arc;
use std::time::Duration;

use rollwave_store::{Prune, Store};

use crate::{now_ms, Shared};

/// How often the history is pruned after the pass at start.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// Rollouts deleted per store call: each takes its node records and log
/// with it, thousands of rows for a large fleet.
const ROLLOUT_STEP: usize = 10;
/// Audit entries deleted per store call.
const AUDIT_STEP: usize = 1_000;

/// Default `--rollout-retention` and `--audit-retention`: a year.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default `--max-rollouts`.
pub const DEFAULT_MAX_ROLLOUTS: usize = 2_000;
/// Default `--max-audit-entries`.
pub const DEFAULT_MAX_AUDIT_ENTRIES: usize = 500_000;

/// What the history keeps (`rollwave server --rollout-retention ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Rollouts that ended longer ago are deleted; `None`: kept whatever
    /// their age.
    pub rollouts: Option<Duration>,
    /// Only the newest this many rollouts are kept, active ones included
    /// (those are never deleted); `None`: no cap.
    pub max_rollouts: Option<usize>,
    /// Audit entries older than this are deleted; `None`: kept.
    pub audit: Option<Duration>,
    /// Only the newest this many audit entries are kept; `None`: no cap.
    pub max_audit_entries: Option<usize>,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            rollouts: Some(DEFAULT_RETENTION),
            max_rollouts: Some(DEFAULT_MAX_ROLLOUTS),
            audit: Some(DEFAULT_RETENTION),
            max_audit_entries: Some(DEFAULT_MAX_AUDIT_ENTRIES),
        }
    }
}

/// Prunes now, then every [`INTERVAL`], for as long as the process leads.
pub(crate) fn spawn(shared: Arc<Shared>, retention: Retention) {
    tokio::spawn(async move {
        loop {
            pass(&shared, &retention).await;
            tokio::time::sleep(INTERVAL).await;
        }
    });
}

/// One pass: rollouts, audit entries, then unnamed artifacts. A failure is
/// logged and the rest goes on; the next pass tries again.
async fn pass(shared: &Shared, retention: &Retention) {
    let now = now_ms();
    let cutoff = |age: Option<Duration>| {
        age.map(|d| now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    };
    let store = shared.store.as_ref();
    let mut rollouts = 0;
    if let Some(before) = cutoff(retention.rollouts) {
        rollouts += steps(store, Kind::Rollouts, before, 1).await;
    }
    if let Some(keep) = retention.max_rollouts {
        rollouts += steps(store, Kind::Rollouts, u64::MAX, keep).await;
    }
    let mut audit = 0;
    if let Some(before) = cutoff(retention.audit) {
        audit += steps(store, Kind::Audit, before, 1).await;
    }
    if let Some(keep) = retention.max_audit_entries {
        audit += steps(store, Kind::Audit, u64::MAX, keep).await;
    }
    let artifacts = match crate::blobs::sweep(store, &shared.blobs).await {
        Ok(removed) => {
            if let Some(copies) = &shared.copies {
                for sha in &removed {
                    copies.remove(sha).await;
                }
            }
            removed.len()
        }
        Err(e) => {
            tracing::warn!(error = %e, "sweeping artifacts no release names");
            0
        }
    };
    if rollouts + audit + artifacts > 0 {
        tracing::info!(
            rollouts,
            audit_entries = audit,
            artifacts,
            "pruned history past its retention"
        );
    } else {
        tracing::debug!("nothing to prune");
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Rollouts,
    Audit,
}

/// Deletes step by step until a step finds less than it may delete;
/// returns how many were deleted.
async fn steps(store: &dyn Store, kind: Kind, before: u64, keep: usize) -> usize {
    let limit = match kind {
        Kind::Rollouts => ROLLOUT_STEP,
        Kind::Audit => AUDIT_STEP,
    };
    let prune = Prune {
        before,
        keep,
        limit,
    };
    let mut total = 0;
    loop {
        let step = match kind {
            Kind::Rollouts => store.prune_rollouts(&prune).await,
            Kind::Audit => store.prune_audit(&prune).await,
        };
        match step {
            Ok(n) => {
                total += n;
                if n < limit {
                    return total;
                }
            }
            Err(e) => {
                let what = match kind {
                    Kind::Rollouts => "rollouts",
                    Kind::Audit => "audit entries",
                };
                tracing::warn!(error = %e, "pruning {what}");
                return total;
            }
        }
        // Between steps, the reconciler's writes go first.
        tokio::task::yield_now().await;
    }
}
