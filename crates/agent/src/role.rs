//! Role probes: what a running service says it is (`leader`, `follower`,
//! `primary`), asked every interval and reported to the control plane with
//! the service's state, so a rollout can switch the leader last.
//!
//! A probe is an HTTP GET (the body, or one field of it as JSON) or a
//! command (its trimmed stdout). The answer must be a role word: 1 to 32
//! characters of `a-z`, `0-9`, `_` and `-` once lowercased. Anything else is
//! not taken as a role, and the reason is reported instead
//! (`answered "I am the leader!" which is not a role word ...`), because an
//! order built on a misread role would be worse than none.
//!
//! [`RoleProbe`] is the configuration as written; [`RoleProbe::resolve`]
//! validates it into a [`ResolvedProbe`] with errors that name the field.

use std::sync::Arc;
use std::time::Duration;

use rollwave_core::{format_duration, parse_duration, SpecError};
use serde::Deserialize;
use serde_json::Value as Json;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::health::{
    body_prefix, check_field_path, describe_request_error, lookup, one_line, read_body,
    run_command, timed_out, BODY_LIMIT,
};
use crate::supervisor::Status;

pub const DEFAULT_INTERVAL: &str = "2s";
pub const DEFAULT_TIMEOUT: &str = "1s";
/// Probing faster would cost the service more than a fresher role is worth:
/// the control plane reads roles once per wave.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// How many characters of an answer that is not a role word are shown.
const ANSWER_SHOWN: usize = 64;
const ROLE_MAX: usize = 32;
const ROLE_WORD: &str = "1-32 letters, digits, _ or -";

/// A role probe as written in the agent configuration, e.g.
///
/// ```toml
/// role = { type = "http", url = "http://127.0.0.1:2379/status", json_field = "role" }
/// role = { type = "exec", command = ["/usr/local/bin/role"], interval = "5s" }
/// ```
///
/// Flat, like [`crate::health::HealthCheck`], for the same reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleProbe {
    /// `"http"` or `"exec"`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// For `http`: the URL to GET.
    pub url: Option<String>,
    /// For `http`: a dotted path into the JSON body whose string is the
    /// role; without it the whole body, trimmed, is.
    pub json_field: Option<String>,
    /// For `exec`: program and arguments; its trimmed stdout is the role.
    pub command: Option<Vec<String>>,
    /// Time between probes (default 2s).
    pub interval: Option<String>,
    /// Time after which a probe fails (default 1s).
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    Http {
        url: String,
        json_field: Option<String>,
    },
    Exec {
        command: Vec<String>,
    },
}

/// A validated role probe, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedProbe {
    pub kind: ProbeKind,
    pub interval: Duration,
    pub timeout: Duration,
}

