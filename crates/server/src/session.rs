//! Agent sessions: one WebSocket per node, opened by the agent (nodes need no
//! inbound port). The first message is a `hello`; after it the agent streams
//! status and task reports and the control plane pushes tasks the moment they
//! are decided.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use rollwave_api::{
    AgentMessage, LogsOutcome, LogsReply, LogsRequest, ServerMessage, AGENT_PROTOCOL,
    SESSION_PING_EVERY, SESSION_SILENCE_LIMIT,
};
use rollwave_core::{AuditEntry, NodeView};
use tokio::sync::{mpsc, oneshot};

use crate::auth::Caller;
use crate::reconciler::Event;
use crate::{now_ms, Shared};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, SessionHandle>>,
    next_id: AtomicU64,
}

struct SessionHandle {
    id: u64,
    tx: mpsc::UnboundedSender<ServerMessage>,
    /// Log requests sent over this session and not answered yet, by id.
    /// Dropped with the session, which ends their waits.
    pending: HashMap<u64, oneshot::Sender<LogsOutcome>>,
}

/// Why a node's agent gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AskError {
    /// The node holds no session.
    Offline,
    /// Its session ended before it answered.
    Gone,
    /// It did not answer in time (an agent that predates the request, or
    /// one that is stuck).
    NoAnswer,
}

impl Sessions {
    /// Queues a message for a node's session; false if the node has none.
    pub fn send(&self, node: &str, msg: ServerMessage) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.get(node).is_some_and(|s| s.tx.send(msg).is_ok())
    }

    /// Queues a message for every session.
    pub fn broadcast(&self, msg: &ServerMessage) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for s in inner.values() {
            let _ = s.tx.send(msg.clone());
        }
    }

    /// Ends a node's session, telling the agent why.
    pub fn close(&self, node: &str, reason: &str) {
        self.send(
            node,
            ServerMessage::Refused {
                reason: reason.to_string(),
            },
        );
    }

    /// Asks a node's agent for lines of a service's log and waits up to
    /// `patience` for the answer. Touches that node's session only.
    pub async fn logs(
        &self,
        node: &str,
        mut req: LogsRequest,
        patience: Duration,
    ) -> Result<LogsOutcome, AskError> {
        // Random, not counted from 0: an answer queued by an agent during
        // an earlier run of the control plane must not match a new request.
        req.id = getrandom::u64().unwrap_or_else(|_| self.next_id.fetch_add(1, Ordering::Relaxed));
        let id = req.id;
        let rx = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let Some(session) = inner.get_mut(node) else {
                return Err(AskError::Offline);
            };
            let (tx, rx) = oneshot::channel();
            session.pending.insert(id, tx);
            if session.tx.send(ServerMessage::Logs(req)).is_err() {
                session.pending.remove(&id);
                return Err(AskError::Gone);
            }
            rx
        };
        match tokio::time::timeout(patience, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(AskError::Gone),
            Err(_) => {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(session) = inner.get_mut(node) {
                    session.pending.remove(&id);
                }
                Err(AskError::NoAnswer)
            }
        }
    }

    /// An answer to a log request, from the session `session` of `node`:
    /// only the request's own session can answer it.
    fn answered(&self, node: &str, session: u64, reply: LogsReply) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = inner.get_mut(node).filter(|s| s.id == session) {
            if let Some(tx) = s.pending.remove(&reply.id) {
                let _ = tx.send(reply.outcome);
            }
        }
    }

    pub fn connected(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The newest session of a node wins: an agent that restarted reconnects
    /// before the control plane notices its old connection is gone.
    fn register(&self, node: &str) -> (u64, mpsc::UnboundedReceiver<ServerMessage>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.insert(
            node.to_string(),
            SessionHandle {
                id,
                tx,
                pending: HashMap::new(),
            },
        );
        (id, rx)
    }

    /// Removes the session if it is still the node's current one.
    fn unregister(&self, node: &str, id: u64) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.get(node).is_some_and(|s| s.id == id) {
            inner.remove(node);
            true
        } else {
            false
        }
    }
}

