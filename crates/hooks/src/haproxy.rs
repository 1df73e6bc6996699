//! Draining a node in an HAProxy load balancer around a restart switch.
//!
//! A service switched with `switch = "restart"` is down between stopping the
//! old version and the new one becoming healthy. When the service sits behind
//! HAProxy, `[service.drain]` names the server that stands for this node, and
//! the agent uses HAProxy's runtime API (the `stats socket ... level admin`
//! unix socket) to
//!
//! 1. `set server <backend>/<server> state drain`: HAProxy sends no new
//!    traffic to the server, while the requests it is serving finish;
//! 2. wait, polling `show stat` every [`POLL_INTERVAL`], until the server has
//!    no sessions and no queued requests left, or the drain timeout passes;
//! 3. (the caller stops the old version, starts the new one, waits for it to
//!    be healthy)
//! 4. `set server <backend>/<server> state ready`.
//!
//! Each command uses its own connection: without `prompt` (interactive mode)
//! HAProxy answers one command and closes, so reading to EOF is reading the
//! whole answer. Every command is bounded by [`COMMAND_TIMEOUT`], so a wedged
//! load balancer cannot hold a switch forever.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rollwave_core::{check_haproxy_name, describe_io, format_duration, parse_duration, SpecError};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long to wait by default for a draining server's sessions to end.
pub const DEFAULT_TIMEOUT: &str = "30s";
/// How often `show stat` is polled while draining.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Bound on one runtime API command: connect, write, read the whole answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// A `show stat` answer for one backend is a few KiB per server; anything
/// this large is not HAProxy talking.
const MAX_REPLY: u64 = 16 << 20;

/// `[service.drain]` in `agent.toml`, e.g.
///
/// ```toml
/// [service.drain]
/// haproxy_socket = "/run/haproxy/admin.sock"
/// backend = "api"
/// server = "node-1"
/// timeout = "30s"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    /// HAProxy's runtime API socket (`stats socket ... level admin`).
    pub haproxy_socket: PathBuf,
    /// The backend (or listen section) the node is a server of.
    pub backend: String,
    /// The server's name in that backend.
    pub server: String,
    /// How long to wait for the server's sessions to end (default 30s).
    pub timeout: Option<String>,
}

/// A validated [`DrainConfig`]: one server in one HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Haproxy {
    pub socket: PathBuf,
    pub backend: String,
    pub server: String,
    /// How long [`Haproxy::drain`] waits for sessions to end.
    pub timeout: Duration,
}

/// A server's row in `show stat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// The `status` column: `UP`, `DOWN`, `DRAIN`, `MAINT`, `no check`,
    /// `UP 1/3`, ...
    pub status: String,
    /// The `scur` column: sessions the server is serving now.
    pub current_sessions: u64,
    /// The `qcur` column: requests queued for this server (they are served by
    /// it even while it drains).
    pub queued: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    /// The socket could not be reached or the connection broke.
    #[error("haproxy socket {}: {reason}", socket.display())]
    Socket { socket: PathBuf, reason: String },
    /// HAProxy did not answer a command in time.
    #[error("haproxy socket {}: no answer to `{command}` within {}", socket.display(), format_duration(after.as_millis() as u64))]
    CommandTimeout {
        socket: PathBuf,
        command: String,
        after: Duration,
    },
    /// The backend or the server does not exist in HAProxy's configuration.
    #[error("haproxy has no server {backend}/{server} (socket {})", socket.display())]
    NoSuchServer {
        socket: PathBuf,
        backend: String,
        server: String,
    },
    /// HAProxy answered a command with an error message (e.g. `Permission
    /// denied` when the socket is not `level admin`).
    #[error("haproxy refused `{command}`: {reply} (socket {})", socket.display())]
    Refused {
        socket: PathBuf,
        command: String,
        reply: String,
    },
    /// `show stat` answered something that is not the CSV it should be.
    #[error("haproxy socket {}: unreadable `show stat` answer: {reason}", socket.display())]
    BadStat { socket: PathBuf, reason: String },
    /// The server still served sessions when the drain timeout passed. It is
    /// left draining; the caller decides whether to go on.
    #[error("{backend}/{server} still has {} after {} of draining", pending(*sessions, *queued), format_duration(after.as_millis() as u64))]
    DrainTimeout {
        backend: String,
        server: String,
        sessions: u64,
        queued: u64,
        after: Duration,
    },
}

fn pending(sessions: u64, queued: u64) -> String {
    let s = format!("{sessions} session{}", if sessions == 1 { "" } else { "s" });
    if queued == 0 {
        s
    } else {
        format!(
            "{s} and {queued} queued request{}",
            if queued == 1 { "" } else { "s" }
        )
    }
}