impl RoleProbe {
    /// Validates the probe and applies defaults. Errors name the field with
    /// `field_prefix` in front, e.g. `service.etcd.role.url: ...`.
    pub fn resolve(&self, field_prefix: &str) -> Result<ResolvedProbe, SpecError> {
        let field = |name: &str| format!("{field_prefix}.{name}");
        let err = |name: &str, message: String| SpecError::new(field(name), message);
        let required = |name: &str, set: bool, kind: &str| {
            if set {
                Ok(())
            } else {
                Err(err(name, format!("is required for type = {kind:?}")))
            }
        };
        let unused = |name: &str, set: bool, kind: &str| {
            if set {
                Err(err(name, format!("is not used by type = {kind:?}")))
            } else {
                Ok(())
            }
        };
        let kind = match self.kind.as_deref() {
            None => {
                return Err(err(
                    "type",
                    r#"is required (one of "http", "exec")"#.to_owned(),
                ))
            }
            Some("http") => {
                required("url", self.url.is_some(), "http")?;
                unused("command", self.command.is_some(), "http")?;
                let url = self.url.clone().unwrap_or_default();
                let parsed = reqwest::Url::parse(&url)
                    .map_err(|e| err("url", format!("{url:?} is not a URL: {e}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(err(
                        "url",
                        format!("{url:?} must start with http:// or https://"),
                    ));
                }
                if let Some(path) = &self.json_field {
                    check_field_path(path).map_err(|m| err("json_field", m))?;
                }
                ProbeKind::Http {
                    url,
                    json_field: self.json_field.clone(),
                }
            }
            Some("exec") => {
                required("command", self.command.is_some(), "exec")?;
                unused("url", self.url.is_some(), "exec")?;
                unused("json_field", self.json_field.is_some(), "exec")?;
                let command = self.command.clone().unwrap_or_default();
                if command.first().is_none_or(String::is_empty) {
                    return Err(err(
                        "command",
                        r#"must name a program to run, like ["/usr/local/bin/role"]"#.to_owned(),
                    ));
                }
                ProbeKind::Exec { command }
            }
            Some(other) => {
                return Err(err(
                    "type",
                    format!(r#"{other:?} is not a role probe type (one of "http", "exec")"#),
                ))
            }
        };
        let duration = |name: &str, value: &Option<String>, default: &str| {
            let ms = parse_duration(&field(name), value.as_deref().unwrap_or(default))?;
            Ok::<_, SpecError>(Duration::from_millis(ms))
        };
        let interval = duration("interval", &self.interval, DEFAULT_INTERVAL)?;
        if interval < MIN_INTERVAL {
            return Err(err(
                "interval",
                format!(
                    "{} is shorter than the shortest interval, 100ms",
                    format_duration(interval.as_millis() as u64)
                ),
            ));
        }
        let timeout = duration("timeout", &self.timeout, DEFAULT_TIMEOUT)?;
        if timeout.is_zero() {
            return Err(err("timeout", "must be longer than zero".to_owned()));
        }
        // One probe at a time: a probe that could outlast the interval
        // would make the role older than the interval promises.
        if timeout > interval {
            return Err(err(
                "timeout",
                format!(
                    "{} is longer than the interval, {}; a probe must end before the next is due",
                    format_duration(timeout.as_millis() as u64),
                    format_duration(interval.as_millis() as u64)
                ),
            ));
        }
        Ok(ResolvedProbe {
            kind,
            interval,
            timeout,
        })
    }
}

/// What a service's role probe found, as reported in its `ServiceView`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleStatus {
    /// The last role word the probe answered while the service runs.
    pub role: Option<String>,
    /// Why the last probe gave no role; `None` once one does.
    pub error: Option<String>,
}

/// The role word in `answer`: trimmed and lowercased, 1 to 32 characters of
/// `a-z`, `0-9`, `_` and `-`.
pub fn role_word(answer: &str) -> Result<String, String> {
    let word = answer.trim().to_lowercase();
    let valid = (1..=ROLE_MAX).contains(&word.len())
        && word
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if valid {
        return Ok(word);
    }
    let trimmed = answer.trim();
    let mut shown: String = trimmed.chars().take(ANSWER_SHOWN).collect();
    let cut = if shown.len() < trimmed.len() {
        "..."
    } else {
        ""
    };
    // Debug quoting keeps a newline or a control character on the line.
    shown = format!("{shown:?}");
    Err(format!(
        "answered {shown}{cut} which is not a role word ({ROLE_WORD})"
    ))
}

/// Who is asking, for an exec probe's environment: the same variables the
/// service itself gets.
pub struct ProbeEnv<'a> {
    pub node: &'a str,
    pub service: &'a str,
    pub version: &'a str,
}

/// Runs one probe, bounded by its timeout: the role word, or why there is
/// none, in one line.
pub async fn probe(
    p: &ResolvedProbe,
    client: &reqwest::Client,
    env: &ProbeEnv<'_>,
) -> Result<String, String> {
    match &p.kind {
        ProbeKind::Http { url, json_field } => {
            tokio::time::timeout(p.timeout, http_probe(client, url, json_field.as_deref()))
                .await
                .unwrap_or_else(|_| Err(timed_out(p.timeout)))
        }
        ProbeKind::Exec { command } => {
            let vars = [
                ("ROLLWAVE_NODE", env.node),
                ("ROLLWAVE_SERVICE", env.service),
                ("ROLLWAVE_VERSION", env.version),
            ];
            match run_command(command, &vars, p.timeout).await {
                None => Err(timed_out(p.timeout)),
                Some(Err(why)) => Err(why),
                Some(Ok(ran)) if !ran.status.success() => Err(ran.describe()),
                Some(Ok(ran)) => role_word(&String::from_utf8_lossy(&ran.stdout)),
            }
        }
    }
}

