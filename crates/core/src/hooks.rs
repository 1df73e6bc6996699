//! Hooks: commands and webhooks run around a rollout (on the control plane)
//! and around each node's switch (on the node, by its agent).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{format_duration, parse_duration, Span, SpecError};

/// `[hooks]` in `rollout.toml`, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HooksFile {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_rollout: Vec<HookFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_rollout: Vec<HookFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_success: Vec<HookFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_failure: Vec<HookFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_node: Vec<HookFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_node: Vec<HookFile>,
    /// Node hooks run on the leader only (`order = "leader_last"`), before
    /// its `pre_node` hooks: `etcdctl move-leader`, so that its switch
    /// forces no election while another member is down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_leader: Vec<HookFile>,
}

/// One hook as written: `exec` (a command) or `http` (a webhook).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HookFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `node`: the name of a hook the node declares in its `agent.toml`
    /// (`[hooks.<name>]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// `http`: send a Slack-compatible body (`{"text": ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<bool>,
    /// `haproxy`: the runtime API socket (`stats socket ... level admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy_socket: Option<String>,
    /// `haproxy`: the backend the node is a server of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `haproxy`: the server standing for the node; `{node}` is replaced by
    /// the node's name, which is also the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// `haproxy`: `drain` (and wait, up to the timeout, for its sessions to
    /// end) or `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// `fail` (the default) or `continue`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
}

/// Validated hooks of a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_rollout: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_rollout: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_success: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_failure: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_node: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_node: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_leader: Vec<Hook>,
}

