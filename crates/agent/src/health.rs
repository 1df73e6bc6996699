//! Health checks of supervised services: their configuration, how one check
//! runs, and how results are debounced into a [`Health`].
//!
//! A check's verdict decides whether a rollout goes on or rolls back, so the
//! checks are careful in three ways:
//!
//! - they never hang: every check is bounded by its timeout, and an exec
//!   check that times out is killed with its whole process group, so a
//!   script's children do not pile up one interval after the other;
//! - they only vouch for the service itself: HTTP redirects are not followed
//!   (a 3xx is a failure), since a redirect can lead to some other, healthy,
//!   service;
//! - a failure reads as one line an operator can act on
//!   (`http 503 from http://127.0.0.1:8080/health: overloaded`,
//!   `connect 127.0.0.1:8080: connection refused`,
//!   `exit status 3: database unreachable`).
//!
//! [`HealthCheck`] is the configuration as written; [`HealthCheck::resolve`]
//! validates it into a [`ResolvedCheck`] with errors that name the field.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use rollwave_core::{
    describe_io, error_chain, find_io_error, format_duration, parse_duration, Health, SpecError,
};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

pub const DEFAULT_INTERVAL: &str = "1s";
pub const DEFAULT_TIMEOUT: &str = "2s";
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 1;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 2;

/// How many bytes of an HTTP error body make it into the detail.
const BODY_PREFIX: usize = 200;
/// How many bytes at the end of an exec check's output are kept.
const OUTPUT_TAIL: usize = 4096;
/// How many characters of an output line make it into the detail.
const LINE_MAX: usize = 200;

/// A health check as written in the agent configuration, e.g.
///
/// ```toml
/// type = "http"
/// url = "http://127.0.0.1:8080/health"
/// interval = "2s"
/// ```
///
/// Flat rather than an internally tagged enum because serde cannot combine
/// `#[serde(flatten)]`, tagged enums and `deny_unknown_fields`; which fields
/// go with which `type` is checked by [`HealthCheck::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `"http"`, `"tcp"` or `"exec"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// For `http`: the URL to GET; any 2xx passes.
    pub url: Option<String>,
    /// For `tcp`: `host:port` to connect to.
    pub address: Option<String>,
    /// For `exec`: program and arguments; exit status 0 passes. May contain
    /// `{release}`, substituted by the caller.
    pub command: Option<Vec<String>>,
    /// Time between checks (default 1s).
    pub interval: Option<String>,
    /// Time after which a check fails (default 2s).
    pub timeout: Option<String>,
    /// Consecutive passes to become healthy (default 1).
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures to become unhealthy (default 2).
    pub unhealthy_threshold: Option<u32>,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Http { url: String },
    Tcp { address: String },
    Exec { command: Vec<String> },
}

impl CheckKind {
    fn name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Exec { .. } => "exec",
        }
    }
}

