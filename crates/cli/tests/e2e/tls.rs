//! TLS end to end: a control plane with the certificates of `rollwave certs
//! init`, agents and the CLI that verify it, and what each refuses.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_api::NodeView;
use rollwave_core::AuditEntry;

use crate::harness::*;

fn tls_fleet(nodes: usize) -> FleetSpec {
    FleetSpec {
        tls: true,
        ..FleetSpec::new(exe().into(), nodes)
    }
}

fn ca_file(fleet: &Fleet) -> String {
    let certs = fleet.certs.as_ref().expect("a TLS fleet has certificates");
    certs.ca_file.display().to_string()
}

/// The CLI against `url` as the fleet's admin, trusting only what `args`
/// and the environment say (not the fleet's CA, as `cli` would).
fn cli_at(fleet: &Fleet, url: &str, args: &[&str]) -> Output {
    Command::new(exe())
        .arg("--server")
        .arg(url)
        .env("ROLLWAVE_TOKEN", &fleet.admin_token)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one `error: ...` line the CLI printed, and its exit code.
fn failure(out: &Output) -> (String, Option<i32>) {
    let text = stderr(out);
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    (text.trim_end().to_string(), out.status.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_completes_over_tls() {
    let fleet = installed(tls_fleet(2)).await;
    let url = fleet.url();
    assert!(url.starts_with("https://"), "{url}");
    let ca = ca_file(&fleet);
    push(&fleet, "2.0.0", true).await;
    let out = cli_at(
        &fleet,
        &url,
        &[
            "--ca-file",
            &ca,
            "rollout",
            "start",
            "api@2.0.0",
            "--batch",
            "1",
            "--min-healthy-time",
            "300ms",
            "--yes",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // Agents fetched the artifact and reported over their wss session.
    assert_fleet_on(&fleet, "2.0.0").await;

    // The audit trail still knows where requests came from.
    let out = cli_at(&fleet, &url, &["--ca-file", &ca, "audit", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let entries: Vec<AuditEntry> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!entries.is_empty());
    for e in &entries {
        let remote = e.remote.as_deref().unwrap_or_default();
        assert!(remote.starts_with("127.0.0.1:"), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_trusts_only_its_ca_and_its_pin() {
    let fleet = Fleet::launch(tls_fleet(0)).await.unwrap();
    let url = fleet.url();
    let ca = ca_file(&fleet);
    let pin = fleet.certs.as_ref().unwrap().pin.to_string();

    // The web roots do not include a quick-start CA.
    let (line, code) = failure(&cli_at(&fleet, &url, &["nodes"]));
    assert_eq!(
        line,
        format!("error: cannot reach the control plane at {url}: invalid peer certificate: UnknownIssuer")
    );
    assert_ne!(code, Some(0));

    // Another pin: refused, though the CA is right.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (line, code) = failure(&cli_at(
        &fleet,
        &url,
        &["--ca-file", &ca, "--pin", &wrong, "nodes"],
    ));
    assert_eq!(
        line,
        format!("error: cannot reach the control plane at {url}: invalid peer certificate: the server's certificate is {pin}, not the pinned {wrong}")
    );
    assert_ne!(code, Some(0));

    // The pin `certs init` printed, given as the environment would.
    let out = Command::new(exe())
        .args(["--server", &url, "nodes", "--json"])
        .env("ROLLWAVE_TOKEN", &fleet.admin_token)
        .env("ROLLWAVE_CA_FILE", &ca)
        .env("ROLLWAVE_PIN", &pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let nodes: Vec<NodeView> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(nodes.is_empty());

    // A pin cannot verify plain HTTP: refused rather than ignored.
    let plain = url.replacen("https://", "http://", 1);
    let (line, code) = failure(&cli_at(&fleet, &plain, &["--pin", &pin, "nodes"]));
    assert!(line.contains("is plain HTTP"), "{line}");
    assert_eq!(code, Some(2));
}

/// An agent of its own, outside the fleet, killed when dropped.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &Path, name: &str, server: &str, ca: &str, pin: &str, join: &str) -> Agent {
        let state_dir = dir.join(name);
        std::fs::create_dir_all(&state_dir).unwrap();
        let config = state_dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"node = "{name}"
server = "{server}"
ca_file = {ca:?}
server_pin = "{pin}"
join_token = "{join}"
state_dir = {state_dir:?}

[[service]]
name = "api"
command = ["true"]
health = {{ type = "tcp", address = "127.0.0.1:1" }}
"#,
                state_dir = state_dir.display().to_string(),
            ),
        )
        .unwrap();
        let log = state_dir.join("agent.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(exe())
            .args(["agent", "--config"])
            .arg(&config)
            .env("ROLLWAVE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_wrong_pin_never_registers() {
    let fleet = Fleet::launch(tls_fleet(0)).await.unwrap();
    let url = fleet.url();
    let ca = ca_file(&fleet);
    let pin = fleet.certs.as_ref().unwrap().pin.to_string();
    let dir = tempfile::tempdir().unwrap();
    let join = fleet
        .create_token("pins", rollwave_core::Role::Join, None)
        .await
        .unwrap();

    // The same agent with the right pin does register.
    let _pinned = Agent::start(dir.path(), "pinned", &url, &ca, &pin, &join.token);
    let fleet = &fleet;
    wait_until("the pinned agent to register", || async move {
        let nodes = fleet.nodes_view().await.ok()?;
        nodes
            .iter()
            .any(|n| n.name == "pinned" && n.online)
            .then_some(())
    })
    .await;

    let wrong = format!("sha256:{}", "0".repeat(64));
    let impostor = &Agent::start(dir.path(), "wrong-pin", &url, &ca, &wrong, &join.token);
    // Once it has logged the refusal, its handshake failed: no hello went out.
    wait_until("the agent to refuse the certificate", || async move {
        let log = impostor.log();
        log.contains("control plane's certificate refused")
            .then_some(())
            .filter(|()| log.contains("not the pinned"))
    })
    .await;
    let out = cli_at(fleet, &url, &["--ca-file", &ca, "nodes", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let nodes: Vec<NodeView> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["pinned"]);
}

/// Runs `rollwave` with `args`, which must exit on its own.
fn run_to_exit(args: &[&str]) -> Output {
    let mut child = Command::new(exe())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("rollwave {args:?} did not exit");
}

#[test]
fn the_server_needs_tls_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let out = run_to_exit(&["server", "--listen", "127.0.0.1:0", "--data-dir", data]);
    let (line, code) = failure(&out);
    assert_eq!(
        line,
        "error: the control plane serves HTTPS: pass --tls-cert and --tls-key (`rollwave certs init` makes a pair), or --insecure-plain-http to serve plain HTTP"
    );
    assert_eq!(code, Some(2));

    // A missing key file is named.
    let certs = dir.path().join("certs");
    let certs_dir = certs.to_str().unwrap();
    assert!(run_to_exit(&["certs", "init", "--dir", certs_dir])
        .status
        .success());
    let cert = certs.join("server.pem");
    let missing = certs.join("missing.key");
    let out = run_to_exit(&[
        "server",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ]);
    let (line, code) = failure(&out);
    assert_eq!(
        line,
        format!(
            "error: reading TLS key {}: no such file or directory",
            missing.display()
        )
    );
    assert_eq!(code, Some(2));
}

#[test]
fn certs_init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_dir = certs.to_str().unwrap();
    let first = run_to_exit(&[
        "certs",
        "init",
        "--dir",
        certs_dir,
        "--host",
        "rollwave.test",
    ]);
    assert!(first.status.success(), "{}", stderr(&first));
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains("localhost, 127.0.0.1, ::1, rollwave.test"),
        "{stdout}"
    );
    let pin = |out: &Output| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("pin: ").map(str::to_string))
            .expect("a pin line")
    };
    let before = std::fs::read(certs.join("ca.key")).unwrap();

    let again = run_to_exit(&["certs", "init", "--dir", certs_dir]);
    let (line, code) = failure(&again);
    assert_eq!(
        line,
        format!(
            "error: {} already exists (pass --force to replace it)",
            certs.join("ca.pem").display()
        )
    );
    assert_eq!(code, Some(2));
    assert_eq!(std::fs::read(certs.join("ca.key")).unwrap(), before);

    let (line, code) = failure(&run_to_exit(&[
        "certs", "init", "--dir", certs_dir, "--host", "a b",
    ]));
    assert_eq!(
        line,
        "error: --host: \"a b\" is not a DNS name or an IP address"
    );
    assert_eq!(code, Some(2));

    let forced = run_to_exit(&["certs", "init", "--dir", certs_dir, "--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_ne!(pin(&forced), pin(&first));
    assert_ne!(std::fs::read(certs.join("ca.key")).unwrap(), before);
}