impl DrainConfig {
    /// Validates the configuration; `field_prefix` is where it sits in
    /// `agent.toml` (`service.api.drain`), to name fields in errors.
    pub fn resolve(&self, field_prefix: &str) -> Result<Haproxy, SpecError> {
        let field = |name: &str| format!("{field_prefix}.{name}");
        if self.haproxy_socket.as_os_str().is_empty() {
            return Err(SpecError::new(field("haproxy_socket"), "must not be empty"));
        }
        if !self.haproxy_socket.is_absolute() {
            return Err(SpecError::new(
                field("haproxy_socket"),
                format!("{} must be an absolute path", self.haproxy_socket.display()),
            ));
        }
        check_haproxy_name(&field("backend"), &self.backend)?;
        check_haproxy_name(&field("server"), &self.server)?;
        let timeout_field = field("timeout");
        let ms = parse_duration(
            &timeout_field,
            self.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT),
        )?;
        if ms == 0 {
            return Err(SpecError::new(timeout_field, "must be more than 0s"));
        }
        Ok(Haproxy {
            socket: self.haproxy_socket.clone(),
            backend: self.backend.clone(),
            server: self.server.clone(),
            timeout: Duration::from_millis(ms),
        })
    }
}

impl Haproxy {
    /// Sets the server to drain (no new connections; existing ones finish)
    /// and waits until it has no sessions and no queued requests left.
    ///
    /// After [`Haproxy::timeout`] it returns [`HaproxyError::DrainTimeout`],
    /// leaving the server draining: whether to stop the service anyway is the
    /// caller's decision.
    pub async fn drain(&self) -> Result<(), HaproxyError> {
        self.set_state("drain").await?;
        tracing::info!(backend = %self.backend, server = %self.server, "haproxy server draining");
        let start = tokio::time::Instant::now();
        let deadline = start + self.timeout;
        loop {
            let st = self.status().await?;
            if st.current_sessions == 0 && st.queued == 0 {
                tracing::info!(
                    backend = %self.backend,
                    server = %self.server,
                    waited_ms = start.elapsed().as_millis() as u64,
                    "haproxy server drained"
                );
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HaproxyError::DrainTimeout {
                    backend: self.backend.clone(),
                    server: self.server.clone(),
                    sessions: st.current_sessions,
                    queued: st.queued,
                    after: self.timeout,
                });
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(POLL_INTERVAL.min(left)).await;
        }
    }

    /// Sets the server back to ready (this also ends `maint`).
    pub async fn ready(&self) -> Result<(), HaproxyError> {
        self.set_state("ready").await?;
        tracing::info!(backend = %self.backend, server = %self.server, "haproxy server ready");
        Ok(())
    }

    /// The server's status and sessions, from `show stat`.
    pub async fn status(&self) -> Result<ServerStatus, HaproxyError> {
        // `show stat <proxy> 4 -1`: only the server rows (type 4) of this
        // backend, all of them (-1).
        self.check_names()?;
        let command = format!("show stat {} 4 -1", self.backend);
        let reply = command_on(&self.socket, &command).await?;
        if !reply.starts_with('#') {
            return Err(self.reply_error(command, &reply));
        }
        find_server(&reply, &self.backend, &self.server)
            .map_err(|reason| HaproxyError::BadStat {
                socket: self.socket.clone(),
                reason,
            })?
            .ok_or_else(|| self.no_such_server())
    }

    async fn set_state(&self, state: &str) -> Result<(), HaproxyError> {
        self.check_names()?;
        let command = format!("set server {}/{} state {state}", self.backend, self.server);
        let reply = command_on(&self.socket, &command).await?;
        if reply.trim().is_empty() {
            Ok(())
        } else {
            Err(self.reply_error(command, &reply))
        }
    }

    fn reply_error(&self, command: String, reply: &str) -> HaproxyError {
        let reply = one_line(reply);
        // HAProxy's own words for a name it does not know.
        if reply.starts_with("No such server")
            || reply.starts_with("No such backend")
            || reply.starts_with("No such proxy")
        {
            return self.no_such_server();
        }
        HaproxyError::Refused {
            socket: self.socket.clone(),
            command,
            reply,
        }
    }

    /// A `Haproxy` built by hand rather than by [`DrainConfig::resolve`] may
    /// hold names HAProxy cannot have; they never reach the socket, where a
    /// `;` would start another command.
    fn check_names(&self) -> Result<(), HaproxyError> {
        if check_haproxy_name("", &self.backend).is_ok()
            && check_haproxy_name("", &self.server).is_ok()
        {
            Ok(())
        } else {
            Err(self.no_such_server())
        }
    }

    fn no_such_server(&self) -> HaproxyError {
        HaproxyError::NoSuchServer {
            socket: self.socket.clone(),
            backend: self.backend.clone(),
            server: self.server.clone(),
        }
    }
}