async fn http_probe(
    client: &reqwest::Client,
    url: &str,
    json_field: Option<&str>,
) -> Result<String, String> {
    let mut response = client
        .get(url)
        .send()
        .await
        .map_err(|e| describe_request_error(url, &e))?;
    let status = response.status();
    if !status.is_success() {
        let body = body_prefix(&mut response).await;
        let sep = if body.is_empty() { "" } else { ": " };
        return Err(format!("http {} from {url}{sep}{body}", status.as_u16()));
    }
    let (body, complete) = read_body(&mut response, BODY_LIMIT).await.map_err(|e| {
        format!(
            "GET {url}: reading the body: {}",
            rollwave_core::error_chain(&e)
        )
    })?;
    let Some(path) = json_field else {
        return role_word(&String::from_utf8_lossy(&body)).map_err(|e| format!("GET {url}: {e}"));
    };
    if !complete {
        return Err(format!(
            "GET {url}: body is over 64KiB, more than a role probe reads"
        ));
    }
    let value: Json = serde_json::from_slice(&body).map_err(|e| {
        let start = one_line(&String::from_utf8_lossy(&body[..body.len().min(200)]));
        format!("GET {url}: body is not JSON ({e}): {start}")
    })?;
    match lookup(&value, path).map_err(|e| format!("GET {url}: {e}"))? {
        Json::String(s) => role_word(s).map_err(|e| format!("GET {url}: field {path:?} {e}")),
        other => Err(format!(
            "GET {url}: field {path:?} is {other}, which is not a role word ({ROLE_WORD})"
        )),
    }
}

