//! Runs hooks (`rollwave_core::Hook`): commands and webhooks around a
//! rollout, on the control plane, and around each node's switch, on the node.
//!
//! A hook's result decides whether a rollout goes on, so running one is
//! careful in the same ways as a health check:
//!
//! - it never hangs: every attempt is bounded by the hook's timeout, and a
//!   command that times out is killed with its whole process group, so a
//!   script's children do not outlive it;
//! - it never fails the caller: whatever happens is in the [`HookReport`],
//!   with a one-line `error` an operator can act on (`exited 3`,
//!   `timed out after 30s`, `http 503`,
//!   `cannot reach https://hooks.example.com: connection refused`);
//! - webhooks follow no redirects and print no path: a Slack webhook's path
//!   is its secret, and reports end up in the rollout's execution log.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
pub mod haproxy;

use rollwave_core::{
    describe_io, error_chain, find_io_error, format_duration, Hook, HookAction, HookReport, LbState,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// How many bytes at the end of a command's output are kept.
const OUTPUT_TAIL: usize = 4096;
/// How many bytes at the start of a webhook's response are kept.
const BODY_PREFIX: usize = 1024;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A killed process is normally reaped at once; this only bounds the wait
/// for one stuck in the kernel, which tokio then reaps in the background.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// What a hook is told about the step it runs around.
#[derive(Debug, Clone, Default)]
pub struct HookContext {
    /// Environment for exec hooks (added to the inherited environment), e.g.
    /// ROLLWAVE_HOOK=pre_node, ROLLWAVE_ROLLOUT=7, ROLLWAVE_SERVICE, ROLLWAVE_VERSION, ROLLWAVE_FROM_VERSION, ROLLWAVE_NODE.
    pub env: BTreeMap<String, String>,
    /// The JSON event an http hook posts (as is, or summarized into {"text": ...} when slack = true).
    pub event: serde_json::Value,
    /// Working directory for exec hooks (None: inherit).
    pub dir: Option<PathBuf>,
}

/// A reqwest client suitable for webhooks (rustls, connect timeout, no redirects).
///
/// Redirects are not followed: a hook answers for itself, and a 3xx is
/// reported as such rather than posted on to wherever it points.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("rollwave/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Runs a hook to its end: every attempt (1 + retries) bounded by hook.timeout, with
/// backoff between attempts (e.g. 200ms doubling, capped at 5s). Never panics; failures are in the report.
///
/// Dropping the future kills a command still running, with its process group.
pub async fn run(hook: &Hook, ctx: &HookContext, client: &reqwest::Client) -> HookReport {
    let started = Instant::now();
    let timeout = Duration::from_millis(hook.timeout);
    let mut backoff = BACKOFF_FIRST;
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let last = match &hook.action {
            HookAction::Exec { command } => exec(command, ctx, timeout).await,
            // The agent turns these into the command its config declares
            // before running them; one that reaches here was not declared.
            HookAction::Node { hook } => {
                Attempt::failed(format!("node hook {hook:?} is not declared on this node"))
            }
            HookAction::Http { url, slack } => http(url, *slack, ctx, client, timeout).await,
            HookAction::Haproxy {
                socket,
                backend,
                server,
                state,
            } => lb(socket, backend, server, *state, ctx, timeout).await,
        };
        if last.error.is_none() || attempts > hook.retries {
            return HookReport {
                name: hook.name.clone(),
                ok: last.error.is_none(),
                attempts,
                exit_code: last.exit_code,
                http_status: last.http_status,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                output: last.output,
                error: last.error,
            };
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Drains the node's server (waiting up to `timeout` for its sessions to
/// end) or re-enables it.
async fn lb(
    socket: &str,
    backend: &str,
    server: &str,
    state: LbState,
    ctx: &HookContext,
    timeout: Duration,
) -> Attempt {
    let server = match ctx.env.get("ROLLWAVE_NODE") {
        Some(node) => server.replace("{node}", node),
        None if server.contains("{node}") => {
            return Attempt::failed("no node name for {node}: haproxy hooks run on nodes".into())
        }
        None => server.to_string(),
    };
    let lb = haproxy::Haproxy {
        socket: socket.into(),
        backend: backend.to_string(),
        server: server.clone(),
        timeout,
    };
    let (result, done) = match state {
        LbState::Drain => (lb.drain().await, "drained"),
        LbState::Ready => (lb.ready().await, "ready"),
    };
    match result {
        Ok(()) => Attempt {
            output: format!("{backend}/{server} {done}"),
            ..Attempt::default()
        },
        Err(e) => Attempt::failed(e.to_string()),
    }
}

/// One attempt; it succeeded if `error` is none.
#[derive(Debug, Default)]
struct Attempt {
    exit_code: Option<i32>,
    http_status: Option<u16>,
    output: String,
    error: Option<String>,
}

impl Attempt {
    fn failed(error: String) -> Attempt {
        Attempt {
            error: Some(error),
            ..Attempt::default()
        }
    }
}

fn timed_out(timeout: Duration) -> String {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    format!("timed out after {}", format_duration(ms))
}

async fn exec(command: &[String], ctx: &HookContext, timeout: Duration) -> Attempt {
    let Some((program, args)) = command.split_first() else {
        return Attempt::failed("cannot run an empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(&ctx.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so a timeout can kill the script and its children.
        .process_group(0);
    if let Some(dir) = &ctx.dir {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Attempt::failed(format!("cannot run {program}: {}", describe_io(&e))),
    };
    let mut group = Group(child.id().and_then(|id| i32::try_from(id).ok()));
    let tail = Mutex::new(Vec::new());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // Waits for the output to end too: a leftover child holding the pipes
    // open makes the hook time out rather than hang.
    let finished = tokio::time::timeout(timeout, async {
        let (status, (), ()) = tokio::join!(
            child.wait(),
            keep_tail(stdout, &tail),
            keep_tail(stderr, &tail)
        );
        status
    })
    .await;
    let output = text_tail(&tail.lock().unwrap_or_else(|e| e.into_inner()));
    let status = match finished {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            return Attempt {
                output,
                ..Attempt::failed(format!("waiting for {program}: {}", describe_io(&e)))
            }
        }
        Err(_) => {
            group.kill();
            let _ = child.start_kill();
            let _ = tokio::time::timeout(REAP_GRACE, child.wait()).await;
            return Attempt {
                output,
                ..Attempt::failed(timed_out(timeout))
            };
        }
    };
    // It ended and closed its output: whatever it left running in the
    // background was meant to stay.
    group.0 = None;
    let error = match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(code), _) => Some(format!("exited {code}")),
        (None, Some(signal)) => Some(format!("killed by signal {signal}")),
        (None, None) => Some(status.to_string()),
    };
    Attempt {
        exit_code: status.code(),
        http_status: None,
        output,
        error,
    }
}

/// A process group killed when dropped (a timeout, or the caller giving up
/// on the hook), unless it is emptied first.
struct Group(Option<i32>);

impl Group {
    fn kill(&mut self) {
        // Called before the group's leader has been reaped (or while the
        // group still has members holding the output open), so the id
        // cannot have been reused for another group.
        if let Some(pgid) = self.0.take() {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a pipe to its end into `tail`, keeping its last [`OUTPUT_TAIL`] bytes.
async fn keep_tail(pipe: Option<impl AsyncRead + Unpin>, tail: &Mutex<Vec<u8>>) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > OUTPUT_TAIL {
                    let excess = tail.len() - OUTPUT_TAIL;
                    tail.drain(..excess);
                }
            }
        }
    }
}

/// The bytes as text, starting at a character boundary when they were cut.
fn text_tail(bytes: &[u8]) -> String {
    let cut = if bytes.len() >= OUTPUT_TAIL {
        // Skip at most the 3 continuation bytes of a split character.
        bytes
            .iter()
            .take(3)
            .take_while(|b| (**b & 0xC0) == 0x80)
            .count()
    } else {
        0
    };
    String::from_utf8_lossy(&bytes[cut..]).into_owned()
}

async fn http(
    url: &str,
    slack: bool,
    ctx: &HookContext,
    client: &reqwest::Client,
    timeout: Duration,
) -> Attempt {
    let body = if slack {
        serde_json::json!({ "text": slack_text(&ctx.event) })
    } else {
        ctx.event.clone()
    };
    let post = async {
        let mut response = client
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| describe_request_error(url, e))?;
        let status = response.status().as_u16();
        Ok::<_, String>((status, body_prefix(&mut response).await))
    };
    match tokio::time::timeout(timeout, post).await {
        Err(_) => Attempt::failed(timed_out(timeout)),
        Ok(Err(e)) => Attempt::failed(e),
        Ok(Ok((status, output))) => Attempt {
            exit_code: None,
            http_status: Some(status),
            output,
            error: (!(200..300).contains(&status)).then(|| format!("http {status}")),
        },
    }
}

