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
//!   `exit status 3: database unreachable`,
//!   `GET http://127.0.0.1:8080/version: field "version" is "1.0.0", expected "2.0.0"`).
//!
//! An `http` check may read the answer too (`expect_status`, `expect_body`,
//! `expect_json`): a node that answers 200 while still running the old code
//! must fail its gate, and only the body can tell.
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
use serde_json::Value as Json;
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
/// How much of a body `expect_body` and `expect_json` read: a health or
/// version endpoint answers far less, and a check must not buffer whatever
/// a broken service streams at it.
pub(crate) const BODY_LIMIT: usize = 64 * 1024;
/// Stands for the version of the release the checked process runs, in
/// `expect_body` and `expect_json.equals`.
pub const VERSION_PLACEHOLDER: &str = "{version}";

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
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `"http"`, `"tcp"` or `"exec"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// For `http`: the URL to GET; any 2xx passes, unless `expect_status`
    /// says which.
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
    /// For `http`: the statuses that pass, `200` or `[200, 204]` (default
    /// any 2xx). Any TOML value, so a wrong type is named by field.
    pub expect_status: Option<toml::Value>,
    /// For `http`: text the body must contain.
    pub expect_body: Option<String>,
    /// For `http`: a field of the JSON body and the value it must have.
    pub expect_json: Option<ExpectJsonFile>,
}

/// `expect_json = { field = "build.version", equals = "{version}" }`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectJsonFile {
    /// A dotted path into the body: `version`, `build.version`,
    /// `members.0.name` (a number indexes an array).
    pub field: Option<String>,
    /// The value the field must have: a string compared as is, a number or
    /// boolean by its JSON text.
    pub equals: Option<toml::Value>,
}

/// What an `http` check requires of the answer besides its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpExpect {
    /// The statuses that pass; `None` for any 2xx.
    pub status: Option<Vec<u16>>,
    /// Text the body must contain.
    pub body: Option<String>,
    pub json: Option<ExpectJson>,
}

impl HttpExpect {
    fn reads_body(&self) -> bool {
        self.body.is_some() || self.json.is_some()
    }
}

/// A field of the JSON body and the value it must have, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectJson {
    pub field: String,
    pub equals: String,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Http { url: String, expect: HttpExpect },
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
                    expect: self.expect(&err)?,
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
        if !matches!(kind, CheckKind::Http { .. }) {
            for (name, set) in [
                ("expect_status", self.expect_status.is_some()),
                ("expect_body", self.expect_body.is_some()),
                ("expect_json", self.expect_json.is_some()),
            ] {
                if set {
                    return Err(err(
                        name,
                        format!(
                            "is not used by type = {:?} (only http checks read an answer)",
                            kind.name()
                        ),
                    ));
                }
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

impl HealthCheck {
    /// `expect_status`, `expect_body` and `expect_json`, validated.
    fn expect(&self, err: &impl Fn(&str, String) -> SpecError) -> Result<HttpExpect, SpecError> {
        let status = match &self.expect_status {
            None => None,
            Some(value) => Some(statuses(value).map_err(|m| err("expect_status", m))?),
        };
        let body = match &self.expect_body {
            Some(b) if b.is_empty() => {
                return Err(err(
                    "expect_body",
                    "is empty, which every body contains; give the text to look for".to_owned(),
                ))
            }
            other => other.clone(),
        };
        let json = match &self.expect_json {
            None => None,
            Some(j) => {
                let field = j.field.as_deref().ok_or_else(|| {
                    err(
                        "expect_json.field",
                        r#"is required (a dotted path like "build.version")"#.to_owned(),
                    )
                })?;
                check_field_path(field).map_err(|m| err("expect_json.field", m))?;
                let equals = match &j.equals {
                    None => {
                        return Err(err(
                            "expect_json.equals",
                            r#"is required (the value the field must have, like "{version}")"#
                                .to_owned(),
                        ))
                    }
                    Some(toml::Value::String(s)) => s.clone(),
                    Some(
                        v @ (toml::Value::Integer(_)
                        | toml::Value::Float(_)
                        | toml::Value::Boolean(_)),
                    ) => v.to_string(),
                    Some(other) => {
                        return Err(err(
                            "expect_json.equals",
                            format!("{other} is not a string, number or boolean to compare with"),
                        ))
                    }
                };
                Some(ExpectJson {
                    field: field.to_owned(),
                    equals,
                })
            }
        };
        Ok(HttpExpect { status, body, json })
    }
}

/// `200` or `[200, 204]`.
fn statuses(value: &toml::Value) -> Result<Vec<u16>, String> {
    let one = |v: &toml::Value| match v {
        toml::Value::Integer(n) => u16::try_from(*n)
            .ok()
            .filter(|n| (100..=599).contains(n))
            .ok_or_else(|| format!("{n} is not an HTTP status (100 to 599)")),
        other => Err(format!(
            "{other} is not a status like 200 or a list like [200, 204]"
        )),
    };
    match value {
        toml::Value::Array(list) if list.is_empty() => {
            Err("is an empty list; give one status or more, like [200, 204]".to_owned())
        }
        toml::Value::Array(list) => list.iter().map(one).collect(),
        v => one(v).map(|s| vec![s]),
    }
}

/// A field path is dot-separated names or array indexes, none empty.
pub(crate) fn check_field_path(path: &str) -> Result<(), String> {
    if path.split('.').any(str::is_empty) {
        return Err(format!(
            r#"{path:?} is not a field path like "version", "build.version" or "members.0.name""#
        ));
    }
    Ok(())
}

/// The value at `path` (see [`check_field_path`]) in `value`; the error
/// says which part is missing.
pub(crate) fn lookup<'a>(value: &'a Json, path: &str) -> Result<&'a Json, String> {
    let mut at = value;
    let mut seen = 0;
    for part in path.split('.') {
        let next = match at {
            Json::Object(map) => map.get(part),
            Json::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        at = match next {
            Some(v) => v,
            None => {
                let what = match at {
                    Json::Object(_) | Json::Array(_) => {
                        return Err(format!("field {path:?} is missing"))
                    }
                    Json::String(_) => "a string",
                    Json::Number(_) => "a number",
                    Json::Bool(_) => "a boolean",
                    Json::Null => "null",
                };
                let parent = match seen {
                    0 => "the body".to_owned(),
                    n => format!("{:?}", &path[..n - 1]),
                };
                return Err(format!("field {path:?} is missing ({parent} is {what})"));
            }
        };
        seen += part.len() + 1;
    }
    Ok(at)
}

/// How `expect_json.equals` sees a value: a string as is, anything else as
/// its JSON text (`3`, `true`, `null`).
fn json_text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON value shown in a detail: its JSON text, on one line and short.
fn shown(value: &Json) -> String {
    let text = value.to_string();
    if text.chars().count() > LINE_MAX {
        let cut: String = text.chars().take(LINE_MAX).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// `200`, `200 or 204`, `200, 201 or 204`.
fn status_list(list: &[u16]) -> String {
    let text: Vec<String> = list.iter().map(u16::to_string).collect();
    match text.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => text.join(""),
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

impl ResolvedCheck {
    /// The check of a process running `version`: [`VERSION_PLACEHOLDER`]
    /// in `expect_body` and `expect_json.equals` becomes that version, so a
    /// process that answers with another version fails.
    pub fn for_version(&self, version: &str) -> ResolvedCheck {
        let mut c = self.clone();
        if let CheckKind::Http { expect, .. } = &mut c.kind {
            if let Some(body) = &mut expect.body {
                *body = body.replace(VERSION_PLACEHOLDER, version);
            }
            if let Some(json) = &mut expect.json {
                json.equals = json.equals.replace(VERSION_PLACEHOLDER, version);
            }
        }
        c
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
    let timed_out = || CheckResult::fail(timed_out(check.timeout));
    match &check.kind {
        CheckKind::Http { url, expect } => {
            tokio::time::timeout(check.timeout, http_check(client, url, expect))
                .await
                .unwrap_or_else(|_| timed_out())
        }
        CheckKind::Tcp { address } => tokio::time::timeout(check.timeout, tcp_check(address))
            .await
            .unwrap_or_else(|_| timed_out()),
        CheckKind::Exec { command } => exec_check(command, check.timeout)
            .await
            .unwrap_or_else(timed_out),
    }
}

/// `timed out after 2s`.
pub(crate) fn timed_out(timeout: Duration) -> String {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    format!("timed out after {}", format_duration(ms))
}

async fn http_check(client: &reqwest::Client, url: &str, expect: &HttpExpect) -> CheckResult {
    let mut response = match client.get(url).send().await {
        Ok(response) => response,
        Err(e) => return CheckResult::fail(describe_request_error(url, &e)),
    };
    let status = response.status();
    let code = status.as_u16();
    let passes = match &expect.status {
        Some(list) => list.contains(&code),
        None => status.is_success(),
    };
    if passes && !expect.reads_body() {
        return CheckResult::pass(format!("http {code}"));
    }
    if !passes {
        let mut detail = format!("http {code} from {url}");
        if let Some(list) = &expect.status {
            detail.push_str(&format!(", expected {}", status_list(list)));
        }
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
        return CheckResult::fail(detail);
    }
    let (body, complete) = match read_body(&mut response, BODY_LIMIT).await {
        Ok(read) => read,
        Err(e) => {
            return CheckResult::fail(format!("GET {url}: reading the body: {}", error_chain(&e)))
        }
    };
    let mut detail = format!("http {code}");
    if let Some(want) = &expect.body {
        if !want.is_empty() && !body.windows(want.len()).any(|w| w == want.as_bytes()) {
            let within = if complete {
                ""
            } else {
                " (in its first 64KiB)"
            };
            return CheckResult::fail(format!("GET {url}: body does not contain {want:?}{within}"));
        }
    }
    if let Some(json) = &expect.json {
        if !complete {
            return CheckResult::fail(format!(
                "GET {url}: body is over 64KiB, more than expect_json reads"
            ));
        }
        let value: Json = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                let start = one_line(&String::from_utf8_lossy(
                    &body[..body.len().min(BODY_PREFIX)],
                ));
                return CheckResult::fail(format!("GET {url}: body is not JSON ({e}): {start}"));
            }
        };
        let found = match lookup(&value, &json.field) {
            Ok(v) => v,
            Err(e) => return CheckResult::fail(format!("GET {url}: {e}")),
        };
        if json_text(found) != json.equals {
            return CheckResult::fail(format!(
                "GET {url}: field {:?} is {}, expected {:?}",
                json.field,
                shown(found),
                json.equals
            ));
        }
        detail.push_str(&format!(", field {:?} is {}", json.field, shown(found)));
    }
    CheckResult::pass(detail)
}

/// The body, up to `limit` bytes, and whether that was all of it.
pub(crate) async fn read_body(
    response: &mut reqwest::Response,
    limit: usize,
) -> reqwest::Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            body.truncate(limit);
            return Ok((body, false));
        }
    }
    Ok((body, true))
}

/// The first [`BODY_PREFIX`] bytes of the body, on one line.
pub(crate) async fn body_prefix(response: &mut reqwest::Response) -> String {
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

pub(crate) fn describe_request_error(url: &str, e: &reqwest::Error) -> String {
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

/// Runs an exec check; `None` if it timed out.
async fn exec_check(command: &[String], timeout: Duration) -> Option<CheckResult> {
    Some(match run_command(command, &[], timeout).await? {
        Err(why) => CheckResult::fail(why),
        Ok(ran) => CheckResult {
            ok: ran.status.success(),
            detail: ran.describe(),
        },
    })
}

/// What a command run by [`run_command`] did: its exit status and the last
/// [`OUTPUT_TAIL`] bytes of each output.
pub(crate) struct Ran {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Ran {
    /// `exit status 0`, or for a failure the status and the last line of
    /// its output: `exit status 3: database unreachable`.
    pub fn describe(&self) -> String {
        let status = self.status;
        let mut detail = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(s) => format!("killed by signal {s}"),
                Err(_) => format!("killed by signal {signal}"),
            },
            (None, None) => status.to_string(),
        };
        if !status.success() {
            if let Some(line) = last_line(&self.stderr).or_else(|| last_line(&self.stdout)) {
                detail.push_str(": ");
                detail.push_str(&line);
            }
        }
        detail
    }
}

/// Runs `command` (with `env` added) in its own process group; `None` if it
/// timed out (the group has then been killed), `Some(Err)` with a one-line
/// reason if it could not run.
pub(crate) async fn run_command(
    command: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Option<Result<Ran, String>> {
    let Some((program, args)) = command.split_first() else {
        return Some(Err("empty command".to_owned()));
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so a timeout can kill the script and its children.
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Some(Err(format!("starting {program}: {}", describe_io(&e)))),
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
    Some(match status {
        Ok(status) => Ok(Ran {
            status,
            stdout,
            stderr,
        }),
        Err(e) => Err(format!("waiting for {program}: {}", describe_io(&e))),
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

pub(crate) fn one_line(text: &str) -> String {
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
        http_expecting(url, HttpExpect::default())
    }

    fn http_expecting(url: &str, expect: HttpExpect) -> CheckKind {
        CheckKind::Http {
            url: url.to_owned(),
            expect,
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

    fn ok(body: &str) -> &'static str {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .leak()
    }

    fn expecting_json(field: &str, equals: &str) -> HttpExpect {
        HttpExpect {
            json: Some(ExpectJson {
                field: field.into(),
                equals: equals.into(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn http_check_expects_statuses() {
        let expect = |list: &[u16]| HttpExpect {
            status: Some(list.to_vec()),
            ..Default::default()
        };
        let addr = serve(Some(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\n\r\ndraining",
        ))
        .await;
        let url = format!("http://{addr}/health");
        let r = run(http_expecting(&url, expect(&[200])), LONG).await;
        assert_eq!(
            r,
            CheckResult::fail(format!("http 503 from {url}, expected 200: draining"))
        );
        let r = run(http_expecting(&url, expect(&[200, 204])), LONG).await;
        assert_eq!(
            r,
            CheckResult::fail(format!(
                "http 503 from {url}, expected 200 or 204: draining"
            ))
        );
        // A status outside 2xx may be what the service is expected to say.
        let r = run(http_expecting(&url, expect(&[200, 429, 503])), LONG).await;
        assert_eq!(r, CheckResult::pass("http 503"));

        let addr = serve(Some("HTTP/1.1 204 No Content\r\n\r\n")).await;
        let url = format!("http://{addr}/health");
        let r = run(http_expecting(&url, expect(&[200])), LONG).await;
        assert_eq!(
            r,
            CheckResult::fail(format!("http 204 from {url}, expected 200"))
        );
    }

    #[tokio::test]
    async fn http_check_expects_a_body() {
        let addr = serve(Some(ok("status: ok, version 2.0.0\n"))).await;
        let url = format!("http://{addr}/health");
        let body = |text: &str| HttpExpect {
            body: Some(text.into()),
            ..Default::default()
        };
        assert_eq!(
            run(http_expecting(&url, body("ok")), LONG).await,
            CheckResult::pass("http 200")
        );
        assert_eq!(
            run(http_expecting(&url, body("ready")), LONG).await,
            CheckResult::fail(format!("GET {url}: body does not contain \"ready\""))
        );
        // {version} is the version of the process checked.
        let c = check(http_expecting(&url, body("version {version}")), LONG);
        let client = check_client().unwrap();
        assert!(run_check(&c.for_version("2.0.0"), &client).await.ok);
        assert_eq!(
            run_check(&c.for_version("1.0.0"), &client).await,
            CheckResult::fail(format!(
                "GET {url}: body does not contain \"version 1.0.0\""
            ))
        );
    }

    #[tokio::test]
    async fn http_check_reads_at_most_64kib() {
        let big: &'static str = ok(&format!("{}needle", "x".repeat(BODY_LIMIT)));
        let addr = serve(Some(big)).await;
        let url = format!("http://{addr}/health");
        let expect = HttpExpect {
            body: Some("needle".into()),
            ..Default::default()
        };
        assert_eq!(
            run(http_expecting(&url, expect), LONG).await,
            CheckResult::fail(format!(
                "GET {url}: body does not contain \"needle\" (in its first 64KiB)"
            ))
        );
        assert_eq!(
            run(http_expecting(&url, expecting_json("version", "1")), LONG).await,
            CheckResult::fail(format!(
                "GET {url}: body is over 64KiB, more than expect_json reads"
            ))
        );
    }

    #[tokio::test]
    async fn http_check_expects_a_json_field() {
        let body = r#"{"version": "1.0.0", "build": {"number": 42, "release": true},
            "members": [{"name": "a"}, {"name": "b"}], "note": null}"#;
        let addr = serve(Some(ok(body))).await;
        let url = format!("http://{addr}/version");
        let json = |field: &str, equals: &str| {
            run(http_expecting(&url, expecting_json(field, equals)), LONG)
        };
        assert_eq!(
            json("version", "1.0.0").await,
            CheckResult::pass("http 200, field \"version\" is \"1.0.0\"")
        );
        assert_eq!(
            json("version", "2.0.0").await,
            CheckResult::fail(format!(
                "GET {url}: field \"version\" is \"1.0.0\", expected \"2.0.0\""
            ))
        );
        // Numbers and booleans compare by their JSON text.
        assert!(json("build.number", "42").await.ok);
        assert!(json("build.release", "true").await.ok);
        assert!(json("note", "null").await.ok);
        assert_eq!(
            json("build.number", "43").await,
            CheckResult::fail(format!(
                "GET {url}: field \"build.number\" is 42, expected \"43\""
            ))
        );
        assert!(json("members.1.name", "b").await.ok);
        assert_eq!(
            json("members.2.name", "c").await,
            CheckResult::fail(format!("GET {url}: field \"members.2.name\" is missing"))
        );
        assert_eq!(
            json("build.number.high", "1").await,
            CheckResult::fail(format!(
                "GET {url}: field \"build.number.high\" is missing (\"build.number\" is a number)"
            ))
        );

        // {version} is the version of the process checked: a process that
        // answers with the old version fails.
        let c = check(
            http_expecting(&url, expecting_json("version", "{version}")),
            LONG,
        );
        let client = check_client().unwrap();
        assert!(run_check(&c.for_version("1.0.0"), &client).await.ok);
        assert_eq!(
            run_check(&c.for_version("2.0.0"), &client).await,
            CheckResult::fail(format!(
                "GET {url}: field \"version\" is \"1.0.0\", expected \"2.0.0\""
            ))
        );

        let addr = serve(Some(ok("<html>ok</html>"))).await;
        let url = format!("http://{addr}/version");
        let r = run(http_expecting(&url, expecting_json("version", "1")), LONG).await;
        assert!(!r.ok);
        assert!(
            r.detail
                .starts_with(&format!("GET {url}: body is not JSON (")),
            "{}",
            r.detail
        );
        assert!(r.detail.ends_with("): <html>ok</html>"), "{}", r.detail);
    }

    #[test]
    fn looks_up_dotted_paths() {
        let v: Json =
            serde_json::from_str(r#"{"a": {"b": [10, {"c": "deep"}]}, "s": "text", "x.y": 1}"#)
                .unwrap();
        assert_eq!(lookup(&v, "a.b.0"), Ok(&Json::from(10)));
        assert_eq!(lookup(&v, "a.b.1.c"), Ok(&Json::from("deep")));
        assert_eq!(lookup(&v, "s"), Ok(&Json::from("text")));
        assert_eq!(
            lookup(&v, "a.b.2"),
            Err("field \"a.b.2\" is missing".into())
        );
        assert_eq!(
            lookup(&v, "a.b.x"),
            Err("field \"a.b.x\" is missing".into())
        );
        assert_eq!(lookup(&v, "nope"), Err("field \"nope\" is missing".into()));
        assert_eq!(
            lookup(&v, "s.len"),
            Err("field \"s.len\" is missing (\"s\" is a string)".into())
        );
        // A name with a dot in it cannot be reached: the dot separates.
        assert!(lookup(&v, "x.y").is_err());
        let scalar = Json::from(3);
        assert_eq!(
            lookup(&scalar, "version"),
            Err("field \"version\" is missing (the body is a number)".into())
        );
        for bad in ["", ".a", "a.", "a..b"] {
            assert!(check_field_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_field_path("members.0.name").is_ok());
    }

    #[test]
    fn resolves_what_an_http_check_expects() {
        let c = parse(
            r#"
            type = "http"
            url = "http://127.0.0.1:8080/version"
            expect_status = [200, 204]
            expect_body = "ok"
            expect_json = { field = "build.version", equals = "{version}" }
            "#,
        )
        .resolve("service.api.health")
        .unwrap();
        assert_eq!(
            c.kind,
            http_expecting(
                "http://127.0.0.1:8080/version",
                HttpExpect {
                    status: Some(vec![200, 204]),
                    body: Some("ok".into()),
                    json: Some(ExpectJson {
                        field: "build.version".into(),
                        equals: "{version}".into()
                    }),
                }
            )
        );
        let c = c.for_version("2.0.0");
        let CheckKind::Http { expect, .. } = &c.kind else {
            panic!("{c:?}")
        };
        assert_eq!(expect.json.as_ref().unwrap().equals, "2.0.0");

        let one = |extra: &str| {
            parse(&format!("type = \"http\"\nurl = \"http://x/\"\n{extra}"))
                .resolve("service.api.health")
                .unwrap()
                .kind
        };
        let CheckKind::Http { expect, .. } = one("expect_status = 204") else {
            panic!()
        };
        assert_eq!(expect.status, Some(vec![204]));
        for (equals, text) in [("3", "3"), ("true", "true"), ("1.5", "1.5")] {
            let CheckKind::Http { expect, .. } = one(&format!(
                "expect_json = {{ field = \"n\", equals = {equals} }}"
            )) else {
                panic!()
            };
            assert_eq!(expect.json.unwrap().equals, text);
        }
    }

    #[test]
    fn expectation_errors_name_the_field() {
        let http = "type = \"http\"\nurl = \"http://x/\"\n";
        let cases = [
            (
                format!("{http}expect_status = 600"),
                "service.api.health.expect_status: 600 is not an HTTP status (100 to 599)",
            ),
            (
                format!("{http}expect_status = [200, 99]"),
                "service.api.health.expect_status: 99 is not an HTTP status (100 to 599)",
            ),
            (
                format!("{http}expect_status = -1"),
                "service.api.health.expect_status: -1 is not an HTTP status (100 to 599)",
            ),
            (
                format!("{http}expect_status = \"200\""),
                r#"service.api.health.expect_status: "200" is not a status like 200 or a list like [200, 204]"#,
            ),
            (
                format!("{http}expect_status = []"),
                "service.api.health.expect_status: is an empty list",
            ),
            (
                format!("{http}expect_body = \"\""),
                "service.api.health.expect_body: is empty",
            ),
            (
                format!("{http}expect_json = {{ equals = \"1\" }}"),
                r#"service.api.health.expect_json.field: is required (a dotted path like "build.version")"#,
            ),
            (
                format!("{http}expect_json = {{ field = \"a..b\", equals = \"1\" }}"),
                r#"service.api.health.expect_json.field: "a..b" is not a field path"#,
            ),
            (
                format!("{http}expect_json = {{ field = \"version\" }}"),
                "service.api.health.expect_json.equals: is required",
            ),
            (
                format!("{http}expect_json = {{ field = \"version\", equals = [1] }}"),
                "service.api.health.expect_json.equals: [1] is not a string, number or boolean",
            ),
            (
                "type = \"tcp\"\naddress = \"127.0.0.1:80\"\nexpect_status = 200".to_string(),
                r#"service.api.health.expect_status: is not used by type = "tcp" (only http checks read an answer)"#,
            ),
            (
                "type = \"exec\"\ncommand = [\"true\"]\nexpect_body = \"ok\"".to_string(),
                r#"service.api.health.expect_body: is not used by type = "exec""#,
            ),
            (
                "type = \"exec\"\ncommand = [\"true\"]\nexpect_json = { field = \"a\", equals = \"b\" }"
                    .to_string(),
                r#"service.api.health.expect_json: is not used by type = "exec""#,
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).resolve("service.api.health").unwrap_err();
            assert!(
                err.to_string().starts_with(expected),
                "{text:?}: got {err}, expected {expected}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        let err = toml::from_str::<HealthCheck>(&format!(
            "{http}expect_json = {{ field = \"a\", equals = \"b\", path = \"c\" }}"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `path`"), "{err}");
    }
}