/// Probes the service every interval while it runs, publishing what it
/// finds in `out` and waking `changed` (the session sends a status) when
/// that changes. Returns once nothing reads `out` any more or the
/// supervisor is gone.
///
/// A stopped service has no role: it is cleared at once. A failed probe
/// keeps the last role beside the error, as the service may well still be
/// what it last said. A new process (a restart, a switch) is probed at
/// once rather than at the next interval: a switch is exactly when a
/// leader may have handed over.
pub async fn watch(
    probe_config: ResolvedProbe,
    node: String,
    service: String,
    client: reqwest::Client,
    mut status: watch::Receiver<Status>,
    out: watch::Sender<RoleStatus>,
    changed: Arc<Notify>,
) {
    let publish = |next: RoleStatus| {
        let was = out.borrow().clone();
        if was == next {
            return;
        }
        if next.role != was.role {
            tracing::info!(service = %service, role = ?next.role, was = ?was.role, "role changed");
        }
        if let Some(e) = next
            .error
            .as_ref()
            .filter(|e| was.error.as_ref() != Some(*e))
        {
            tracing::warn!(service = %service, error = %e, "role probe failed");
        }
        out.send_replace(next);
        changed.notify_one();
    };
    loop {
        let (pid, version) = {
            let s = status.borrow_and_update();
            (s.pid, s.version.clone().unwrap_or_default())
        };
        let Some(pid) = pid else {
            publish(RoleStatus::default());
            tokio::select! {
                r = status.changed() => if r.is_err() { return },
                _ = out.closed() => return,
            }
            continue;
        };
        let started = Instant::now();
        let env = ProbeEnv {
            node: &node,
            service: &service,
            version: &version,
        };
        let result = tokio::select! {
            r = probe(&probe_config, &client, &env) => r,
            _ = out.closed() => return,
        };
        // An answer about a process that has since stopped or been replaced
        // says nothing of the one running now: probe again.
        if status.borrow().pid != Some(pid) {
            continue;
        }
        publish(match result {
            Ok(role) => RoleStatus {
                role: Some(role),
                error: None,
            },
            Err(e) => RoleStatus {
                role: out.borrow().role.clone(),
                error: Some(e),
            },
        });
        let next = started + probe_config.interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                r = status.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // Health results change the status every check; only
                    // another process calls for probing early.
                    if status.borrow().pid != Some(pid) {
                        break;
                    }
                }
                _ = out.closed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn parse(text: &str) -> RoleProbe {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn resolves_with_defaults() {
        let p = parse(
            r#"type = "http"
url = "http://127.0.0.1:2379/status"
json_field = "raft.role""#,
        )
        .resolve("service.etcd.role")
        .unwrap();
        assert_eq!(
            p,
            ResolvedProbe {
                kind: ProbeKind::Http {
                    url: "http://127.0.0.1:2379/status".into(),
                    json_field: Some("raft.role".into()),
                },
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
            }
        );
        let p = parse(
            r#"type = "exec"
command = ["sh", "-c", "cat role"]
interval = "500ms"
timeout = "500ms""#,
        )
        .resolve("service.etcd.role")
        .unwrap();
        assert_eq!(
            p.kind,
            ProbeKind::Exec {
                command: vec!["sh".into(), "-c".into(), "cat role".into()]
            }
        );
        assert_eq!(
            (p.interval, p.timeout),
            (Duration::from_millis(500), Duration::from_millis(500))
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"url = "http://x/""#,
                r#"service.etcd.role.type: is required (one of "http", "exec")"#,
            ),
            (
                r#"type = "tcp""#,
                r#"service.etcd.role.type: "tcp" is not a role probe type (one of "http", "exec")"#,
            ),
            (
                r#"type = "http""#,
                r#"service.etcd.role.url: is required for type = "http""#,
            ),
            (
                r#"type = "http"
url = "ftp://x/""#,
                r#"service.etcd.role.url: "ftp://x/" must start with http:// or https://"#,
            ),
            (
                r#"type = "http"
url = "nope""#,
                r#"service.etcd.role.url: "nope" is not a URL"#,
            ),
            (
                r#"type = "http"
url = "http://x/"
json_field = "a..b""#,
                r#"service.etcd.role.json_field: "a..b" is not a field path"#,
            ),
            (
                r#"type = "http"
url = "http://x/"
command = ["true"]"#,
                r#"service.etcd.role.command: is not used by type = "http""#,
            ),
            (
                r#"type = "exec""#,
                r#"service.etcd.role.command: is required for type = "exec""#,
            ),
            (
                r#"type = "exec"
command = []"#,
                "service.etcd.role.command: must name a program to run",
            ),
            (
                r#"type = "exec"
command = ["true"]
json_field = "role""#,
                r#"service.etcd.role.json_field: is not used by type = "exec""#,
            ),
            (
                r#"type = "exec"
command = ["true"]
url = "http://x/""#,
                r#"service.etcd.role.url: is not used by type = "exec""#,
            ),
            (
                r#"type = "exec"
command = ["true"]
interval = "50ms""#,
                "service.etcd.role.interval: 50ms is shorter than the shortest interval, 100ms",
            ),
            (
                r#"type = "exec"
command = ["true"]
interval = "soon""#,
                r#"service.etcd.role.interval: "soon" is not a duration"#,
            ),
            (
                r#"type = "exec"
command = ["true"]
timeout = "0s""#,
                "service.etcd.role.timeout: must be longer than zero",
            ),
            (
                r#"type = "exec"
command = ["true"]
timeout = "3s""#,
                "service.etcd.role.timeout: 3s is longer than the interval, 2s",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).resolve("service.etcd.role").unwrap_err();
            assert!(
                err.to_string().starts_with(expected),
                "{text:?}: got {err}, expected {expected}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        let err = toml::from_str::<RoleProbe>("type = \"exec\"\nfield = \"x\"").unwrap_err();
        assert!(err.to_string().contains("unknown field `field`"), "{err}");
    }

    #[test]
    fn role_words() {
        for (answer, role) in [
            ("leader", "leader"),
            ("  Leader\n", "leader"),
            ("FOLLOWER", "follower"),
            ("replica_2", "replica_2"),
            ("pre-vote", "pre-vote"),
            (&"a".repeat(32), &"a".repeat(32)),
        ] {
            assert_eq!(role_word(answer).as_deref(), Ok(role), "{answer:?}");
        }
        assert_eq!(
            role_word("I am the leader!"),
            Err(
                r#"answered "I am the leader!" which is not a role word (1-32 letters, digits, _ or -)"#
                    .into()
            )
        );
        assert_eq!(
            role_word(""),
            Err(r#"answered "" which is not a role word (1-32 letters, digits, _ or -)"#.into())
        );
        let long = role_word(&"x".repeat(33)).unwrap_err();
        assert!(long.starts_with(&format!("answered \"{}\" which", "x".repeat(33))));
        let longer = role_word(&"y".repeat(100)).unwrap_err();
        assert!(
            longer.starts_with(&format!("answered \"{}\"... which", "y".repeat(64))),
            "{longer}"
        );
        let two_lines = role_word("leader\nfollower").unwrap_err();
        assert!(two_lines.contains(r#""leader\nfollower""#), "{two_lines}");
        assert!(role_word("léader").is_err());
    }

    fn exec(script: &str) -> ResolvedProbe {
        ResolvedProbe {
            kind: ProbeKind::Exec {
                command: vec!["sh".into(), "-c".into(), script.into()],
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        }
    }

    const ENV: ProbeEnv<'static> = ProbeEnv {
        node: "n1",
        service: "etcd",
        version: "3.5.0",
    };

    #[tokio::test]
    async fn exec_probes_read_stdout_and_say_why_not() {
        let client = reqwest::Client::new();
        let run = |script: &str| {
            let p = exec(script);
            let client = client.clone();
            async move { probe(&p, &client, &ENV).await }
        };
        assert_eq!(run("echo Leader").await, Ok("leader".into()));
        assert_eq!(
            run("test \"$ROLLWAVE_VERSION\" = 3.5.0 && echo $ROLLWAVE_NODE-$ROLLWAVE_SERVICE")
                .await,
            Ok("n1-etcd".into())
        );
        assert_eq!(
            run("echo not reachable >&2; exit 3").await,
            Err("exit status 3: not reachable".into())
        );
        assert_eq!(
            run("echo 'I am the leader!'").await,
            Err(
                r#"answered "I am the leader!" which is not a role word (1-32 letters, digits, _ or -)"#
                    .into()
            )
        );
        assert_eq!(run("sleep 5").await, Err("timed out after 500ms".into()));
    }

    /// Answers every request with `response`, status line included.
    async fn serve(response: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let response = response.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = sock.write_all(response.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        format!("http://{addr}/status")
    }

    fn ok(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn http_probes_read_the_body_or_a_field() {
        let client = reqwest::Client::new();
        let http = |url: &str, field: Option<&str>| ResolvedProbe {
            kind: ProbeKind::Http {
                url: url.into(),
                json_field: field.map(str::to_string),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
        };
        let url = serve(ok("follower\n")).await;
        assert_eq!(
            probe(&http(&url, None), &client, &ENV).await,
            Ok("follower".into())
        );

        let url = serve(ok(
            r#"{"raft": {"role": "Leader", "term": 7, "voter": true}}"#,
        ))
        .await;
        let field = |f: &'static str| {
            let p = http(&url, Some(f));
            let client = client.clone();
            async move { probe(&p, &client, &ENV).await }
        };
        assert_eq!(field("raft.role").await, Ok("leader".into()));
        assert_eq!(
            field("raft.state").await,
            Err(format!("GET {url}: field \"raft.state\" is missing"))
        );
        assert_eq!(
            field("raft.voter").await,
            Err(format!(
                "GET {url}: field \"raft.voter\" is true, which is not a role word (1-32 letters, digits, _ or -)"
            ))
        );
        assert_eq!(
            field("raft.term").await,
            Err(format!(
                "GET {url}: field \"raft.term\" is 7, which is not a role word (1-32 letters, digits, _ or -)"
            ))
        );

        let url = serve(ok(r#"{"role": "the boss"}"#)).await;
        assert_eq!(
            probe(&http(&url, Some("role")), &client, &ENV).await,
            Err(format!(
                "GET {url}: field \"role\" answered \"the boss\" which is not a role word (1-32 letters, digits, _ or -)"
            ))
        );

        let url = serve(ok("not json")).await;
        let err = probe(&http(&url, Some("role")), &client, &ENV)
            .await
            .unwrap_err();
        assert!(
            err.starts_with(&format!("GET {url}: body is not JSON")),
            "{err}"
        );

        let url =
            serve("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nno quorum".into())
                .await;
        assert_eq!(
            probe(&http(&url, None), &client, &ENV).await,
            Err(format!("http 503 from {url}: no quorum"))
        );
    }
}