/// An agent's session: a WebSocket upgrade
///
/// Opened by each agent. Messages are JSON text frames: the agent sends
/// `AgentMessage`s (a `hello` first, within 10 s), the control plane sends
/// `ServerMessage`s (a `welcome`, then tasks and active versions). Both are
/// described under `components.schemas`.
#[utoipa::path(
    get,
    path = rollwave_api::AGENT_CONNECT_PATH,
    tag = "agents",
    responses(
        (status = 101, description = "Switching Protocols: the session runs over the upgraded connection"),
        (status = 401, description = "No valid agent credential", body = rollwave_api::ErrorBody),
        (status = 403, description = "Not an agent credential", body = rollwave_api::ErrorBody),
        (status = 400, description = "Not a valid WebSocket upgrade request (plain text, from the HTTP layer)", content_type = "text/plain", body = String),
        (status = 426, description = "The connection cannot be upgraded (plain text, from the HTTP layer)", content_type = "text/plain", body = String),
    )
)]
pub async fn connect(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    ws: WebSocketUpgrade,
) -> Response {
    // Small buffers: a session carries small JSON messages, and a control
    // plane holds one per node (the default 128 KiB each would be more than
    // a gigabyte at 10,000 nodes); a larger message still grows the buffer.
    ws.max_message_size(8 << 20)
        .read_buffer_size(8 << 10)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            if let Err(e) = serve(shared, caller, socket).await {
                tracing::warn!(error = %e, "agent session ended");
            }
        })
}

pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

async fn serve(shared: Arc<Shared>, caller: Caller, socket: WebSocket) -> anyhow::Result<()> {
    let (mut sink, mut stream) = socket.split();
    let first = tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await;
    let hello = match first {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<AgentMessage>(text.as_str()),
        _ => anyhow::bail!("agent sent no hello within {HELLO_TIMEOUT:?}"),
    };
    let (node, labels, services) = match hello {
        Ok(AgentMessage::Hello {
            protocol,
            node,
            labels,
            services,
            ..
        }) => {
            let refusal = if protocol != AGENT_PROTOCOL {
                Some(format!(
                    "agent protocol {protocol} is not supported by this control plane (it speaks {AGENT_PROTOCOL})"
                ))
            } else if !valid_node_name(&node) {
                Some(format!(
                    "node name {node:?} is invalid: use 1-128 characters of a-z, A-Z, 0-9, '-', '_', '.'"
                ))
            } else if caller.node.as_deref() != Some(node.as_str()) {
                // Everything the session does afterwards is in this node's
                // name: a credential acts for its own node only.
                let owner = caller.node.as_deref().unwrap_or("no node");
                record_impersonation(&shared, &caller, &node).await;
                Some(format!(
                    "this credential belongs to node {owner:?}; it cannot act as {node:?}"
                ))
            } else {
                None
            };
            if let Some(reason) = refusal {
                let msg = serde_json::to_string(&ServerMessage::Refused {
                    reason: reason.clone(),
                })?;
                sink.send(Message::Text(msg.into())).await?;
                anyhow::bail!("refused agent: {reason}");
            }
            (node, labels, services)
        }
        Ok(other) => anyhow::bail!("expected hello, got {other:?}"),
        Err(e) => anyhow::bail!("malformed hello: {e}"),
    };

    let (id, mut outbox) = shared.sessions.register(&node);
    let view = NodeView {
        name: node.clone(),
        labels,
        online: true,
        last_seen: now_ms(),
        services,
    };
    set_node(&shared, view).await;
    tracing::info!(node = %node, "agent connected");
    // Read after registering: a finalize from now on also reaches this
    // session's outbox, so the agent cannot miss a change.
    let active_versions = crate::active_versions(&shared).await?;
    let welcome = serde_json::to_string(&ServerMessage::Welcome {
        node: node.clone(),
        active_versions,
        term: shared.term,
    })?;
    sink.send(Message::Text(welcome.into())).await?;
    shared.reconciler.send(Event::AgentConnected(node.clone()));

    let mut ping = tokio::time::interval(SESSION_PING_EVERY);
    let mut last_heard = tokio::time::Instant::now();
    // Wall-clock twin of last_heard: a silent agent was last seen when it
    // last spoke, not when the silence was noticed.
    let mut last_heard_ms = now_ms();
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                msg = outbox.recv() => {
                    // None: a newer session of the same node replaced this one.
                    let Some(msg) = msg else { return Ok(()) };
                    sink.send(Message::Text(serde_json::to_string(&msg)?.into())).await?;
                    if let ServerMessage::Refused { reason } = msg {
                        anyhow::bail!("session closed: {reason}");
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > SESSION_SILENCE_LIMIT {
                        anyhow::bail!("agent silent for {SESSION_SILENCE_LIMIT:?}");
                    }
                    if !shared.tokens.is_live(&caller.token_id, now_ms()) {
                        let msg = ServerMessage::Refused { reason: "this node's credential was revoked or has expired".into() };
                        let _ = sink.send(Message::Text(serde_json::to_string(&msg)?.into())).await;
                        anyhow::bail!("credential {} is no longer valid", caller.name);
                    }
                    sink.send(Message::Ping(Default::default())).await?;
                }
                frame = stream.next() => {
                    last_heard = tokio::time::Instant::now();
                    last_heard_ms = now_ms();
                    match frame {
                        Some(Ok(Message::Text(text))) => {
                            match serde_json::from_str::<AgentMessage>(text.as_str()) {
                                Ok(msg) => handle(&shared, &node, id, msg).await,
                                Err(e) => tracing::warn!(node = %node, error = %e, "malformed agent message"),
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => return Ok(()),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e.into()),
                    }
                }
            }
        }
    }
    .await;

    if shared.sessions.unregister(&node, id) {
        let view = {
            let mut fleet = shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
            fleet.get_mut(&node).map(|v| {
                v.online = false;
                v.last_seen = last_heard_ms;
                v.clone()
            })
        };
        if let Some(view) = view {
            persist(&shared, &view).await;
        }
        tracing::info!(node = %node, "agent disconnected");
        shared.reconciler.send(Event::Kick);
    }
    result
}

