//! `agent.toml`: who the node is, where the control plane is, and the
//! services this agent supervises.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use rollwave_core::{TrustedKey, TrustedKeys};
use rollwave_tls::ClientTls;
use serde::Deserialize;

use crate::disk::DiskLimits;
use crate::haproxy::{DrainConfig, Haproxy};
use crate::health::{HealthCheck, ResolvedCheck};
use crate::logs::LogSettings;
use crate::role::{ResolvedProbe, RoleProbe};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<String>,
    server: Option<Servers>,
    ca_file: Option<PathBuf>,
    server_pin: Option<String>,
    state_dir: Option<PathBuf>,
    join_token: Option<String>,
    join_token_file: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    #[serde(default)]
    trusted_key_files: Vec<PathBuf>,
    max_release_size: Option<Size>,
    min_free_disk: Option<Size>,
    keep_releases: Option<usize>,
    logs: Option<RawLogs>,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

/// `[logs]`, or a service's `logs = { ... }`: how its output is kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    max_size: Option<Size>,
    keep: Option<toml::Value>,
}

impl RawLogs {
    /// `base` with what this table sets; `at` names the table in errors.
    fn apply(self, at: &str, base: LogSettings) -> Result<LogSettings, String> {
        let mut out = base;
        if let Some(size) = self.max_size {
            let field = format!("{at}.max_size");
            out.max_size = size.bytes(&field)?;
            if out.max_size < crate::logs::MIN_MAX_SIZE {
                return Err(format!(
                    "{field}: {} bytes is below the smallest log file, 1KiB",
                    out.max_size
                ));
            }
        }
        if let Some(keep) = self.keep {
            let max = crate::logs::MAX_KEEP;
            out.keep = match keep {
                toml::Value::Integer(n) if (0..=max as i64).contains(&n) => n as usize,
                other => {
                    return Err(format!(
                        "{at}.keep: {other} is not a number of files from 0 to {max}"
                    ))
                }
            };
        }
        Ok(out)
    }
}

/// A size in `agent.toml`: bytes, or a string with a unit (`"1GiB"`).
/// Read as any TOML value, so that a wrong type gets an error naming the
/// field rather than serde's "did not match any variant".
#[derive(Debug, Deserialize)]
#[serde(transparent)]
struct Size(toml::Value);

