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
/// On a follower's `503` to an agent's session: the leader's address, where
/// the agent goes next if it is among its servers.
pub const LEADER_HEADER: &str = "rollwave-leader";

/// The control plane pings every agent session this often.
pub const SESSION_PING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
/// Either end closes a session it has heard nothing from (not even a ping
/// or a pong) for this long: the connection is dead even if it was never
/// closed, as behind a partition or with a lost host.
pub const SESSION_SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Request header of `POST /v1/releases/{service}/{version}` carrying the
/// release's minisign signature: the text of the `.minisig` file, base64
/// encoded (standard alphabet, padded), as a header holds one line.
pub const SIGNATURE_HEADER: &str = "rollwave-signature";

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
    /// The answer to a [`ServerMessage::Logs`] request, by its `id`.
    Logs(LogsReply),
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
        /// The leader's term, which grows with each election (0: one
        /// control plane on its own store). An agent takes no task over a
        /// session of a term older than one it has seen: a deposed leader
        /// that wakes cannot steer it.
        #[serde(default)]
        term: u64,
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
    /// Read a service's log on the node; answered by [`AgentMessage::Logs`]
    /// with the same `id`. An agent that predates it ignores it, and the
    /// control plane gives up waiting.
    Logs(LogsRequest),
}

/// What a [`ServerMessage::Logs`] asks of a service's log, which the agent
/// keeps as lines of `<RFC 3339 time> <output line>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogsRequest {
    /// Chosen by the control plane, unique among its requests in flight.
    pub id: u64,
    pub service: String,
    /// Without `after`: the newest lines, only those written at or after
    /// this time (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// The lines written after this position (a `cursor` of an earlier
    /// answer) instead of the newest ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many bytes of lines: the newest ones, or with `after`
    /// the first ones after it.
    pub max_bytes: u64,
    /// With `after`: when nothing follows it yet, the agent holds the
    /// request up to this long for a line to arrive (a long poll).
    #[serde(default)]
    pub wait_ms: u64,
}

/// Body of [`AgentMessage::Logs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogsReply {
    pub id: u64,
    pub outcome: LogsOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum LogsOutcome {
    Lines(LogChunk),
    /// The node supervises no service of that name.
    UnknownService,
    /// The log could not be read.
    Failed {
        reason: String,
    },
}

/// Whole lines of a service's log, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogChunk {
    /// Lines, each ending in a newline.
    pub text: String,
    /// Where these lines end: the `after` of the next request. Opaque; it
    /// stays valid across agent restarts and rotations, until the file it
    /// points into is rotated away.
    pub cursor: String,
    /// Older lines matched too but were left out for `max_bytes`.
    #[serde(default)]
    pub truncated: bool,
    /// Lines after `after` were rotated away before they were read: the
    /// text starts at the oldest line kept.
    #[serde(default)]
    pub skipped: bool,
}

/// Response header of [`service_logs_path`]: `true` when older lines
/// matched but did not fit in the answer.
pub const SERVICE_LOGS_TRUNCATED_HEADER: &str = "rollwave-logs-truncated";

/// The route of a service's log on a node.
pub fn service_logs_path(node: &str, service: &str) -> String {
    format!("/v1/nodes/{node}/services/{service}/logs")
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
    /// The release's minisign signatures, as many as were pushed. An agent
    /// with trusted keys installs nothing without one, by one of those
    /// keys, that it can verify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signatures: Vec<String>,
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
    /// Whether this control plane leads: runs rollouts and holds agent
    /// sessions. Always true on the embedded store; among replicas on
    /// etcd, true on one.
    #[serde(default = "default_true")]
    pub leader: bool,
    /// Where the leader is reached, as it announced itself; none while no
    /// replica is elected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_url: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Response of `POST /v1/releases/{service}/{version}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PushResponse {
    pub release: Release,
    /// False when the same content had been pushed before.
    pub created: bool,
    /// True when this push added a signature to a release pushed before
    /// (unsigned, or signed by other keys).
    #[serde(default)]
    pub signature_added: bool,
}

/// Response of `DELETE /v1/releases/{service}/{version}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeleteReleaseResponse {
    /// The release as it was stored.
    pub release: Release,
    /// Whether its artifact was removed from the control plane's disk:
    /// false while another release has the same bytes (`shared_with`).
    pub artifact_removed: bool,
    /// The other releases with the same sha256, as `service@version`.
    pub shared_with: Vec<String>,
}

/// Body of `POST /v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StartRollout {
    pub spec: RolloutFile,
    /// Start only if the plan made now is the one `POST /v1/plan` named
    /// so (its `plan_id`): the fleet, the release and the spec as reviewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
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
    /// From `POST /v1/plan`: what names this plan, for `start --plan-id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
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

/// Body of `POST /v1/rollouts/{id}/rollback`, all optional: how many
/// nodes go back at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// A count (`"2"`) or a percentage of the rollout's nodes (`"25%"`);
    /// default: the rollout's `max_unavailable`.
    #[serde(default)]
    pub batch: Option<String>,
    /// Every node back at once, whatever the budget.
    #[serde(default)]
    pub all_at_once: bool,
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

/// Body of `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Unique among live tokens; names the token in the audit trail.
    pub name: String,
    pub role: rollwave_core::Role,
    /// How long it is valid, like `24h` or `30d`; none: until revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// `join` only: how many enrollments it allows (1: a one-time token);
    /// none: any number until it expires or is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// `agent` only: the node the credential belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Answer of `POST /v1/tokens` and `POST /v1/enroll`: the token itself,
