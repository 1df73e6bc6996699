//! The agent's one long-lived connection to the control plane: a WebSocket
//! the agent opens (so nodes need no inbound port), reopened with backoff
//! whenever it drops. Tasks arrive on it the moment they are decided; status
//! changes and task reports go out on it, queued while it is down.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rollwave_api::{
    AgentMessage, LogsOutcome, LogsReply, LogsRequest, ServerMessage, AGENT_CONNECT_PATH,
    AGENT_PROTOCOL, LEADER_HEADER, SESSION_SILENCE_LIMIT,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::config::AgentConfig;
use crate::executor::{snapshot, Executor, Services};
use crate::logs::ServiceLog;

/// Waits between attempts to reach the control plane: at least
/// `BACKOFF_MIN`, plus a random part (full jitter) of a span that doubles
/// from `BACKOFF_MIN` to `BACKOFF_MAX`. A control plane restarted in a second
/// or two is reached again within about a second of being back, while a
/// fleet of 10,000 agents spreads its attempts over the span instead of
/// arriving together.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// TCP connect, TLS handshake and WebSocket upgrade together: a control
/// plane that accepts connections but never answers is retried like one
/// that refuses them.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The services' logs, by service name.
pub type Logs = Arc<std::collections::BTreeMap<String, Arc<ServiceLog>>>;

/// `outbox`: what goes to the control plane, and a sender for the answers
/// to its log requests.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: Arc<AgentConfig>,
    tls: Option<Arc<rollwave_tls::ClientConfig>>,
    credential: String,
    services: Services,
    executor: Arc<Executor>,
    outbox: (
        mpsc::UnboundedReceiver<AgentMessage>,
        mpsc::UnboundedSender<AgentMessage>,
    ),
    changed: Arc<Notify>,
    logs: Logs,
) {
    let (mut outbox, replies) = outbox;
    let mut backoff = Backoff::default();
    // Which of the replicas to try: the same again after a session that
    // ended (it may be back at once), the next after a failed attempt (it
    // may be down, or follow another and send agents to the leader).
    let mut at = 0;
    // The last server that could not be reached since a session was up: a
    // follower still naming it as the leader (its lease has not lapsed
    // yet) is not followed there again at once.
    let mut unreachable: Option<usize> = None;
    // Followers sent to in a row: two with stale views of the election
    // could otherwise send the agent back and forth.
    let mut hops = 0;
    loop {
        let server = &config.servers[at % config.servers.len()];
        let url = session_url(server);
        let dial = Dial {
            url: &url,
            connector: tls.clone().map(Connector::Rustls),
            credential: &credential,
        };
        executor.set_server(server);
        let mut opened = false;
        let ended = session(
            &config,
            dial,
            Local {
                services: &services,
                executor: &executor,
                logs: &logs,
                replies: &replies,
            },
            &mut outbox,
            &changed,
            &mut opened,
        )
        .await;
        // A follower names a newly elected leader: go there next, after
        // the shortest wait and without lengthening the next ones, so that
        // a fleet moves to a new leader as soon as the replicas know it.
        if let Ok(Ended::Follower(leader)) = &ended {
            let leader = leader.trim_end_matches('/');
            let known = config
                .servers
                .iter()
                .position(|s| s.trim_end_matches('/') == leader);
            if let Some(i) =
                known.filter(|i| Some(*i) != unreachable && hops < config.servers.len())
            {
                tracing::info!(follower = %server, %leader, "sent to the leader");
                hops += 1;
                at = i;
                tokio::time::sleep(BACKOFF_MIN + Duration::from_millis(random() % 100)).await;
                continue;
            }
        }
        hops = 0;
        if ended.is_err() {
            unreachable = Some(at % config.servers.len());
        }
        if !matches!(ended, Ok(Ended::Closed)) {
            at += 1;
        }
        // A session that was up and dropped (a restarted control plane)
        // starts over with short waits, however long the last outage was.
        if opened {
            backoff = Backoff::default();
            unreachable = None;
        }
        let wait = backoff.next(random());
        match ended {
            Ok(Ended::Refused(reason)) => {
                tracing::error!(reason = %reason, "control plane refused this agent");
                tokio::time::sleep(REFUSED_BACKOFF).await;
                continue;
            }
            Ok(Ended::Closed) => {
                tracing::warn!(retry_in = ?wait, "connection to the control plane closed; reconnecting");
            }
            Ok(Ended::Follower(leader)) => {
                tracing::info!(follower = %server, %leader, retry_in = ?wait, "this control plane follows; trying the next");
            }
            Err(e) => match rollwave_tls::describe_error(e.as_ref()) {
                // Not a passing fault: said louder, and in rustls's words
                // rather than behind the WebSocket's layers.
                Some(tls) => {
                    tracing::error!(server = %server, error = %tls, retry_in = ?wait, "control plane's certificate refused")
                }
                None => {
                    tracing::warn!(server = %server, error = %e, retry_in = ?wait, "control plane unreachable")
                }
            },
        }
        tokio::time::sleep(wait).await;
    }
}