/// A validated health check, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl HealthCheck {
    /// Validates the check and applies defaults. Errors name the field with
    /// `field_prefix` in front, e.g. with `service.api.health`:
    /// `service.api.health.url: is required for type = "http"`.
    pub fn resolve(&self, field_prefix: &str) -> Result<ResolvedCheck, SpecError> {
        let field = |name: &str| {
            if field_prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{field_prefix}.{name}")
            }
        };
        let err = |name: &str, message: String| SpecError::new(field(name), message);

        let kind = match self.kind.as_deref() {
            None => {
                return Err(err(
                    "type",
                    r#"is required (one of "http", "tcp", "exec")"#.to_owned(),
                ))
            }
            Some("http") => {
                let url = required(&self.url, "http").map_err(|m| err("url", m))?;
                check_url(url).map_err(|m| err("url", m))?;
                CheckKind::Http {
                    url: url.to_owned(),
                }
            }
            Some("tcp") => {
                let address = required(&self.address, "tcp").map_err(|m| err("address", m))?;
                check_address(address).map_err(|m| err("address", m))?;
                CheckKind::Tcp {
                    address: address.to_owned(),
                }
            }
            Some("exec") => {
                let command = required(&self.command, "exec").map_err(|m| err("command", m))?;
                if command.first().is_none_or(String::is_empty) {
                    return Err(err(
                        "command",
                        r#"must name a program to run, like ["/usr/local/bin/check", "--quick"]"#
                            .to_owned(),
                    ));
                }
                CheckKind::Exec {
                    command: command.clone(),
                }
            }
            Some(other) => {
                return Err(err(
                    "type",
                    format!(r#"{other:?} is not a check type (one of "http", "tcp", "exec")"#),
                ))
            }
        };
        let used = match kind {
            CheckKind::Http { .. } => "url",
            CheckKind::Tcp { .. } => "address",
            CheckKind::Exec { .. } => "command",
        };
        for (name, set) in [
            ("url", self.url.is_some()),
            ("address", self.address.is_some()),
            ("command", self.command.is_some()),
        ] {
            if set && name != used {
                return Err(err(
                    name,
                    format!("is not used by type = {:?}", kind.name()),
                ));
            }
        }

        let duration = |name: &str, value: &Option<String>, default: &str| {
            let value = value.as_deref().unwrap_or(default);
            let ms = parse_duration(&field(name), value)?;
            if ms == 0 {
                return Err(err(name, "must be longer than zero".to_owned()));
            }
            Ok(Duration::from_millis(ms))
        };
        let threshold =
            |name: &str, value: Option<u32>, default: u32| match value.unwrap_or(default) {
                0 => Err(err(name, "must be at least 1".to_owned())),
                n => Ok(n),
            };
        Ok(ResolvedCheck {
            kind,
            interval: duration("interval", &self.interval, DEFAULT_INTERVAL)?,
            timeout: duration("timeout", &self.timeout, DEFAULT_TIMEOUT)?,
            healthy_threshold: threshold(
                "healthy_threshold",
                self.healthy_threshold,
                DEFAULT_HEALTHY_THRESHOLD,
            )?,
            unhealthy_threshold: threshold(
                "unhealthy_threshold",
                self.unhealthy_threshold,
                DEFAULT_UNHEALTHY_THRESHOLD,
            )?,
        })
    }
}

fn required<'a, T>(value: &'a Option<T>, kind: &str) -> Result<&'a T, String> {
    value
        .as_ref()
        .ok_or_else(|| format!("is required for type = {kind:?}"))
}

fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" => Ok(()),
        _ => Err(format!("{url:?} must start with http:// or https://")),
    }
}

fn check_address(address: &str) -> Result<(), String> {
    let valid = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{address:?} is not a host:port address (like 127.0.0.1:8080)"
        ))
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// One line: `http 200`, `http 503 from <url>: <start of body>`,
    /// `connect 127.0.0.1:80: connection refused`,
    /// `exit status 1: <last line of stderr>`, `timed out after 2s`.
    pub detail: String,
}

impl CheckResult {
    fn pass(detail: impl Into<String>) -> CheckResult {
        CheckResult {
            ok: true,
            detail: detail.into(),
        }
    }

    fn fail(detail: impl Into<String>) -> CheckResult {
        CheckResult {
            ok: false,
            detail: detail.into(),
        }
    }
}