async fn handle(shared: &Shared, node: &str, session: u64, msg: AgentMessage) {
    match msg {
        AgentMessage::Hello { .. } => tracing::warn!(node = %node, "duplicate hello ignored"),
        AgentMessage::Status { services } => {
            let view = {
                let mut fleet = shared.fleet.lock().unwrap_or_else(|e| e.into_inner());
                fleet.get_mut(node).map(|v| {
                    let durable = durable_change(&v.services, &services);
                    v.services = services;
                    v.last_seen = now_ms();
                    (v.clone(), durable)
                })
            };
            match view {
                Some((view, true)) => persist(shared, &view).await,
                // Health alone is not stored: what the store keeps of a
                // node is for when it is offline, where health means
                // nothing; the stream still carries it.
                Some((view, false)) => shared.events.node(&view),
                None => {}
            }
            shared.reconciler.send(Event::Kick);
        }
        AgentMessage::TaskPhase { task_id, phase } => shared.reconciler.send(Event::Phase {
            node: node.to_string(),
            task_id,
            phase,
        }),
        AgentMessage::TaskResult { task_id, outcome } => shared.reconciler.send(Event::Result {
            node: node.to_string(),
            task_id,
            outcome,
        }),
        AgentMessage::Logs(reply) => shared.sessions.answered(node, session, reply),
    }
}

/// A credential presented for another node is an attack or a copied
/// config: either way it belongs in the audit trail, which otherwise
/// records only requests that change something.
async fn record_impersonation(shared: &Shared, caller: &Caller, claimed: &str) {
    let entry = AuditEntry {
        id: 0,
        at: now_ms(),
        actor: caller.name.clone(),
        remote: None,
        action: "agent.refused".into(),
        target: format!("node {claimed}"),
        ok: false,
        status: 403,
        detail: format!(
            "credential of node {} claimed to be node {claimed}",
            caller.node.as_deref().unwrap_or("-")
        ),
    };
    if let Err(e) = shared.store.append_audit(&entry).await {
        tracing::error!(error = %e, "appending to the audit trail");
    }
}

async fn set_node(shared: &Shared, view: NodeView) {
    shared
        .fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(view.name.clone(), view.clone());
    persist(shared, &view).await;
}

/// Whether a status changes what the store keeps of a node: the version
/// it runs and its backups (what a rollout plans with and rolls back to
/// while the node is offline). Not its health, nor what it has staged: an
/// offline node is sent nothing until it is back and says so again.
fn durable_change(
    before: &std::collections::BTreeMap<String, rollwave_core::ServiceView>,
    after: &std::collections::BTreeMap<String, rollwave_core::ServiceView>,
) -> bool {
    before.len() != after.len()
        || before.iter().zip(after).any(|((name_a, a), (name_b, b))| {
            name_a != name_b || a.version != b.version || a.backups != b.backups
        })
}

/// Every change of a node's view comes here: it is streamed, and queued
/// for the store (see `node_writes`).
async fn persist(shared: &Shared, view: &NodeView) {
    shared.events.node(view);
    shared.node_writes.put(view.clone());
}