/// The one line a Slack-compatible webhook shows: the event's `message`, or
/// the whole event when it has none.
fn slack_text(event: &serde_json::Value) -> String {
    match event.get("message").and_then(|m| m.as_str()) {
        Some(message) => message.to_string(),
        None => event.to_string(),
    }
}

/// The first [`BODY_PREFIX`] bytes of the body.
async fn body_prefix(response: &mut reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < BODY_PREFIX {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(BODY_PREFIX);
    String::from_utf8_lossy(&body).into_owned()
}

/// `cannot reach https://hooks.example.com: connection refused`. Only the
/// origin is named: a webhook's path may be its secret.
fn describe_request_error(url: &str, e: reqwest::Error) -> String {
    let origin = reqwest::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|_| "the webhook".into());
    let connect = e.is_connect();
    // reqwest's own message names the whole URL.
    let e = e.without_url();
    let cause = match find_io_error(&e) {
        Some(io) => describe_io(io),
        None => error_chain(&e),
    };
    if connect {
        format!("cannot reach {origin}: {cause}")
    } else {
        format!("posting to {origin}: {cause}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tail_starts_at_a_character() {
        let mut bytes = vec![b'a'; OUTPUT_TAIL - 1];
        bytes.insert(0, 0xA9); // the end of a cut "é"
        assert_eq!(text_tail(&bytes), "a".repeat(OUTPUT_TAIL - 1));
        assert_eq!(text_tail("é!".as_bytes()), "é!");
    }

    #[test]
    fn slack_text_is_the_message_or_the_event() {
        let event = serde_json::json!({ "hook": "pre_node", "message": "api 2.0.0 on n1" });
        assert_eq!(slack_text(&event), "api 2.0.0 on n1");
        let event = serde_json::json!({ "hook": "pre_node" });
        assert_eq!(slack_text(&event), r#"{"hook":"pre_node"}"#);
    }
}
