//! The audit trail: who changed what through the API, and when.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Assigned by the store, increasing; 0 before it is stored.
    #[serde(default)]
    pub id: u64,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub at: Timestamp,
    /// Who: the name of the API token the request carried
    /// (`unauthenticated` if it carried none that is valid).
    pub actor: String,
    /// The client's address, as the control plane saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// What: `release.push`, `rollout.start`, `rollout.pause`, ...,
    /// `service.finalize`.
    pub action: String,
    /// On what: `api@2.0.0`, `rollout 7`, `service api`.
    pub target: String,
    /// Whether the API did it.
    pub ok: bool,
    /// The HTTP status of the answer.
    pub status: u16,
    /// What came of it, one line: what was created, or the error message.
    pub detail: String,
}
