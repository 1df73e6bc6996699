use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

/// Health of one service on one node, as its agent last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Started but not yet past its healthy threshold.
    #[default]
    Starting,
    /// Not running (no release installed, or stopped).
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
pub struct ServiceView {
    /// The version of the running process, if any.
    pub version: Option<String>,
    pub health: Health,
    /// Versions downloaded, verified and unpacked on the node.
    #[serde(default)]
    pub staged: Vec<String>,
    /// The version the node ran before its last switch, which a revert
    /// goes back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// What the service's role probe last answered (`leader`, `follower`):
    /// `order = "leader_last"` switches the node that says `leader` last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Why the role probe gave no role, when it failed or answered
    /// something that is not a role word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_error: Option<String>,
    /// Set by the control plane, not the agent: the version a completed
    /// rollout wants here while the node is not on it (it was unreachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// Set by the control plane: switching to `desired` now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub converging: bool,
    /// Complete backups of the service's data on the node, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<BackupInfo>,
}

/// One backup an agent holds: the copy of a service's `backup` paths taken
/// by an upgrade task before it switched, restored if the node goes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
pub struct BackupInfo {
    /// The id of the task that took it.
    pub task: String,
    /// Unix milliseconds.
    pub taken_at: u64,
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    pub file_count: u64,
    pub bytes: u64,
}

/// One node as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Whether the node's agent holds a session with the control plane now.
    pub online: bool,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub last_seen: Timestamp,
    pub services: BTreeMap<String, ServiceView>,
}

impl NodeView {
    /// Whether `service` on this node is serving now: online and healthy.
    pub fn available(&self, service: &str) -> bool {
        self.online
            && self
                .services
                .get(service)
                .is_some_and(|s| s.health == Health::Healthy)
    }
}

/// Every known node, by name.
pub type Fleet = BTreeMap<String, NodeView>;

/// Pairs each `(name, value)` of `items` with the entry of that name in
/// `map`, if any. `items` must come in ascending name order, as a map keyed by
/// name yields them: both are then walked once, side by side, instead of
/// searching `map` (comparing names all the way down) for every item.
pub(crate) fn join_by_name<K: AsRef<str>, T, V>(
    map: &BTreeMap<String, V>,
    items: impl IntoIterator<Item = (K, T)>,
) -> impl Iterator<Item = (K, T, Option<&V>)> {
    let mut entries = map.iter().peekable();
    items.into_iter().map(move |(name, value)| {
        let key = name.as_ref();
        while let Some(&(k, v)) = entries.peek() {
            match k.as_str().cmp(key) {
                Ordering::Less => {}
                Ordering::Equal => {
                    entries.next();
                    return (name, value, Some(v));
                }
                Ordering::Greater => break,
            }
            entries.next();
        }
        (name, value, None)
    })
}