/// Sends one command on a fresh connection and returns the whole answer.
async fn command_on(socket: &Path, command: &str) -> Result<String, HaproxyError> {
    let exchange = async {
        let mut conn = UnixStream::connect(socket).await?;
        conn.write_all(format!("{command}\n").as_bytes()).await?;
        let mut reply = Vec::new();
        (&mut conn)
            .take(MAX_REPLY + 1)
            .read_to_end(&mut reply)
            .await?;
        if reply.len() as u64 > MAX_REPLY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("answer to `{command}` is over {MAX_REPLY} bytes"),
            ));
        }
        Ok(reply)
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, exchange).await {
        Err(_) => Err(HaproxyError::CommandTimeout {
            socket: socket.to_path_buf(),
            command: command.to_string(),
            after: COMMAND_TIMEOUT,
        }),
        Ok(Err(e)) => Err(HaproxyError::Socket {
            socket: socket.to_path_buf(),
            reason: describe_io(&e),
        }),
        Ok(Ok(reply)) => Ok(String::from_utf8_lossy(&reply).into_owned()),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Finds `backend/server`'s row in a `show stat` CSV answer. `Ok(None)` if
/// there is no such row; `Err` if the answer is not the expected CSV.
pub fn find_server(csv: &str, backend: &str, server: &str) -> Result<Option<ServerStatus>, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix('#'))
        .ok_or_else(|| "no `# pxname,svname,...` header line".to_string())?;
    let names = split_csv(header.trim_start());
    let column = |name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("no {name} column in the header"))
    };
    let (px, sv, scur, qcur, status) = (
        column("pxname")?,
        column("svname")?,
        column("scur")?,
        column("qcur")?,
        column("status")?,
    );
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let fields = split_csv(line);
        if fields.get(px).map(String::as_str) != Some(backend)
            || fields.get(sv).map(String::as_str) != Some(server)
        {
            continue;
        }
        let number = |i: usize, name: &str| -> Result<u64, String> {
            let v = fields.get(i).map(String::as_str).unwrap_or("");
            // An empty counter means zero (HAProxy leaves unused ones empty).
            if v.is_empty() {
                return Ok(0);
            }
            v.parse()
                .map_err(|_| format!("{backend}/{server}: {name} {v:?} is not a number"))
        };
        return Ok(Some(ServerStatus {
            status: fields.get(status).cloned().unwrap_or_default(),
            current_sessions: number(scur, "scur")?,
            queued: number(qcur, "qcur")?,
        }));
    }
    Ok(None)
}

