use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Health of one service on one node, as its agent last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServiceView {
    /// The version of the running process, if any.
    pub version: Option<String>,
    pub health: Health,
    /// Versions downloaded, verified and unpacked on the node.
    #[serde(default)]
    pub staged: Vec<String>,
}

/// One node as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Whether the node's agent holds a session with the control plane now.
    pub online: bool,
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
