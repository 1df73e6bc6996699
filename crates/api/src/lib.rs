//! The wire format shared by the server, the agent and the CLI: HTTP bodies,
//! the agent session protocol and the mapping of error codes to HTTP status.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use rollwave_core::{
    ActiveVersion, ArtifactFormat, Hook, HookReport, NodeView, Release, Rollout, RolloutFile,
    ServiceView, TaskOutcome,
};

/// Bumped on any incompatible change to [`AgentMessage`] or [`ServerMessage`].
pub const AGENT_PROTOCOL: u32 = 1;

/// Path of the agent session WebSocket.
pub const AGENT_CONNECT_PATH: &str = "/v1/agent/connect";

/// Sent by an agent over its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message of every session.
    Hello {
        protocol: u32,
        node: String,
        labels: BTreeMap<String, String>,
        agent_version: String,
        services: BTreeMap<String, ServiceView>,
    },
    /// Sent whenever a service's version, health or staged releases change.
    Status {
        services: BTreeMap<String, ServiceView>,
    },
    /// A step of a task has begun (download, verify, backup, switch, gate, ...).
    TaskPhase { task_id: String, phase: String },
    /// A task has ended. Sent again if the same task is received again.
    TaskResult {
        task_id: String,
        outcome: TaskOutcome,
    },
}

/// Sent by the control plane over an agent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        node: String,
        /// Every service's active version (the version gate), by service.
        #[serde(default)]
        active_versions: BTreeMap<String, String>,
    },
    /// The active versions changed (a finalize): the whole map, so that
    /// applying it twice is harmless.
    ActiveVersions {
        active_versions: BTreeMap<String, String>,
    },
    /// The session is refused; the agent should not retry quickly.
    Refused {
        reason: String,
    },
    Task(Task),
}

/// Work for one service on one node. Tasks are idempotent by `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: String,
    pub rollout: u64,
    pub service: String,
    pub action: TaskAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskAction {
    /// Stage `version`, back up, switch to it and hold it healthy for
    /// `min_healthy_time_ms` within `healthy_deadline_ms`; on failure return to
    /// the previous version and restore the backup.
    Upgrade {
        version: String,
        artifact: ArtifactRef,
        min_healthy_time_ms: u64,
        healthy_deadline_ms: u64,
        /// Run before anything on the node changes (after staging); a
        /// failure (with `on_error = "fail"`) fails the node untouched.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pre_node: Vec<Hook>,
        /// Run once the new version passed its health gate; a failure (with
        /// `on_error = "fail"`) fails the node, which goes back.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        post_node: Vec<Hook>,
    },
    /// Download, verify and unpack `version` ahead of the node's turn,
    /// switching nothing.
    Stage {
        version: String,
        artifact: ArtifactRef,
    },
    /// Stage `version` and run the `dry_run` its `rollwave.toml` declares
    /// against a throwaway copy of the service's data, switching nothing.
    /// The command comes from the release, never from the task.
    DryRun {
        version: String,
        artifact: ArtifactRef,
    },
    /// Return to `to_version` (none: the service did not run before) and
    /// restore the backup taken by `upgrade_task`.
    Revert {
        to_version: Option<String>,
        upgrade_task: String,
        healthy_deadline_ms: u64,
    },
}

/// Where an agent downloads an artifact from, and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactRef {
    /// Path on the control plane, e.g. `/v1/releases/api/2.0.0/artifact`.
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub format: ArtifactFormat,
}

pub fn artifact_path(service: &str, version: &str) -> String {
    format!("/v1/releases/{service}/{version}/artifact")
}

/// Response of `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` whenever the control plane answers.
    pub status: String,
    /// Agents holding a session now.
    pub agents_connected: usize,
}

/// Response of `POST /v1/releases/{service}/{version}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PushResponse {
    pub release: Release,
    /// False when the same content had been pushed before.
    pub created: bool,
}

/// Body of `POST /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StartRollout {
    pub spec: RolloutFile,
}

/// Response of the rollout endpoints: the rollout and what the fleet looked
/// like for it when it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RolloutResponse {
    pub rollout: Rollout,
    /// The other rollouts the same request started (one per service of a
    /// multi-service rollout), each after the ones it depends on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependents: Vec<Rollout>,
}

/// The operator commands, as the last segment of
/// `POST /v1/rollouts/{id}/{command}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutCommand {
    /// Stop starting nodes; nodes in flight finish.
    Pause,
    Resume,
    /// Stop; upgraded nodes keep the new version.
    Cancel,
    /// Return every node the rollout upgraded to its previous version.
    Rollback,
    /// Let a canary continue past the wave it waits after.
    Promote,
}

/// Body of `POST /v1/services/{service}/finalize`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Finalize {
    /// The version to activate; default: the newest one any node runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// Response of `POST /v1/services/{service}/finalize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FinalizeResponse {
    pub active: ActiveVersion,
    /// The active version before, if any.
    pub previous: Option<String>,
    /// False when the version was already active.
    pub changed: bool,
}

/// One entry of `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceSummary {
    pub service: String,
    pub active: Option<ActiveVersion>,
    /// How many nodes run each version (`none`: no version running).
    pub running: BTreeMap<String, usize>,
}

/// Error codes, each with its one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    Conflict,
    PayloadTooLarge,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Internal => 500,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let m = AgentMessage::TaskResult {
            task_id: "r1-up-n1".into(),
            outcome: TaskOutcome::Failed {
                reason: "health check failed".into(),
            },
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(
            json,
            r#"{"type":"task_result","task_id":"r1-up-n1","outcome":{"result":"failed","reason":"health check failed"}}"#
        );
        assert_eq!(serde_json::from_str::<AgentMessage>(&json).unwrap(), m);
    }
}