/// Splits one CSV line. HAProxy quotes fields that may hold commas (check
/// descriptions, agent replies) in double quotes, doubling inner quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' if quoted => quoted = false,
            '"' if field.is_empty() => quoted = true,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,\n";

    // Rows as HAProxy 2.6 prints them, trimmed after `algo`.
    const ROWS: &str = "\
api,node-1,0,0,3,3,,7,0,0,,0,,0,0,0,0,DRAIN,1,1,0,0,0,12,0,,1,3,1,,7,,2,0,,2,L4OK,,0,0,0,0,0,0,0,,,,7,0,0,,,,,-1,,,0,0,0,0,,,,Layer4 check passed,,2,3,4,,,,127.0.0.1:18081,,http,,
api,node-2,2,2,1,1,,5,0,0,,0,,0,0,0,0,UP,1,1,0,0,0,12,0,,1,3,2,,5,,2,0,,2,L7STS,503,0,0,0,0,0,0,0,,,,5,0,0,,,,,-1,\"HTTP status 503, \"\"overloaded\"\"\",,0,0,0,0,,,,Layer7 wrong status,,2,3,4,,,,127.0.0.1:18082,,http,,
";

    fn stat() -> String {
        format!("{HEADER}{ROWS}\n")
    }

    #[test]
    fn finds_a_server_row_by_column_names() {
        let st = find_server(&stat(), "api", "node-1").unwrap().unwrap();
        assert_eq!(
            st,
            ServerStatus {
                status: "DRAIN".into(),
                current_sessions: 3,
                queued: 0
            }
        );
    }

    #[test]
    fn quoted_fields_with_commas_do_not_shift_columns() {
        let st = find_server(&stat(), "api", "node-2").unwrap().unwrap();
        assert_eq!(st.status, "UP");
        assert_eq!(st.current_sessions, 1);
        assert_eq!(st.queued, 2);
        assert_eq!(split_csv(r#"a,"b, ""c""",d"#), vec!["a", r#"b, "c""#, "d"]);
    }

    #[test]
    fn an_absent_server_is_none_not_an_error() {
        assert_eq!(find_server(&stat(), "api", "node-9"), Ok(None));
        assert_eq!(find_server(&stat(), "web", "node-1"), Ok(None));
        assert_eq!(find_server(HEADER, "api", "node-1"), Ok(None));
    }

    #[test]
    fn columns_are_found_wherever_they_are() {
        let csv = "# status,svname,scur,pxname,qcur\nMAINT,s1,,b1,\n";
        let st = find_server(csv, "b1", "s1").unwrap().unwrap();
        assert_eq!(st.status, "MAINT");
        assert_eq!(st.current_sessions, 0);
    }

    #[test]
    fn malformed_answers_are_errors() {
        let err = find_server("No such proxy.\n", "api", "node-1").unwrap_err();
        assert!(err.contains("header"), "{err}");
        let err = find_server("# pxname,svname,status\n", "api", "node-1").unwrap_err();
        assert_eq!(err, "no scur column in the header");
        let err = find_server(
            "# pxname,svname,scur,qcur,status\napi,node-1,lots,0,UP\n",
            "api",
            "node-1",
        )
        .unwrap_err();
        assert_eq!(err, "api/node-1: scur \"lots\" is not a number");
    }

    fn config(toml_text: &str) -> Result<DrainConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    const GOOD: &str = r#"
haproxy_socket = "/run/haproxy/admin.sock"
backend = "api"
server = "node-1"
"#;

    #[test]
    fn resolves_with_a_default_timeout() {
        let h = config(GOOD).unwrap().resolve("service.api.drain").unwrap();
        assert_eq!(
            h,
            Haproxy {
                socket: "/run/haproxy/admin.sock".into(),
                backend: "api".into(),
                server: "node-1".into(),
                timeout: Duration::from_secs(30),
            }
        );
        let h = config(&format!("{GOOD}timeout = \"1m30s\""))
            .unwrap()
            .resolve("service.api.drain")
            .unwrap();
        assert_eq!(h.timeout, Duration::from_secs(90));
    }

    #[test]
    fn resolve_errors_name_the_field() {
        let check = |extra: &str, replace: (&str, &str), expected: &str| {
            let text = format!("{}{extra}", GOOD.replace(replace.0, replace.1));
            let err = config(&text)
                .unwrap()
                .resolve("service.api.drain")
                .unwrap_err();
            assert_eq!(err.to_string(), expected);
        };
        check(
            "timeout = \"soon\"",
            ("", ""),
            "service.api.drain.timeout: \"soon\" is not a duration (like 500ms, 10s, 5m, 1h): expected number at 0",
        );
        check(
            "timeout = \"0s\"",
            ("", ""),
            "service.api.drain.timeout: must be more than 0s",
        );
        check(
            "",
            ("\"node-1\"", "\"node 1;disable server api/node-2\""),
            "service.api.drain.server: \"node 1;disable server api/node-2\" is not an haproxy name (letters, digits, '-', '_', '.', ':')",
        );
        check(
            "",
            ("\"api\"", "\"\""),
            "service.api.drain.backend: must not be empty",
        );
        check(
            "",
            ("/run/haproxy/admin.sock", "admin.sock"),
            "service.api.drain.haproxy_socket: admin.sock must be an absolute path",
        );
    }

    #[test]
    fn unknown_and_missing_fields_are_rejected() {
        let err = config(&format!("{GOOD}weight = 3")).unwrap_err();
        assert!(err.to_string().contains("unknown field `weight`"), "{err}");
        let err = config("backend = \"api\"\nserver = \"n\"").unwrap_err();
        assert!(
            err.to_string().contains("missing field `haproxy_socket`"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn names_haproxy_cannot_have_never_reach_the_socket() {
        let h = Haproxy {
            // Nothing listens here: an attempt to connect would fail with a
            // socket error instead.
            socket: "/nonexistent/admin.sock".into(),
            backend: "api".into(),
            server: "node-1;set server api/node-2 state maint".into(),
            timeout: Duration::from_secs(1),
        };
        for err in [
            h.drain().await.unwrap_err(),
            h.ready().await.unwrap_err(),
            h.status().await.unwrap_err(),
        ] {
            assert!(matches!(err, HaproxyError::NoSuchServer { .. }), "{err:?}");
        }
    }

    #[test]
    fn errors_read_in_user_terms() {
        let timeout = HaproxyError::DrainTimeout {
            backend: "api".into(),
            server: "node-1".into(),
            sessions: 3,
            queued: 0,
            after: Duration::from_secs(30),
        };
        assert_eq!(
            timeout.to_string(),
            "api/node-1 still has 3 sessions after 30s of draining"
        );
        let timeout = HaproxyError::DrainTimeout {
            backend: "api".into(),
            server: "node-1".into(),
            sessions: 1,
            queued: 1,
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            timeout.to_string(),
            "api/node-1 still has 1 session and 1 queued request after 1s 500ms of draining"
        );
        let e = io::Error::from_raw_os_error(111);
        assert_eq!(describe_io(&e), "connection refused");
    }
}