impl Hooks {
    pub fn is_empty(&self) -> bool {
        self == &Hooks::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Hook {
    /// Where it was declared, e.g. `hooks.pre_node[0]`: names it in logs.
    pub name: String,
    pub action: HookAction,
    /// Per attempt, in milliseconds.
    #[schema(value_type = u64)]
    pub timeout: Span,
    /// Attempts after the first failure, with backoff between them.
    pub retries: u32,
    pub on_error: OnError,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HookAction {
    /// A program and its arguments, run without a shell.
    Exec { command: Vec<String> },
    /// A hook the node declares in its `agent.toml`, by name: what a
    /// rollout may make a node run is the node's own to decide.
    Node { hook: String },
    /// A POST of the event as JSON (or `{"text": ...}` for Slack).
    Http { url: String, slack: bool },
    /// Sets the node's server in an HAProxy backend to `drain` (waiting for
    /// its sessions to end) or `ready`, through the runtime API.
    Haproxy {
        socket: String,
        backend: String,
        /// May hold `{node}`.
        server: String,
        state: LbState,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LbState {
    Drain,
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The step the hook guards fails.
    Fail,
    /// The failure is logged and the step goes on.
    Continue,
}

pub const DEFAULT_HOOK_TIMEOUT: Span = 60_000;
/// Retries are for flaky endpoints, not a way to wait for minutes.
pub const MAX_HOOK_RETRIES: u32 = 10;

impl HooksFile {
    /// The first hook that would run a command on the control plane's own
    /// machine, by its field (`hooks.pre_rollout[0]`): starting a rollout
    /// with one takes more trust than starting one without.
    pub fn control_plane_command(&self) -> Option<String> {
        let stages = [
            ("pre_rollout", &self.pre_rollout),
            ("post_rollout", &self.post_rollout),
            ("on_success", &self.on_success),
            ("on_failure", &self.on_failure),
        ];
        stages.into_iter().find_map(|(name, hooks)| {
            hooks
                .iter()
                .position(|h| match h.kind.as_deref() {
                    Some(kind) => kind == "exec",
                    None => h.command.is_some(),
                })
                .map(|i| format!("hooks.{name}[{i}]"))
        })
    }

    pub fn resolve(&self) -> Result<Hooks, SpecError> {
        let list = |name: &str, hooks: &[HookFile]| -> Result<Vec<Hook>, SpecError> {
            hooks
                .iter()
                .enumerate()
                .map(|(i, h)| h.resolve(&format!("hooks.{name}[{i}]")))
                .collect()
        };
        let node_only = |name: &str, hooks: Vec<Hook>| -> Result<Vec<Hook>, SpecError> {
            for h in &hooks {
                let why = match h.action {
                    HookAction::Haproxy { .. } => "haproxy hooks drain or re-enable one node",
                    HookAction::Node { .. } => "node hooks run on each node",
                    _ => continue,
                };
                return Err(SpecError::new(
                    format!("{}.kind", h.name),
                    format!("{why}: use them in pre_node, post_node or pre_leader, not {name}"),
                ));
            }
            Ok(hooks)
        };
        // Commands a node runs are declared on the node (or shipped in the
        // release it verified), never sent by the control plane.
        let on_nodes = |hooks: Vec<Hook>| -> Result<Vec<Hook>, SpecError> {
            if let Some(h) = hooks
                .iter()
                .find(|h| matches!(h.action, HookAction::Exec { .. }))
            {
                return Err(SpecError::new(
                    format!("{}.kind", h.name),
                    "a rollout cannot send commands to nodes: declare the command in each agent.toml under [hooks.<name>] and use kind = \"node\" with hook = \"<name>\", or ship it in the release's rollwave.toml",
                ));
            }
            Ok(hooks)
        };
        Ok(Hooks {
            pre_rollout: node_only("pre_rollout", list("pre_rollout", &self.pre_rollout)?)?,
            post_rollout: node_only("post_rollout", list("post_rollout", &self.post_rollout)?)?,
            on_success: node_only("on_success", list("on_success", &self.on_success)?)?,
            on_failure: node_only("on_failure", list("on_failure", &self.on_failure)?)?,
            pre_node: on_nodes(list("pre_node", &self.pre_node)?)?,
            post_node: on_nodes(list("post_node", &self.post_node)?)?,
            pre_leader: on_nodes(list("pre_leader", &self.pre_leader)?)?,
        })
    }
}

impl HookFile {
    pub(crate) fn resolve(&self, at: &str) -> Result<Hook, SpecError> {
        let field = |f: &str| format!("{at}.{f}");
        let kind = match (self.kind.as_deref(), &self.command, &self.url) {
            (Some(k), _, _) => k,
            (None, None, None) if self.hook.is_some() => "node",
            (None, Some(_), None) => "exec",
            (None, None, Some(_)) => "http",
            (None, _, _) => {
                return Err(SpecError::new(
                    field("kind"),
                    "is required: \"exec\" (with command), \"node\" (with hook), \"http\" (with url) or \"haproxy\"",
                ))
            }
        };
        let lb_fields = self.haproxy_socket.is_some()
            || self.backend.is_some()
            || self.server.is_some()
            || self.state.is_some();
        if kind != "haproxy" && lb_fields {
            return Err(SpecError::new(
                field("kind"),
                format!("{kind:?} takes no haproxy_socket, backend, server or state: use kind = \"haproxy\""),
            ));
        }
        if kind != "node" && self.hook.is_some() {
            return Err(SpecError::new(
                field("hook"),
                "is for kind = \"node\": the name of a hook the node declares",
            ));
        }
        let action = match kind {
            "node" => {
                if self.command.is_some() || self.url.is_some() || self.slack.is_some() {
                    return Err(SpecError::new(
                        field("kind"),
                        "a node hook names a hook the node declares (hook = \"<name>\"), not a command or url",
                    ));
                }
                let hook = self.hook.clone().ok_or_else(|| {
                    SpecError::new(field("hook"), "is required: the name of a hook declared in agent.toml under [hooks.<name>]")
                })?;
                check_hook_name(&field("hook"), &hook)?;
                HookAction::Node { hook }
            }
            "exec" => {
                if self.url.is_some() || self.slack.is_some() {
                    return Err(SpecError::new(
                        field("url"),
                        "is for kind = \"http\"; an exec hook runs its command",
                    ));
                }
                let command = self
                    .command
                    .clone()
                    .filter(|c| c.first().is_some_and(|p| !p.trim().is_empty()))
                    .ok_or_else(|| {
                        SpecError::new(
                            field("command"),
                            "is required: the program and its arguments, e.g. [\"/usr/local/bin/backup\", \"--meta\"]",
                        )
                    })?;
                HookAction::Exec { command }
            }
            "http" => {
                if self.command.is_some() {
                    return Err(SpecError::new(
                        field("command"),
                        "is for kind = \"exec\"; an http hook posts to its url",
                    ));
                }
                let url = self
                    .url
                    .clone()
                    .ok_or_else(|| SpecError::new(field("url"), "is required"))?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(SpecError::new(
                        field("url"),
                        format!("{url:?} must start with http:// or https://"),
                    ));
                }
                HookAction::Http {
                    url,
                    slack: self.slack.unwrap_or(false),
                }
            }
            "haproxy" => {
                if self.command.is_some() || self.url.is_some() || self.slack.is_some() {
                    return Err(SpecError::new(
                        field("kind"),
                        "an haproxy hook takes haproxy_socket, backend, server and state, not command or url",
                    ));
                }
                let socket = self
                    .haproxy_socket
                    .clone()
                    .ok_or_else(|| SpecError::new(field("haproxy_socket"), "is required"))?;
                if !socket.starts_with('/') {
                    return Err(SpecError::new(
                        field("haproxy_socket"),
                        format!("{socket:?} must be an absolute path"),
                    ));
                }
                let backend = self
                    .backend
                    .clone()
                    .ok_or_else(|| SpecError::new(field("backend"), "is required"))?;
                check_haproxy_name(&field("backend"), &backend)?;
                let server = self.server.clone().unwrap_or_else(|| "{node}".into());
                check_haproxy_name(&field("server"), &server.replace("{node}", "node"))?;
                let state = match self.state.as_deref() {
                    Some("drain") => LbState::Drain,
                    Some("ready") => LbState::Ready,
                    Some(other) => {
                        return Err(SpecError::new(
                            field("state"),
                            format!("{other:?} is not drain or ready"),
                        ))
                    }
                    None => {
                        return Err(SpecError::new(
                            field("state"),
                            "is required: drain or ready",
                        ))
                    }
                };
                HookAction::Haproxy {
                    socket,
                    backend,
                    server,
                    state,
                }
            }
            other => {
                return Err(SpecError::new(
                    field("kind"),
                    format!("{other:?} is not a hook kind (exec, node, http or haproxy)"),
                ))
            }
        };
        let timeout = match &self.timeout {
            Some(t) => parse_duration(&field("timeout"), t)?,
            None => DEFAULT_HOOK_TIMEOUT,
        };
        if timeout == 0 {
            return Err(SpecError::new(field("timeout"), "must be more than 0s"));
        }
        let retries = self.retries.unwrap_or(0);
        if retries > MAX_HOOK_RETRIES {
            return Err(SpecError::new(
                field("retries"),
                format!("{retries} is more than {MAX_HOOK_RETRIES}"),
            ));
        }
        let on_error = match self.on_error.as_deref() {
            None | Some("fail") => OnError::Fail,
            Some("continue") => OnError::Continue,
            Some(other) => {
                return Err(SpecError::new(
                    field("on_error"),
                    format!("{other:?} is not fail or continue"),
                ))
            }
        };
        Ok(Hook {
            name: at.to_string(),
            action,
            timeout,
            retries,
            on_error,
        })
    }
}

/// Names of the hooks a node declares: keys in `agent.toml`.
pub fn check_hook_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{name:?} is not a hook name (1-64 of a-z, A-Z, 0-9, '-', '_', '.')"),
        ))
    }
}