/// The waits between reconnection attempts (see [`BACKOFF_MIN`]); shared
/// with `rollwave sim`, whose virtual agents reconnect as agents do.
#[derive(Debug)]
pub struct Backoff {
    /// The span the next wait's random part is drawn from.
    span: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { span: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next wait, given a random number, and a longer span after it.
    pub fn next(&mut self, random: u64) -> Duration {
        let span = self.span.as_millis() as u64;
        let wait = BACKOFF_MIN + Duration::from_millis(random % (span + 1));
        self.span = (self.span * 2).min(BACKOFF_MAX - BACKOFF_MIN);
        wait
    }
}

/// A random number from the operating system; 0 if it has none to give,
/// which only costs the jitter.
fn random() -> u64 {
    getrandom::u64().unwrap_or(0)
}

enum Ended {
    Closed,
    Refused(String),
    /// A replica that follows named the leader.
    Follower(String),
}

/// Where and how to open the session.
struct Dial<'a> {
    url: &'a str,
    connector: Option<Connector>,
    credential: &'a str,
}

/// The session's WebSocket URL on the control plane at `server`.
pub fn session_url(server: &str) -> String {
    format!(
        "{}{}",
        server
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1),
        AGENT_CONNECT_PATH
    )
}

pub type SessionStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How an attempt to open a session ended, short of a fault to retry.
pub enum Dialed {
    Open(Box<SessionStream>),
    /// The control plane refused the credential (401 or 403), in its words.
    Refused(String),
    /// A replica that follows sent the agent to the leader, at this
    /// address.
    Follower(String),
}