impl Size {
    fn bytes(self, field: &str) -> Result<u64, String> {
        match self.0 {
            toml::Value::Integer(n) if n >= 0 => Ok(n as u64),
            toml::Value::String(t) => crate::disk::parse_size(field, &t),
            other => Err(format!(
                "{field}: {other} is not a size like \"512MiB\" or a number of bytes"
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    working_dir: Option<String>,
    health: Option<HealthCheck>,
    role: Option<RoleProbe>,
    stop_signal: Option<String>,
    reload_signal: Option<String>,
    stop_grace: Option<String>,
    #[serde(default)]
    backup: Vec<RawBackup>,
    backups_kept: Option<usize>,
    #[serde(default)]
    listen: Vec<String>,
    switch: Option<String>,
    drain: Option<DrainConfig>,
    #[serde(default)]
    hooks: BTreeMap<String, Vec<String>>,
    logs: Option<RawLogs>,
}

/// `server = "https://cp:7700"` or a list, one per control plane replica.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Servers {
    One(String),
    Many(Vec<String>),
}

/// A backup path: `"/var/lib/api"`, or a table that says whether a
/// rollback restores it: `{ path = "/var/lib/etcd", restore = "never" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBackup {
    Path(PathBuf),
    Table {
        path: PathBuf,
        restore: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    /// The first of `servers`, for messages.
    pub server: String,
    /// Every control plane replica, in the order they are tried: an agent
    /// moves to the next when one is unreachable or follows another (the
    /// leader takes agent sessions).
    pub servers: Vec<String>,
    /// How the control plane is verified when `server` is https.
    pub tls: ClientTls,
    pub state_dir: PathBuf,
    /// Traded for the node's own credential on first start; unused once
    /// the state dir holds one.
    pub join_token: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The keys release signatures must be made with; with none, releases
    /// are installed unsigned.
    pub trusted_keys: TrustedKeys,
    /// `max_release_size`, `min_free_disk` and `keep_releases`: what
    /// releases may take from the node's disk.
    pub disk: DiskLimits,
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    /// Program and arguments; `{release}` stands for the release directory.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub health: ResolvedCheck,
    /// What the service says it is (`leader`, `follower`), probed while it
    /// runs and reported to the control plane.
    pub role: Option<ResolvedProbe>,
    pub stop_signal: Signal,
    /// Sent to the running process when the service's active version
    /// changes; without it the service learns of the change from the file
    /// or the agent's socket.
    pub reload_signal: Option<Signal>,
    pub stop_grace_ms: u64,
    /// Paths copied before a switch and restored by a rollback.
    pub backup: Vec<PathBuf>,
    /// The backup paths with `restore = "never"`: copied like the others,
    /// kept for manual recovery, never put back by a rollback (a consensus
    /// member's data must not go back in time under peers that moved on).
    pub never_restore: Vec<PathBuf>,
    pub backups_kept: usize,
    /// Sockets the agent opens and passes to the service (socket activation).
    pub listen: Vec<SocketAddr>,
    pub switch: SwitchMode,
    /// A load balancer to drain the node in before a restart-mode switch.
    pub drain: Option<Haproxy>,
    /// Commands a rollout may run around this service's switch, by name
    /// (`kind = "node"` hooks): the only commands the control plane can
    /// ask this node to run.
    pub hooks: BTreeMap<String, Vec<String>>,
    /// How its output is kept: `[logs]`, with the service's own `logs`
    /// over it.
    pub logs: LogSettings,
}

/// How a service moves from one version to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// Start the new version on the same sockets, wait until it is healthy,
    /// then stop the old one: no connection is refused.
    Handoff,
    /// Stop the old version, then start the new one.
    Restart,
}

pub const RELEASE_PLACEHOLDER: &str = "{release}";

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading agent config {}: {e}", path.display()))?;
        let config = Self::parse(&text)
            .map_err(|e| format!("invalid agent config {}: {e}", path.display()))?;
        // A CA file that cannot be used is a mistake in this file: say so
        // now rather than on every reconnect.
        if config.tls.ca_file.is_some() {
            config
                .tls
                .config()
                .map_err(|e| format!("invalid agent config {}: ca_file: {e}", path.display()))?;
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| one_line(&e.to_string()))?;
        let node = match raw.node {
            Some(n) => n,
            None => hostname()?,
        };
        if !valid_name(&node) {
            return Err(format!(
                "node: {node:?} is not a valid node name (1-128 characters of a-z, A-Z, 0-9, '-', '_', '.')"
            ));
        }
        let servers = match raw.server {
            None => vec!["https://127.0.0.1:7700".to_string()],
            Some(Servers::One(s)) => vec![s],
            Some(Servers::Many(list)) => list,
        };
        if servers.is_empty() {
            return Err("server: an empty list; give one control plane URL or more".into());
        }
        for s in &servers {
            if !(s.starts_with("http://") || s.starts_with("https://")) {
                return Err(format!("server: {s:?} must start with http:// or https://"));
            }
        }
        let server = servers[0].clone();
        // One TLS setting verifies them all.
        if let Some(other) = servers
            .iter()
            .find(|s| s.starts_with("https://") != server.starts_with("https://"))
        {
            return Err(format!(
                "server: {other:?} and {server:?} mix http:// and https://; replicas are reached the same way"
            ));
        }
        let servers: Vec<String> = servers
            .iter()
            .map(|s| s.trim_end_matches('/').to_string())
            .collect();
        let pin = match raw.server_pin {
            None => None,
            Some(p) => Some(p.parse().map_err(|e| format!("server_pin: {e}"))?),
        };
        // Verifying nothing while asked to would be worse than refusing.
        if server.starts_with("http://") {
            for (field, set) in [
                ("ca_file", raw.ca_file.is_some()),
                ("server_pin", pin.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{field}: verifies an https:// server, but server {server:?} is plain HTTP"
                    ));
                }
            }
        }
        let tls = ClientTls {
            ca_file: raw.ca_file,
            pin,
        };
        let state_dir = raw
            .state_dir
            .ok_or_else(|| "state_dir: is required".to_string())?;
        let join_token = match (raw.join_token, raw.join_token_file) {
            (Some(_), Some(_)) => {
                return Err("join_token_file: set join_token or join_token_file, not both".into())
            }
            (Some(t), None) => Some(t.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("join_token_file: reading {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if let Some(t) = &join_token {
            if rollwave_core::split_token(t).is_err() {
                return Err("join_token: is not a rollwave token (rw_<id>_<secret>)".into());
            }
        }
        let trusted_keys = trusted_keys(&raw.trusted_keys, &raw.trusted_key_files)?;
        let mut disk = DiskLimits::default();
        if let Some(size) = raw.max_release_size {
            disk.max_release_size = size.bytes("max_release_size")?;
            if disk.max_release_size == 0 {
                return Err("max_release_size: must be more than 0".into());
            }
        }
        if let Some(size) = raw.min_free_disk {
            disk.min_free = Some(size.bytes("min_free_disk")?);
        }
        if let Some(keep) = raw.keep_releases {
            disk.keep_releases = keep;
        }
        let logs = match raw.logs {
            Some(l) => l.apply("logs", LogSettings::default())?,
            None => LogSettings::default(),
        };
        if raw.services.is_empty() {
            return Err("service: at least one [[service]] is required".into());
        }
        let mut services: Vec<ServiceConfig> = Vec::new();
        for (i, s) in raw.services.into_iter().enumerate() {
            let at = format!("service[{i}]");
            let name = s.name.ok_or_else(|| format!("{at}.name: is required"))?;
            rollwave_core::validate_service_name(&format!("{at}.name"), &name)
                .map_err(|e| e.to_string())?;
            if services.iter().any(|o| o.name == name) {
                return Err(format!("{at}.name: service {name:?} is declared twice"));
            }
            let at = format!("service.{name}");
            let command = s
                .command
                .filter(|c| !c.is_empty())
                .ok_or_else(|| format!("{at}.command: is required (program and arguments)"))?;
            let health = s
                .health
                .ok_or_else(|| format!("{at}.health: is required"))?
                .resolve(&format!("{at}.health"))
                .map_err(|e| e.to_string())?;
            let role = match &s.role {
                None => None,
                Some(r) => Some(
                    r.resolve(&format!("{at}.role"))
                        .map_err(|e| e.to_string())?,
                ),
            };
            let stop_signal = match s.stop_signal.as_deref() {
                None => Signal::SIGTERM,
                Some(sig) => parse_signal(sig).ok_or_else(|| {
                    format!("{at}.stop_signal: {sig:?} is not a signal name like SIGTERM")
                })?,
            };
            let reload_signal = match s.reload_signal.as_deref() {
                None => None,
                Some(sig) => match parse_signal(sig) {
                    // Neither can be caught: the "reload" would stop the service.
                    Some(s @ (Signal::SIGKILL | Signal::SIGSTOP)) => {
                        return Err(format!(
                            "{at}.reload_signal: {s} cannot be handled by a service; use one like SIGHUP"
                        ))
                    }
                    Some(s) => Some(s),
                    None => {
                        return Err(format!(
                            "{at}.reload_signal: {sig:?} is not a signal name like SIGHUP"
                        ))
                    }
                },
            };
            let stop_grace_ms = match s.stop_grace.as_deref() {
                None => 10_000,
                Some(g) => rollwave_core::parse_duration(&format!("{at}.stop_grace"), g)
                    .map_err(|e| e.to_string())?,
            };
            let mut backup = Vec::new();
            let mut never_restore = Vec::new();
            for (i, b) in s.backup.into_iter().enumerate() {
                let (p, restore) = match b {
                    RawBackup::Path(p) => (p, None),
                    RawBackup::Table { path, restore } => (path, restore),
                };
                if !p.is_absolute() {
                    return Err(format!(
                        "{at}.backup: {} must be an absolute path",
                        p.display()
                    ));
                }
                match restore.as_deref() {
                    None | Some("on_rollback") => {}
                    Some("never") => never_restore.push(p.clone()),
                    Some(other) => {
                        return Err(format!(
                            "{at}.backup[{i}].restore: {other:?} is not one of \"on_rollback\", \"never\""
                        ))
                    }
                }
                backup.push(p);
            }
            let mut listen = Vec::new();
            for a in &s.listen {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    format!("{at}.listen: {a:?} is not an address like 127.0.0.1:8080")
                })?;
                if listen.contains(&addr) {
                    return Err(format!("{at}.listen: {a} is listed twice"));
                }
                listen.push(addr);
            }
            let switch = match s.switch.as_deref() {
                None if listen.is_empty() => SwitchMode::Restart,
                None | Some("handoff") => SwitchMode::Handoff,
                Some("restart") => SwitchMode::Restart,
                Some(other) => {
                    return Err(format!(
                        "{at}.switch: {other:?} is not a switch mode (handoff or restart)"
                    ))
                }
            };
            if switch == SwitchMode::Handoff && listen.is_empty() {
                return Err(format!(
                    "{at}.switch: handoff needs the sockets to hand off: set {at}.listen"
                ));
            }
            let drain = match &s.drain {
                None => None,
                Some(_) if switch == SwitchMode::Handoff => {
                    return Err(format!(
                        "{at}.drain: only used with switch = \"restart\" (a handoff refuses no connection)"
                    ))
                }
                Some(d) => Some(d.resolve(&format!("{at}.drain")).map_err(|e| e.to_string())?),
            };
            for (hook, command) in &s.hooks {
                rollwave_core::check_hook_name(&format!("{at}.hooks"), hook)
                    .map_err(|e| e.to_string())?;
                if command.first().is_none_or(|p| p.trim().is_empty()) {
                    return Err(format!(
                        "{at}.hooks.{hook}: the program and its arguments are required, e.g. [\"/usr/local/bin/drain\"]"
                    ));
                }
            }
            let service_logs = match s.logs {
                Some(l) => l.apply(&format!("{at}.logs"), logs)?,
                None => logs,
            };
            let backups_kept = s.backups_kept.unwrap_or(3);
            if backups_kept == 0 {
                return Err(format!("{at}.backups_kept: must be at least 1"));
            }
            services.push(ServiceConfig {
                name,
                command,
                env: s.env,
                working_dir: s.working_dir,
                health,
                role,
                stop_signal,
                reload_signal,
                stop_grace_ms,
                backup,
                never_restore,
                backups_kept,
                listen,
                switch,
                drain,
                hooks: s.hooks,
                logs: service_logs,
            });
        }
        Ok(AgentConfig {
            node,
            server: servers[0].clone(),
            servers,
            tls,
            state_dir,
            join_token,
            labels: raw.labels,
            trusted_keys,
            disk,
            services,
        })
    }
}