/// HAProxy names are letters, digits, `-`, `_`, `.` and `:`. Checking this
/// also keeps `;` (the runtime API's command separator), spaces and newlines
/// out of the commands built from the names.
pub fn check_haproxy_name(field: &str, name: &str) -> Result<(), SpecError> {
    if name.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(SpecError::new(
            field,
            format!("{name:?} is not an haproxy name (letters, digits, '-', '_', '.', ':')"),
        ));
    }
    Ok(())
}

impl Hook {
    /// One line for logs: `hooks.pre_node[0] (exec backup --meta, 1m)`.
    pub fn describe(&self) -> String {
        let what = match &self.action {
            HookAction::Exec { command } => format!("exec {}", command.join(" ")),
            HookAction::Node { hook } => format!("node hook {hook}"),
            HookAction::Http { url, .. } => format!("http {url}"),
            HookAction::Haproxy {
                backend,
                server,
                state,
                ..
            } => format!("haproxy {backend}/{server} {state:?}").to_lowercase(),
        };
        format!("{} ({what}, {})", self.name, format_duration(self.timeout))
    }
}

/// How one hook ran, as recorded in the rollout's execution log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub name: String,
    pub ok: bool,
    pub attempts: u32,
    /// Exec: the exit code of the last attempt (none if killed or not run).
    pub exit_code: Option<i32>,
    /// Http: the status of the last attempt.
    pub http_status: Option<u16>,
    pub duration_ms: u64,
    /// The end of stdout and stderr (or the response body), at most a few KiB.
    pub output: String,
    /// Why the last attempt failed, if it did.
    pub error: Option<String>,
}