/// shown this once (the control plane keeps only its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub view: rollwave_core::TokenView,
}

/// Body of `POST /v1/enroll`, sent with a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Enroll {
    /// The node's name: its credential will act as this node only.
    pub node: String,
}

/// Error codes, each with its one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    /// No token, or one that is malformed, unknown, revoked or expired.
    Unauthorized,
    /// A valid token whose role may not do this.
    Forbidden,
    NotFound,
    /// The path exists, not with this method.
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    /// A `Range` that starts beyond the end of the artifact.
    RangeNotSatisfiable,
    /// Every artifact stream is taken (`--max-downloads`): try again after
    /// the response's `Retry-After`.
    TooManyRequests,
    Internal,
    /// This control plane cannot answer now (no leader elected, the store
    /// unreachable): try again, or another replica.
    Unavailable,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RangeNotSatisfiable => 416,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
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

/// Path of the change stream: server-sent events (`text/event-stream`).
pub const EVENTS_PATH: &str = "/v1/events";

/// The kinds of event on [`EVENTS_PATH`] (the SSE `event:` field). Each
/// event's `id:` is `EPOCH-SEQ`: `EPOCH` names the run of the control plane,
/// `SEQ` grows by one per event.
pub mod stream {
    /// Where the client stands is unknown: refetch snapshots, then apply what
    /// follows. Data: [`super::Reset`].
    pub const RESET: &str = "reset";
    /// One entry of a rollout's execution log. Data: [`super::LogEntry`].
    pub const LOG: &str = "log";
    /// A rollout changed. Data: [`super::RolloutChange`].
    pub const ROLLOUT: &str = "rollout";
    /// A node's view changed (report, connect, disconnect). Data: a `NodeView`.
    pub const NODE: &str = "node";
}

/// Data of a `reset` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    pub reason: ResetReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// The client named no last event: a first connection.
    New,
    /// The last event id is from another run of the control plane (it
    /// restarted), or was never issued.
    UnknownId,
    /// What followed the last event is no longer held: the client was away,
    /// or read, too long.
    Expired,
    /// A rollout's execution log went back to what the store holds (a write
    /// failed): entries the stream carried are gone.
    Rewound,
}

/// Data of a `log` event: one entry of a rollout's execution log, which the
/// stream carries once each, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub rollout: u64,
    /// Its position in the rollout's `events`, from 0.
    pub index: usize,
    #[serde(flatten)]
    pub event: rollwave_core::RolloutEvent,
}

/// Data of a `rollout` event: the rollout without its waves, nodes and log,
/// plus the nodes whose progress changed since the stream's previous
/// `rollout` event for it (every node in the first).
#[derive(Debug, Serialize)]
pub struct RolloutChange<'a> {
    #[serde(flatten)]
    pub rollout: RolloutHead<'a>,
    /// Nodes per state (`pending`, `upgraded`, ...).
    pub counts: BTreeMap<&'static str, usize>,
    pub nodes: BTreeMap<&'a str, &'a rollwave_core::NodeProgress>,
    /// How many entries the execution log holds.
    pub log_len: usize,
}

/// A rollout's fields that stay small whatever the fleet's size, as in
/// `Rollout`'s JSON.
#[derive(Debug, Serialize)]
pub struct RolloutHead<'a> {
    pub id: u64,
    pub generation: u64,
    pub spec: &'a rollwave_core::RolloutSpec,
    pub state: rollwave_core::RolloutState,
    pub reason: &'a Option<String>,
    pub waiting: &'a Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub finished_at: Option<u64>,
    pub last_progress_at: u64,
    /// How many waves the plan has.
    pub waves: usize,
    pub pauses: &'a [bool],
    pub promoted: &'a [usize],
    pub after: &'a [u64],
    pub dependencies_done: bool,
    pub superseded_by: Option<u64>,
    pub finalized: &'a Option<String>,
    pub pre_rollout_done: bool,
    pub end_hooks_done: bool,
    pub dry_run_done: bool,
    pub rollback_batch: Option<rollwave_core::Amount>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub analysis: &'a [rollwave_core::AnalysisRun],
}

impl<'a> RolloutHead<'a> {
    pub fn of(r: &'a Rollout) -> RolloutHead<'a> {
        // Every field named: a new one must be placed here or left out here.
        let Rollout {
            id,
            generation,
            spec,
            state,
            reason,
            waiting,
            created_at,
            updated_at,
            finished_at,
            last_progress_at,
            batches,
            pauses,
            promoted,
            nodes: _,
            left_out: _,
            events: _,
            after,
            dependencies_done,
            superseded_by,
            finalized,
            pre_rollout_done,
            end_hooks_done,
            dry_run_done,
            rollback_batch,
            analysis,
        } = r;
        RolloutHead {
            id: *id,
            generation: *generation,
            spec,
            state: *state,
            reason,
            waiting,
            created_at: *created_at,
            updated_at: *updated_at,
            finished_at: *finished_at,
            last_progress_at: *last_progress_at,
            waves: batches.len(),
            pauses,
            promoted,
            after,
            dependencies_done: *dependencies_done,
            superseded_by: *superseded_by,
            finalized,
            pre_rollout_done: *pre_rollout_done,
            end_hooks_done: *end_hooks_done,
            dry_run_done: *dry_run_done,
            rollback_batch: *rollback_batch,
            analysis,
        }
    }
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