/// Opens a session with `credential` (TCP connect, TLS handshake when
/// `connector` has it, WebSocket upgrade, all within [`CONNECT_TIMEOUT`]).
/// Shared with `rollwave sim`, whose virtual agents dial exactly as an agent
/// does; `ws_config` lets them use smaller buffers.
pub async fn dial_session(
    url: &str,
    credential: &str,
    connector: Option<Connector>,
    ws_config: Option<WebSocketConfig>,
) -> anyhow::Result<Dialed> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert(AUTHORIZATION, crate::enroll::auth_header(credential)?);
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, ws_config, false, connector);
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?;
    match connected {
        Ok((ws, _)) => Ok(Dialed::Open(Box::new(ws))),
        Err(WsError::Http(resp))
            if resp.status() == StatusCode::UNAUTHORIZED
                || resp.status() == StatusCode::FORBIDDEN =>
        {
            let body = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<rollwave_api::ErrorBody>(b).ok())
                .map_or_else(|| resp.status().to_string(), |b| b.error.message);
            Ok(Dialed::Refused(body))
        }
        Err(WsError::Http(resp))
            if resp.status() == StatusCode::SERVICE_UNAVAILABLE
                && resp.headers().contains_key(LEADER_HEADER) =>
        {
            let leader = resp.headers()[LEADER_HEADER].to_str().unwrap_or_default();
            Ok(Dialed::Follower(leader.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// What a session acts on, on this node.
struct Local<'a> {
    services: &'a Services,
    executor: &'a Arc<Executor>,
    logs: &'a Logs,
    /// Where answers to log requests go, to be sent in turn.
    replies: &'a mpsc::UnboundedSender<AgentMessage>,
}

async fn session(
    config: &AgentConfig,
    dial: Dial<'_>,
    local: Local<'_>,
    outbox: &mut mpsc::UnboundedReceiver<AgentMessage>,
    changed: &Notify,
    opened: &mut bool,
) -> anyhow::Result<Ended> {
    let Local {
        services,
        executor,
        logs,
        replies,
    } = local;
    let server = dial.url.to_string();
    let ws = match dial_session(dial.url, dial.credential, dial.connector, None).await? {
        Dialed::Open(ws) => ws,
        Dialed::Refused(body) => {
            return Ok(Ended::Refused(format!(
                "the node credential ({}) was refused: {body}",
                crate::enroll::credential_path(&config.state_dir).display()
            )));
        }
        Dialed::Follower(leader) => return Ok(Ended::Follower(leader)),
    };
    let (mut sink, mut stream) = (*ws).split();
    let mut reported = snapshot(services);
    let hello = AgentMessage::Hello {
        protocol: AGENT_PROTOCOL,
        node: config.node.clone(),
        labels: config.labels.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        services: reported.clone(),
    };
    sink.send(Message::text(serde_json::to_string(&hello)?))
        .await?;
    *opened = true;
    tracing::info!(%server, node = %config.node, "connected to the control plane");
    // The control plane pings every few seconds. A connection that carries
    // nothing for longer is dead though never closed (a partition, a lost
    // host): without this the agent would wait on it forever and the node
    // would stay offline after the control plane came back.
    let silence = tokio::time::sleep(SESSION_SILENCE_LIMIT);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            _ = &mut silence => {
                anyhow::bail!("the control plane sent nothing for {SESSION_SILENCE_LIMIT:?}");
            }
            frame = stream.next() => {
                silence.as_mut().reset(tokio::time::Instant::now() + SESSION_SILENCE_LIMIT);
                match frame {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(text.as_str()) {
                        Ok(ServerMessage::Task(task)) => {
                            tracing::info!(task = %task.id, service = %task.service, "task received");
                            executor.submit(task);
                        }
                        Ok(ServerMessage::Welcome { active_versions, term, .. }) => {
                            // Before any task of this session: a leader of an
                            // older term (deposed, and woken) steers nothing.
                            let seen = crate::layout::read_term(&config.state_dir);
                            if term < seen {
                                anyhow::bail!("{server} leads in term {term}, older than term {seen} seen before: a deposed leader; ignoring its session");
                            }
                            if term > seen {
                                crate::layout::write_term(&config.state_dir, term)?;
                            }
                            crate::gate::apply(services, &active_versions);
                        }
                        Ok(ServerMessage::ActiveVersions { active_versions }) => {
                            crate::gate::apply(services, &active_versions);
                        }
                        Ok(ServerMessage::Logs(req)) => answer_logs(logs, replies, req),
                        Ok(ServerMessage::Refused { reason }) => return Ok(Ended::Refused(reason)),
                        Err(e) => tracing::warn!(error = %e, "malformed message from the control plane"),
                    },
                    Some(Ok(Message::Close(_))) | None => return Ok(Ended::Closed),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                }
            }
            msg = outbox.recv() => {
                let Some(msg) = msg else { return Ok(Ended::Closed) };
                let text = serde_json::to_string(&msg)?;
                if let Err(e) = sink.send(Message::text(text)).await {
                    // Results must not be lost: the control plane resends
                    // the task on reconnect and the journal answers it.
                    return Err(e.into());
                }
            }
            _ = changed.notified() => {
                let now = snapshot(services);
                if now != reported {
                    sink.send(Message::text(serde_json::to_string(&AgentMessage::Status { services: now.clone() })?)).await?;
                    reported = now;
                }
            }
        }
    }
}

/// Reads the log in a task of its own (a request may wait for new lines),
/// and queues the answer.
fn answer_logs(logs: &Logs, replies: &mpsc::UnboundedSender<AgentMessage>, req: LogsRequest) {
    let id = req.id;
    let log = logs.get(&req.service).cloned();
    let replies = replies.clone();
    tokio::spawn(async move {
        let outcome = match log {
            Some(log) => log.answer(req).await,
            None => LogsOutcome::UnknownService,
        };
        // Queued for the session: one that ended meanwhile carries it to
        // the next, whose control plane ignores an id it did not issue.
        let _ = replies.send(AgentMessage::Logs(LogsReply { id, outcome }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_start_short_grow_to_the_max_and_spread() {
        let ms = |d: Duration| d.as_millis() as u64;
        let mut b = Backoff::default();
        // The first retry comes within 100 to 200 ms.
        assert_eq!(ms(b.next(0)), 100);
        let mut b = Backoff::default();
        assert_eq!(ms(b.next(100)), 200);
        // Each span doubles, up to the max.
        let mut b = Backoff::default();
        let highest: Vec<u64> = (0..8).map(|_| ms(b.next(u64::MAX))).collect();
        let spans: Vec<u64> = (0..8)
            .scan(100u64, |s, _| {
                let now = *s;
                *s = (now * 2).min(1_900);
                Some(100 + now)
            })
            .collect();
        for (got, span) in highest.iter().zip(&spans) {
            assert!(*got >= 100 && *got <= *span, "{highest:?} within {spans:?}");
        }
        // Wide enough at the max that 10,000 agents spread over it.
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.next(0);
        }
        let waits: std::collections::BTreeSet<u64> =
            (0..2_000).map(|r| ms(b.next(r * 997))).collect();
        assert!(waits.len() > 1_000, "{} distinct waits", waits.len());
        assert!(waits.iter().all(|&w| (100..=2_000).contains(&w)));
    }
}