impl HookReport {
    /// One line for the execution log.
    pub fn summary(&self) -> String {
        let result = match (&self.error, self.exit_code, self.http_status) {
            (Some(e), _, _) => format!("failed: {e}"),
            (None, Some(c), _) => format!("exited {c}"),
            (None, None, Some(s)) => format!("answered {s}"),
            (None, None, None) => "ok".into(),
        };
        let attempts = if self.attempts > 1 {
            format!(" after {} attempts", self.attempts)
        } else {
            String::new()
        };
        let output = self.output.trim();
        let output = if output.is_empty() {
            String::new()
        } else {
            format!(": {}", output.replace('\n', " | "))
        };
        format!(
            "hook {} {result}{attempts} in {}{output}",
            self.name,
            format_duration(self.duration_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_hooks(text: &str) -> Result<Hooks, SpecError> {
        let file: HooksFile = toml::from_str(text).unwrap();
        file.resolve()
    }

    #[test]
    fn hooks_resolve_with_defaults() {
        let h = toml_hooks(
            r#"
pre_rollout = [{ command = ["backup", "--meta"], timeout = "5m", retries = 2 }]
post_node = [{ url = "http://127.0.0.1:9/x", slack = true, on_error = "continue" }]
"#,
        )
        .unwrap();
        assert_eq!(h.pre_rollout[0].name, "hooks.pre_rollout[0]");
        assert_eq!(h.pre_rollout[0].timeout, 300_000);
        assert_eq!(h.pre_rollout[0].retries, 2);
        assert_eq!(h.pre_rollout[0].on_error, OnError::Fail);
        assert_eq!(
            h.post_node[0].action,
            HookAction::Http {
                url: "http://127.0.0.1:9/x".into(),
                slack: true
            }
        );
        assert_eq!(h.post_node[0].on_error, OnError::Continue);
        assert!(HooksFile::default().resolve().unwrap().is_empty());
    }

    #[test]
    fn hook_errors_name_the_field() {
        for (text, field) in [
            ("pre_node = [{}]", "hooks.pre_node[0].kind"),
            (
                "pre_node = [{ kind = \"exec\" }]",
                "hooks.pre_node[0].command",
            ),
            (
                "pre_node = [{ command = [\"\"] }]",
                "hooks.pre_node[0].command",
            ),
            (
                "on_failure = [{ kind = \"mail\" }]",
                "hooks.on_failure[0].kind",
            ),
            (
                "on_success = [{ url = \"ftp://x\" }]",
                "hooks.on_success[0].url",
            ),
            (
                "post_rollout = [{ command = [\"x\"], timeout = \"0s\" }]",
                "hooks.post_rollout[0].timeout",
            ),
            (
                "pre_rollout = [{ command = [\"x\"], retries = 99 }]",
                "hooks.pre_rollout[0].retries",
            ),
            (
                "pre_rollout = [{ command = [\"x\"], on_error = \"ignore\" }]",
                "hooks.pre_rollout[0].on_error",
            ),
            (
                "pre_rollout = [{ command = [\"x\"], url = \"http://x\" }]",
                "hooks.pre_rollout[0].kind",
            ),
            (
                "pre_rollout = [{ kind = \"exec\", command = [\"x\"], url = \"http://x\" }]",
                "hooks.pre_rollout[0].url",
            ),
        ] {
            assert_eq!(toml_hooks(text).unwrap_err().field, field, "{text}");
        }
    }
}

#[cfg(test)]
mod lb_tests {
    use super::*;

    fn resolve(text: &str) -> Result<Hooks, SpecError> {
        toml::from_str::<HooksFile>(text).unwrap().resolve()
    }

    #[test]
    fn an_haproxy_hook_resolves_with_the_node_as_its_server() {
        let hooks = resolve(
            "[[pre_node]]\nkind = \"haproxy\"\nhaproxy_socket = \"/run/haproxy.sock\"\nbackend = \"api\"\nstate = \"drain\"\n",
        )
        .unwrap();
        assert_eq!(
            hooks.pre_node[0].action,
            HookAction::Haproxy {
                socket: "/run/haproxy.sock".into(),
                backend: "api".into(),
                server: "{node}".into(),
                state: LbState::Drain,
            }
        );
    }

    #[test]
    fn haproxy_hook_errors_name_the_field() {
        let base = "kind = \"haproxy\"\nhaproxy_socket = \"/run/h.sock\"\nbackend = \"api\"\n";
        let cases = [
            (format!("[[pre_node]]\n{base}"), "hooks.pre_node[0].state: is required: drain or ready"),
            (format!("[[pre_node]]\n{base}state = \"down\""), "hooks.pre_node[0].state: \"down\" is not drain or ready"),
            (format!("[[post_node]]\n{base}state = \"ready\"\nserver = \"a b\""), "hooks.post_node[0].server: \"a b\" is not an haproxy name"),
            ("[[pre_node]]\nkind = \"haproxy\"\nhaproxy_socket = \"run/h.sock\"\nbackend = \"api\"\nstate = \"drain\"".into(), "hooks.pre_node[0].haproxy_socket: \"run/h.sock\" must be an absolute path"),
            (format!("[[pre_rollout]]\n{base}state = \"drain\""), "hooks.pre_rollout[0].kind: haproxy hooks drain or re-enable one node"),
            ("[[pre_node]]\ncommand = [\"x\"]\nbackend = \"api\"".into(), "hooks.pre_node[0].kind: \"exec\" takes no haproxy_socket"),
        ];
        for (text, want) in cases {
            let err = resolve(&text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text}: {err}");
        }
    }
}