/// A client suited to [`run_check`]: no redirects, no connection reuse (each
/// check proves the service still accepts connections).
pub fn check_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .user_agent(concat!("rollwave-agent/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Runs one check, bounded by its timeout. Never fails: a check that cannot
/// even start is a failed check. HTTP checks use `client`, which should come
/// from [`check_client`] (a client that follows redirects would let a 3xx
/// pass).
pub async fn run_check(check: &ResolvedCheck, client: &reqwest::Client) -> CheckResult {
    let timed_out = || {
        let ms = u64::try_from(check.timeout.as_millis()).unwrap_or(u64::MAX);
        CheckResult::fail(format!("timed out after {}", format_duration(ms)))
    };
    match &check.kind {
        CheckKind::Http { url } => tokio::time::timeout(check.timeout, http_check(client, url))
            .await
            .unwrap_or_else(|_| timed_out()),
        CheckKind::Tcp { address } => tokio::time::timeout(check.timeout, tcp_check(address))
            .await
            .unwrap_or_else(|_| timed_out()),
        CheckKind::Exec { command } => exec_check(command, check.timeout)
            .await
            .unwrap_or_else(timed_out),
    }
}

async fn http_check(client: &reqwest::Client, url: &str) -> CheckResult {
    let mut response = match client.get(url).send().await {
        Ok(response) => response,
        Err(e) => return CheckResult::fail(describe_request_error(url, &e)),
    };
    let status = response.status();
    if status.is_success() {
        return CheckResult::pass(format!("http {}", status.as_u16()));
    }
    let mut detail = format!("http {} from {url}", status.as_u16());
    if status.is_redirection() {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .unwrap_or("nowhere");
        detail.push_str(&format!(" (redirect to {location}, not followed)"));
    }
    let body = body_prefix(&mut response).await;
    if !body.is_empty() {
        detail.push_str(": ");
        detail.push_str(&body);
    }
    CheckResult::fail(detail)
}

/// The first [`BODY_PREFIX`] bytes of the body, on one line.
async fn body_prefix(response: &mut reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < BODY_PREFIX {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(BODY_PREFIX);
    one_line(&String::from_utf8_lossy(&body))
}

fn describe_request_error(url: &str, e: &reqwest::Error) -> String {
    let cause = match find_io_error(e) {
        Some(io) => describe_io(io),
        None => error_chain(e),
    };
    if e.is_connect() {
        let target = e
            .url()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
            .unwrap_or_else(|| url.to_owned());
        format!("connect {target}: {cause}")
    } else {
        format!("GET {url}: {cause}")
    }
}

async fn tcp_check(address: &str) -> CheckResult {
    match tokio::net::TcpStream::connect(address).await {
        Ok(_) => CheckResult::pass(format!("connected to {address}")),
        Err(e) => CheckResult::fail(format!("connect {address}: {}", describe_io(&e))),
    }
}

/// Runs `command` with its own process group; `None` if it timed out (the
/// group has then been killed).
async fn exec_check(command: &[String], timeout: Duration) -> Option<CheckResult> {
    let Some((program, args)) = command.split_first() else {
        return Some(CheckResult::fail("empty command"));
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so a timeout can kill the script and its children.
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Some(CheckResult::fail(format!(
                "starting {program}: {}",
                describe_io(&e)
            )))
        }
    };
    let group = child.id();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    // Waits for the output to end too: a leftover child holding the pipes
    // open makes the check time out rather than hang.
    let run = async { tokio::join!(child.wait(), output_tail(stdout), output_tail(stderr)) };
    let finished = tokio::time::timeout(timeout, run).await;
    let (status, stdout, stderr) = match finished {
        Ok(done) => done,
        Err(_) => {
            // The child has not been reaped (or its group still has members),
            // so its pid cannot have been reused for another group.
            if let Some(pgid) = group.and_then(|id| i32::try_from(id).ok()) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            let _ = child.start_kill();
            return None;
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            return Some(CheckResult::fail(format!(
                "waiting for {program}: {}",
                describe_io(&e)
            )))
        }
    };
    let mut detail = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("killed by signal {s}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => status.to_string(),
    };
    if !status.success() {
        if let Some(line) = last_line(&stderr).or_else(|| last_line(&stdout)) {
            detail.push_str(": ");
            detail.push_str(&line);
        }
    }
    Some(CheckResult {
        ok: status.success(),
        detail,
    })
}

/// Reads a pipe to its end, keeping the last [`OUTPUT_TAIL`] bytes.
async fn output_tail(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut tail = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > OUTPUT_TAIL {
                    tail.drain(..tail.len() - OUTPUT_TAIL);
                }
            }
        }
    }
    tail
}

fn last_line(output: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(output);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    Some(line.chars().take(LINE_MAX).collect())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Debounces check results into a [`Health`]: healthy after
/// `healthy_threshold` consecutive passes, unhealthy after
/// `unhealthy_threshold` consecutive failures, otherwise unchanged
/// ([`Health::Starting`] until the first verdict).
#[derive(Debug, Clone)]
pub struct HealthTracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    health: Health,
    passes: u32,
    failures: u32,
    last: Option<CheckResult>,
}

impl HealthTracker {
    pub fn new(check: &ResolvedCheck) -> HealthTracker {
        HealthTracker {
            healthy_threshold: check.healthy_threshold,
            unhealthy_threshold: check.unhealthy_threshold,
            health: Health::Starting,
            passes: 0,
            failures: 0,
            last: None,
        }
    }