/// `trusted_keys` (minisign public keys, base64) and `trusted_key_files`
/// (minisign `.pub` files), together.
fn trusted_keys(inline: &[String], files: &[PathBuf]) -> Result<TrustedKeys, String> {
    let mut keys = Vec::new();
    for (i, text) in inline.iter().enumerate() {
        keys.push(TrustedKey::from_base64(text).map_err(|e| format!("trusted_keys[{i}]: {e}"))?);
    }
    for (i, path) in files.iter().enumerate() {
        let at = format!("trusted_key_files[{i}]");
        if !path.is_absolute() {
            return Err(format!("{at}: {} must be an absolute path", path.display()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "{at}: reading {}: {}",
                path.display(),
                rollwave_core::describe_io(&e)
            )
        })?;
        keys.push(
            TrustedKey::from_pub_file(&text)
                .map_err(|e| format!("{at}: {}: {e}", path.display()))?,
        );
    }
    TrustedKeys::new(keys).map_err(|e| format!("trusted_keys: {e}"))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn hostname() -> Result<String, String> {
    nix::unistd::gethostname()
        .map_err(|e| format!("node: not set and the hostname is unreadable: {e}"))?
        .into_string()
        .map_err(|_| "node: not set and the hostname is not UTF-8".to_string())
}

fn parse_signal(s: &str) -> Option<Signal> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "n1"
server = "http://127.0.0.1:7700"
state_dir = "/tmp/x"
labels = { rack = "r1" }

[[service]]
name = "api"
command = ["{release}/bin/api", "--port", "8080"]
stop_signal = "INT"
stop_grace = "3s"
backup = ["/var/lib/api"]
health = { type = "http", url = "http://127.0.0.1:8080/healthz" }
"#;

    #[test]
    fn parses_a_full_config() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.node, "n1");
        assert_eq!(c.labels["rack"], "r1");
        let s = &c.services[0];
        assert_eq!(s.stop_signal, Signal::SIGINT);
        assert_eq!(s.stop_grace_ms, 3000);
        assert_eq!(s.backups_kept, 3);
        assert_eq!(s.switch, SwitchMode::Restart);
        assert_eq!(s.reload_signal, None);
        let c = AgentConfig::parse(
            &GOOD.replace("stop_grace", "listen = [\"127.0.0.1:8080\"]\nstop_grace"),
        )
        .unwrap();
        assert_eq!(c.services[0].switch, SwitchMode::Handoff);
        assert_eq!(c.services[0].listen, ["127.0.0.1:8080".parse().unwrap()]);
    }

    #[test]
    fn server_is_one_url_or_a_list_of_replicas() {
        let one = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(one.servers, vec!["http://127.0.0.1:7700".to_string()]);
        let list = GOOD.replace(
            "server = \"http://127.0.0.1:7700\"",
            "server = [\"http://cp1:7700/\", \"http://cp2:7700\"]",
        );
        let c = AgentConfig::parse(&list).unwrap();
        assert_eq!(c.servers, vec!["http://cp1:7700", "http://cp2:7700"]);
        assert_eq!(c.server, "http://cp1:7700");
        for (servers, why) in [
            ("[]", "server: an empty list"),
            (
                "[\"http://cp1:7700\", \"https://cp2:7700\"]",
                "mix http:// and https://",
            ),
            ("[\"cp1:7700\"]", "must start with http:// or https://"),
        ] {
            let text = GOOD.replace(
                "server = \"http://127.0.0.1:7700\"",
                &format!("server = {servers}"),
            );
            let err = AgentConfig::parse(&text).unwrap_err();
            assert!(err.contains(why), "{servers}: {err}");
        }
    }

    #[test]
    fn parses_how_the_server_is_verified() {
        let pin = format!("sha256:{}", "ab".repeat(32));
        let text = GOOD.replace("http://", "https://").replace(
            "state_dir",
            &format!("ca_file = \"/etc/rollwave/ca.pem\"\nserver_pin = \"{pin}\"\nstate_dir"),
        );
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(c.tls.ca_file, Some(PathBuf::from("/etc/rollwave/ca.pem")));
        assert_eq!(c.tls.pin.map(|p| p.to_string()), Some(pin));
        let c =
            AgentConfig::parse(&GOOD.replace("server = \"http://127.0.0.1:7700\"\n", "")).unwrap();
        assert_eq!(c.server, "https://127.0.0.1:7700");
        assert_eq!(c.tls.ca_file, None);
    }

    #[test]
    fn parses_what_a_release_may_take_from_the_disk() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.disk, DiskLimits::default());
        assert_eq!(c.disk.max_release_size, 1 << 30);
        let with = |settings: &str| {
            AgentConfig::parse(&GOOD.replace("state_dir", &format!("{settings}\nstate_dir")))
        };
        let c = with("max_release_size = \"256MiB\"\nmin_free_disk = 1048576").unwrap();
        assert_eq!(c.disk.max_release_size, 256 << 20);
        assert_eq!(c.disk.min_free, Some(1 << 20));
        assert_eq!(
            with("max_release_size = \"1GB\"").unwrap_err(),
            "max_release_size: \"1GB\" is not a size like 512MiB or 1GiB (units: KiB, MiB, GiB, TiB)"
        );
        assert_eq!(
            with("max_release_size = 0").unwrap_err(),
            "max_release_size: must be more than 0"
        );
        assert!(with("min_free_disk = \"lots\"")
            .unwrap_err()
            .starts_with("min_free_disk: "));
        assert_eq!(
            with("min_free_disk = true").unwrap_err(),
            "min_free_disk: true is not a size like \"512MiB\" or a number of bytes"
        );
        assert_eq!(
            with("max_release_size = -1").unwrap_err(),
            "max_release_size: -1 is not a size like \"512MiB\" or a number of bytes"
        );
    }

    #[test]
    fn parses_how_service_output_is_kept() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.services[0].logs, LogSettings::default());
        assert_eq!(c.services[0].logs.max_size, 10 << 20);
        assert_eq!(c.services[0].logs.keep, 5);
        let text = GOOD
            .replace(
                "labels = { rack = \"r1\" }",
                "labels = { rack = \"r1\" }\nlogs = { max_size = \"1MiB\", keep = 2 }",
            )
            .replace("stop_grace", "logs = { keep = 0 }\nstop_grace");
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(
            c.services[0].logs,
            LogSettings {
                max_size: 1 << 20,
                keep: 0
            }
        );
        let with = |table: &str| {
            AgentConfig::parse(&GOOD.replace("state_dir", &format!("logs = {table}\nstate_dir")))
                .unwrap_err()
        };
        assert_eq!(
            with("{ max_size = \"10MB\" }"),
            "logs.max_size: \"10MB\" is not a size like 512MiB or 1GiB (units: KiB, MiB, GiB, TiB)"
        );
        assert_eq!(
            with("{ max_size = 100 }"),
            "logs.max_size: 100 bytes is below the smallest log file, 1KiB"
        );
        assert_eq!(
            with("{ keep = -1 }"),
            "logs.keep: -1 is not a number of files from 0 to 1000"
        );
        assert_eq!(
            with("{ keep = \"5\" }"),
            "logs.keep: \"5\" is not a number of files from 0 to 1000"
        );
        assert!(with("{ size = 5 }").contains("unknown field `size`"));
        let err =
            AgentConfig::parse(&GOOD.replace("stop_grace", "logs = { keep = 1001 }\nstop_grace"))
                .unwrap_err();
        assert_eq!(
            err,
            "service.api.logs.keep: 1001 is not a number of files from 0 to 1000"
        );
    }

    #[test]
    fn an_unusable_ca_file_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        let ca = dir.path().join("ca.pem");
        let text = GOOD.replace("http://", "https://").replace(
            "state_dir",
            &format!("ca_file = {:?}\nstate_dir", ca.display().to_string()),
        );
        std::fs::write(&config, text).unwrap();
        let err = AgentConfig::load(&config).unwrap_err();
        assert_eq!(
            err,
            format!(
                "invalid agent config {}: ca_file: reading CA file {}: no such file or directory",
                config.display(),
                ca.display()
            )
        );
    }

    #[test]
    fn parses_the_reload_signal() {
        for (value, want) in [("SIGHUP", Signal::SIGHUP), ("usr1", Signal::SIGUSR1)] {
            let text = GOOD.replace(
                "stop_grace",
                &format!("reload_signal = {value:?}\nstop_grace"),
            );
            let c = AgentConfig::parse(&text).unwrap();
            assert_eq!(c.services[0].reload_signal, Some(want), "{value}");
        }
    }

    fn public_key() -> minisign::PublicKey {
        minisign::KeyPair::generate_unencrypted_keypair()
            .unwrap()
            .pk
    }

    #[test]
    fn parses_trusted_keys_inline_and_from_files() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert!(c.trusted_keys.is_empty());

        let (a, b) = (public_key(), public_key());
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("b.pub");
        std::fs::write(&file, b.to_box().unwrap().into_string()).unwrap();
        let text = format!(
            "trusted_keys = [{:?}]\ntrusted_key_files = [{:?}, {:?}]\n{GOOD}",
            a.to_base64(),
            file.display().to_string(),
            file.display().to_string(),
        );
        let c = AgentConfig::parse(&text).unwrap();
        let keys: Vec<&str> = c.trusted_keys.keys().iter().map(|k| k.base64()).collect();
        assert_eq!(keys, [a.to_base64(), b.to_base64()]);
    }

    #[test]
    fn trusted_key_errors_name_the_field() {
        let tmp = tempfile::tempdir().unwrap();
        let garbage = tmp.path().join("garbage.pub");
        std::fs::write(&garbage, "untrusted comment: x\nnot a key\n").unwrap();
        let missing = tmp.path().join("missing.pub");
        let cases = [
            (
                "trusted_keys = [\"RWQnope\"]".to_string(),
                "trusted_keys[0]: \"RWQnope\" is not a minisign public key",
            ),
            (
                "trusted_key_files = [\"keys/a.pub\"]".to_string(),
                "trusted_key_files[0]: keys/a.pub must be an absolute path",
            ),
            (
                format!("trusted_key_files = [{:?}]", missing.display().to_string()),
                "trusted_key_files[0]: reading",
            ),
            (
                format!("trusted_key_files = [{:?}]", garbage.display().to_string()),
                "trusted_key_files[0]:",
            ),
            ("trusted_keys = \"RWQ\"".to_string(), "trusted_keys"),
        ];
        for (line, want) in cases {
            let err = AgentConfig::parse(&format!("{line}\n{GOOD}")).unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
            assert!(!err.contains('\n'), "{err} should be one line");
        }
    }

    #[test]
    fn a_backup_path_may_be_kept_and_never_restored() {
        let text = GOOD.replace(
            "\"/var/lib/api\"",
            "\"/var/lib/api\", { path = \"/var/lib/etcd\", restore = \"never\" }, \
             { path = \"/var/lib/cache\", restore = \"on_rollback\" }",
        );
        let c = AgentConfig::parse(&text).unwrap();
        let s = &c.services[0];
        let paths = ["/var/lib/api", "/var/lib/etcd", "/var/lib/cache"].map(PathBuf::from);
        assert_eq!(s.backup, paths);
        assert_eq!(s.never_restore, [PathBuf::from("/var/lib/etcd")]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("\"3s\"", "\"5 parsecs\""),
                "service.api.stop_grace",
            ),
            (
                GOOD.replace("\"INT\"", "\"SIGFOO\""),
                "service.api.stop_signal",
            ),
            (
                GOOD.replace("stop_grace", "reload_signal = \"HUPP\"\nstop_grace"),
                "service.api.reload_signal: \"HUPP\" is not a signal name like SIGHUP",
            ),
            (
                GOOD.replace("stop_grace", "reload_signal = \"KILL\"\nstop_grace"),
                "service.api.reload_signal: SIGKILL cannot be handled",
            ),
            (GOOD.replace("state_dir = \"/tmp/x\"", ""), "state_dir"),
            (
                GOOD.replace("\"/var/lib/api\"", "\"rel\""),
                "service.api.backup",
            ),
            (
                GOOD.replace(
                    "\"/var/lib/api\"",
                    "\"/var/lib/api\", { path = \"/var/lib/raft\", restore = \"sometimes\" }",
                ),
                "service.api.backup[1].restore: \"sometimes\" is not one of \"on_rollback\", \"never\"",
            ),
            (
                GOOD.replace("name = \"api\"", "name = \"../x\""),
                "service[0].name",
            ),
            (GOOD.replace("node = \"n1\"", "node = \"a b\""), "node"),
            (GOOD.replace("labels", "lables"), "unknown field"),
            (
                GOOD.replace("stop_grace", "switch = \"handoff\"\nstop_grace"),
                "service.api.switch",
            ),
            (
                GOOD.replace("stop_grace", "listen = [\"nope\"]\nstop_grace"),
                "service.api.listen",
            ),
            (
                GOOD.replace("stop_grace", "hooks = { drain = [] }\nstop_grace"),
                "service.api.hooks.drain: the program and its arguments are required",
            ),
            (
                GOOD.replace("stop_grace", "hooks = { \"a b\" = [\"x\"] }\nstop_grace"),
                "service.api.hooks: \"a b\" is not a hook name",
            ),
            (
                GOOD.replace("state_dir", "server_pin = \"abc\"\nstate_dir"),
                "server_pin: \"abc\" is not a pin like sha256:<64 hex digits>",
            ),
            (
                GOOD.replace("state_dir", "ca_file = \"/ca.pem\"\nstate_dir"),
                "ca_file: verifies an https:// server",
            ),
        ];
        for (text, field) in cases {
            let err = AgentConfig::parse(&text).unwrap_err();
            assert!(err.contains(field), "{err} should name {field}");
            assert!(!err.contains('\n'), "{err} should be one line");
        }
    }

    #[test]
    fn parses_a_role_probe_and_what_a_check_expects() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.services[0].role, None);
        let text = GOOD
            .replace(
                "health = { type = \"http\", url = \"http://127.0.0.1:8080/healthz\" }",
                "health = { type = \"http\", url = \"http://127.0.0.1:8080/version\", \
                 expect_status = 200, expect_json = { field = \"version\", equals = \"{version}\" } }",
            )
            .replace(
                "stop_grace",
                "role = { type = \"exec\", command = [\"cat\", \"/run/api/role\"], interval = \"5s\" }\nstop_grace",
            );
        let c = AgentConfig::parse(&text).unwrap();
        let s = &c.services[0];
        let role = s.role.as_ref().unwrap();
        assert_eq!(
            role.kind,
            crate::role::ProbeKind::Exec {
                command: vec!["cat".into(), "/run/api/role".into()]
            }
        );
        assert_eq!(role.interval, std::time::Duration::from_secs(5));
        assert_eq!(role.timeout, std::time::Duration::from_secs(1));
        let crate::health::CheckKind::Http { expect, .. } = &s.health.kind else {
            panic!("{:?}", s.health)
        };
        assert_eq!(expect.status, Some(vec![200]));
        assert_eq!(expect.json.as_ref().unwrap().field, "version");

        let with = |line: &str| {
            AgentConfig::parse(&GOOD.replace("stop_grace", &format!("{line}\nstop_grace")))
                .unwrap_err()
        };
        assert_eq!(
            with("role = { type = \"http\", url = \"http://x/\", json_field = \"a.\" }"),
            "service.api.role.json_field: \"a.\" is not a field path like \"version\", \"build.version\" or \"members.0.name\""
        );
        assert_eq!(
            with("role = { type = \"exec\" }"),
            "service.api.role.command: is required for type = \"exec\""
        );
        assert!(
            with("role = { type = \"exec\", command = [\"x\"], every = \"1s\" }")
                .contains("unknown field `every`")
        );
        let health = |table: &str| {
            AgentConfig::parse(&GOOD.replace(
                "health = { type = \"http\", url = \"http://127.0.0.1:8080/healthz\" }",
                &format!("health = {table}"),
            ))
            .unwrap_err()
        };
        assert_eq!(
            health("{ type = \"tcp\", address = \"127.0.0.1:8080\", expect_body = \"ok\" }"),
            "service.api.health.expect_body: is not used by type = \"tcp\" (only http checks read an answer)"
        );
        assert_eq!(
            health("{ type = \"http\", url = \"http://x/\", expect_json = { equals = \"1\" } }"),
            "service.api.health.expect_json.field: is required (a dotted path like \"build.version\")"
        );
        assert_eq!(
            health("{ type = \"http\", url = \"http://x/\", expect_status = [200, 700] }"),
            "service.api.health.expect_status: 700 is not an HTTP status (100 to 599)"
        );
        assert!(health(
            "{ type = \"http\", url = \"http://x/\", expect_json = { field = \"v\", equals = \"1\", is = \"2\" } }"
        )
        .contains("unknown field `is`"));
    }
}