    /// Records one result and returns the health after it.
    pub fn record(&mut self, result: &CheckResult) -> Health {
        if result.ok {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
            if self.passes >= self.healthy_threshold {
                self.health = Health::Healthy;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
            if self.failures >= self.unhealthy_threshold {
                self.health = Health::Unhealthy;
            }
        }
        self.last = Some(result.clone());
        self.health
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// The most recent result, if any.
    pub fn last(&self) -> Option<&CheckResult> {
        self.last.as_ref()
    }

    /// Back to [`Health::Starting`], e.g. after the service was restarted.
    pub fn reset(&mut self) {
        self.health = Health::Starting;
        self.passes = 0;
        self.failures = 0;
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;
    use std::time::Instant;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn check(kind: CheckKind, timeout: Duration) -> ResolvedCheck {
        ResolvedCheck {
            kind,
            interval: Duration::from_secs(1),
            timeout,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
        }
    }

    async fn run(kind: CheckKind, timeout: Duration) -> CheckResult {
        let client = check_client().unwrap();
        run_check(&check(kind, timeout), &client).await
    }

    fn http(url: &str) -> CheckKind {
        CheckKind::Http {
            url: url.to_owned(),
        }
    }

    fn exec(command: &[&str]) -> CheckKind {
        CheckKind::Exec {
            command: command.iter().map(|s| s.to_string()).collect(),
        }
    }

    const LONG: Duration = Duration::from_secs(10);

    /// Answers every request with `response` (raw, status line included),
    /// or never answers if it is `None`.
    async fn serve(response: Option<&'static str>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    match response {
                        Some(r) => {
                            let _ = sock.write_all(r.as_bytes()).await;
                            let _ = sock.shutdown().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        addr.to_string()
    }

    /// An address nothing listens on.
    async fn closed_address() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr.to_string()
    }

    #[tokio::test]
    async fn http_check_passes_on_2xx() {
        let addr = serve(Some("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).await;
        let r = run(http(&format!("http://{addr}/health")), LONG).await;
        assert_eq!(r, CheckResult::pass("http 200"));

        let addr = serve(Some("HTTP/1.1 204 No Content\r\n\r\n")).await;
        let r = run(http(&format!("http://{addr}/health")), LONG).await;
        assert_eq!(r, CheckResult::pass("http 204"));
    }

    #[tokio::test]
    async fn http_check_fails_on_503_with_start_of_body() {
        const RESPONSE: &str = concat!(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 315\r\n\r\n",
            "overloaded:\n  queue full",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy",
        );
        let addr = serve(Some(RESPONSE)).await;
        let url = format!("http://{addr}/health");
        let r = run(http(&url), LONG).await;
        assert!(!r.ok);
        assert!(
            r.detail
                .starts_with(&format!("http 503 from {url}: overloaded: queue full")),
            "{}",
            r.detail
        );
        assert!(!r.detail.contains('y'), "{}", r.detail);
        assert!(!r.detail.contains('\n'), "{}", r.detail);
    }

    #[tokio::test]
    async fn http_check_does_not_follow_redirects() {
        let target = serve(Some("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let response: &'static str = format!(
            "HTTP/1.1 302 Found\r\nLocation: http://{target}/\r\nContent-Length: 0\r\n\r\n"
        )
        .leak();
        let addr = serve(Some(response)).await;
        let r = run(http(&format!("http://{addr}/health")), LONG).await;
        assert!(!r.ok);
        assert!(r.detail.starts_with("http 302 from"), "{}", r.detail);
        assert!(r.detail.contains("not followed"), "{}", r.detail);
    }

    #[tokio::test]
    async fn http_check_reports_connection_refused() {
        let addr = closed_address().await;
        let r = run(http(&format!("http://{addr}/health")), LONG).await;
        assert!(!r.ok);
        assert_eq!(r.detail, format!("connect {addr}: connection refused"));
    }

    #[tokio::test]
    async fn http_check_times_out() {
        let addr = serve(None).await;
        let started = Instant::now();
        let r = run(
            http(&format!("http://{addr}/health")),
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(r, CheckResult::fail("timed out after 200ms"));
        assert!(started.elapsed() < LONG);
    }

    #[tokio::test]
    async fn tcp_check_connects_or_reports_refusal() {
        let addr = serve(None).await;
        let r = run(
            CheckKind::Tcp {
                address: addr.clone(),
            },
            LONG,
        )
        .await;
        assert_eq!(r, CheckResult::pass(format!("connected to {addr}")));

        let addr = closed_address().await;
        let r = run(
            CheckKind::Tcp {
                address: addr.clone(),
            },
            LONG,
        )
        .await;
        assert_eq!(
            r,
            CheckResult::fail(format!("connect {addr}: connection refused"))
        );
    }

    #[tokio::test]
    async fn exec_check_uses_exit_status() {
        assert_eq!(
            run(exec(&["true"]), LONG).await,
            CheckResult::pass("exit status 0")
        );
        assert_eq!(
            run(exec(&["false"]), LONG).await,
            CheckResult::fail("exit status 1")
        );
    }

    #[tokio::test]
    async fn exec_check_reports_last_line_of_stderr() {
        let r = run(
            exec(&[
                "sh",
                "-c",
                "echo out; echo first >&2; echo boom >&2; exit 3",
            ]),
            LONG,
        )
        .await;
        assert_eq!(r, CheckResult::fail("exit status 3: boom"));

        let r = run(exec(&["sh", "-c", "echo only stdout; exit 4"]), LONG).await;
        assert_eq!(r, CheckResult::fail("exit status 4: only stdout"));

        let r = run(exec(&["sh", "-c", "kill -9 $$"]), LONG).await;
        assert_eq!(r, CheckResult::fail("killed by signal SIGKILL"));
    }

    #[tokio::test]
    async fn exec_check_reports_missing_program() {
        let r = run(exec(&["/nonexistent/rollwave-check"]), LONG).await;
        assert_eq!(
            r,
            CheckResult::fail("starting /nonexistent/rollwave-check: no such file or directory")
        );
    }

    #[tokio::test]
    async fn exec_check_times_out() {
        let started = Instant::now();
        let r = run(exec(&["sleep", "5"]), Duration::from_millis(200)).await;
        assert_eq!(r, CheckResult::fail("timed out after 200ms"));
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    fn alive(pid: i32) -> bool {
        // A zombie is as good as dead: it only waits for its parent.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn exec_check_timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "sleep 60 & echo $! > {}.tmp; mv {0}.tmp {0}; wait",
            pidfile.display()
        );
        let r = run(exec(&["sh", "-c", &script]), Duration::from_secs(2)).await;
        assert_eq!(r, CheckResult::fail("timed out after 2s"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The kill is immediate; the grace period only covers the kernel
        // and the reaper.
        let deadline = Instant::now() + LONG;
        while alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "grandchild {pid} survived the timeout");
        assert!(Path::new(&pidfile).exists());
    }

    fn pass() -> CheckResult {
        CheckResult::pass("http 200")
    }

    fn fail() -> CheckResult {
        CheckResult::fail("http 503")
    }

    #[test]
    fn tracker_debounces_with_thresholds() {
        let mut c = check(http("http://x/"), LONG);
        c.healthy_threshold = 2;
        c.unhealthy_threshold = 3;
        let mut t = HealthTracker::new(&c);
        assert_eq!(t.health(), Health::Starting);
        assert_eq!(t.last(), None);

        assert_eq!(t.record(&pass()), Health::Starting);
        assert_eq!(t.record(&fail()), Health::Starting);
        assert_eq!(t.record(&pass()), Health::Starting);
        assert_eq!(t.record(&pass()), Health::Healthy);
        assert_eq!(t.last(), Some(&pass()));

        assert_eq!(t.record(&fail()), Health::Healthy);
        assert_eq!(t.record(&fail()), Health::Healthy);
        assert_eq!(t.record(&pass()), Health::Healthy);
        assert_eq!(t.record(&fail()), Health::Healthy);
        assert_eq!(t.record(&fail()), Health::Healthy);
        assert_eq!(t.record(&fail()), Health::Unhealthy);
        assert_eq!(t.health(), Health::Unhealthy);
        assert_eq!(t.last(), Some(&fail()));

        assert_eq!(t.record(&pass()), Health::Unhealthy);
        assert_eq!(t.record(&pass()), Health::Healthy);

        t.reset();
        assert_eq!(t.health(), Health::Starting);
        assert_eq!(t.last(), None);
    }

    #[test]
    fn tracker_with_default_thresholds() {
        let c = HealthCheck {
            kind: Some("tcp".into()),
            address: Some("127.0.0.1:80".into()),
            ..HealthCheck::default()
        }
        .resolve("")
        .unwrap();
        let mut t = HealthTracker::new(&c);
        assert_eq!(t.record(&fail()), Health::Starting);
        assert_eq!(t.record(&fail()), Health::Unhealthy);
        assert_eq!(t.record(&pass()), Health::Healthy);
    }

    fn parse(toml_text: &str) -> HealthCheck {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn resolve_applies_defaults() {
        let c = parse("type = \"http\"\nurl = \"http://127.0.0.1:8080/health\"")
            .resolve("service.api.health")
            .unwrap();
        assert_eq!(
            c,
            ResolvedCheck {
                kind: http("http://127.0.0.1:8080/health"),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                healthy_threshold: 1,
                unhealthy_threshold: 2,
            }
        );

        let c = parse(
            r#"
            type = "exec"
            command = ["/usr/local/bin/check", "{release}"]
            interval = "500ms"
            timeout = "1m30s"
            healthy_threshold = 3
            unhealthy_threshold = 5
            "#,
        )
        .resolve("service.api.health")
        .unwrap();
        assert_eq!(c.kind, exec(&["/usr/local/bin/check", "{release}"]));
        assert_eq!(c.interval, Duration::from_millis(500));
        assert_eq!(c.timeout, Duration::from_secs(90));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold), (3, 5));
    }

    #[test]
    fn resolve_errors_name_the_field() {
        let cases = [
            (
                "url = \"http://x/\"",
                r#"service.api.health.type: is required (one of "http", "tcp", "exec")"#,
            ),
            (
                "type = \"grpc\"",
                r#"service.api.health.type: "grpc" is not a check type (one of "http", "tcp", "exec")"#,
            ),
            (
                "type = \"http\"",
                r#"service.api.health.url: is required for type = "http""#,
            ),
            (
                "type = \"http\"\nurl = \"ftp://x/\"",
                r#"service.api.health.url: "ftp://x/" must start with http:// or https://"#,
            ),
            (
                "type = \"http\"\nurl = \"not a url\"",
                r#"service.api.health.url: "not a url" is not a URL"#,
            ),
            (
                "type = \"tcp\"",
                r#"service.api.health.address: is required for type = "tcp""#,
            ),
            (
                "type = \"tcp\"\naddress = \"localhost\"",
                r#"service.api.health.address: "localhost" is not a host:port address"#,
            ),
            (
                "type = \"tcp\"\naddress = \"127.0.0.1:80\"\nurl = \"http://x/\"",
                r#"service.api.health.url: is not used by type = "tcp""#,
            ),
            (
                "type = \"exec\"",
                r#"service.api.health.command: is required for type = "exec""#,
            ),
            (
                "type = \"exec\"\ncommand = []",
                "service.api.health.command: must name a program to run",
            ),
            (
                "type = \"tcp\"\naddress = \"127.0.0.1:80\"\ninterval = \"often\"",
                r#"service.api.health.interval: "often" is not a duration"#,
            ),
            (
                "type = \"tcp\"\naddress = \"127.0.0.1:80\"\ntimeout = \"0s\"",
                "service.api.health.timeout: must be longer than zero",
            ),
            (
                "type = \"tcp\"\naddress = \"127.0.0.1:80\"\nhealthy_threshold = 0",
                "service.api.health.healthy_threshold: must be at least 1",
            ),
            (
                "type = \"tcp\"\naddress = \"127.0.0.1:80\"\nunhealthy_threshold = 0",
                "service.api.health.unhealthy_threshold: must be at least 1",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).resolve("service.api.health").unwrap_err();
            assert!(
                err.to_string().starts_with(expected),
                "{text:?}: got {err}, expected {expected}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            toml::from_str::<HealthCheck>("type = \"http\"\nurl = \"http://x/\"\npath = \"/\"")
                .unwrap_err();
        assert!(err.to_string().contains("unknown field `path`"), "{err}");
    }
}
