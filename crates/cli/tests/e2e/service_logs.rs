//! Each service's output in its own rotated log on its node, kept out of
//! the agent's own log, carried on across an agent restart, and served by
//! `rollwave logs --node N --service S` through the control plane.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rollwave::fleet::{Fleet, FleetSpec};

use crate::harness::*;

const MAX_SIZE: u64 = 4096;
const KEEP: usize = 2;
/// How long a test waits for output it expects; only a broken build waits
/// this long.
const PATIENCE: Duration = Duration::from_secs(60);

fn logs_dir(fleet: &Fleet, i: usize) -> std::path::PathBuf {
    fleet.nodes[i].state_dir.join("logs")
}

/// The service's log on disk, oldest file first, as one text.
fn on_disk(dir: &Path) -> String {
    let mut text = String::new();
    for n in (1..=KEEP + 1).rev() {
        text.push_str(
            &std::fs::read_to_string(dir.join(format!("api.log.{n}"))).unwrap_or_default(),
        );
    }
    text.push_str(&std::fs::read_to_string(dir.join("api.log")).unwrap_or_default());
    text
}

async fn wait_on_disk(dir: &Path, needle: &str) -> String {
    wait_until(&format!("{needle:?} in {}", dir.display()), || async {
        let text = on_disk(dir);
        text.contains(needle).then_some(text)
    })
    .await
}

/// Requests `/<prefix>-NNNN` one after another, each a line of the
/// service's output.
async fn requests(port: u16, prefix: &str, n: usize) {
    let client = reqwest::Client::new();
    for i in 0..n {
        let resp = client
            .get(format!("http://127.0.0.1:{port}/{prefix}-{i:04}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
}

fn request_line(prefix: &str, i: usize) -> String {
    format!("GET /{prefix}-{i:04} 404")
}

/// The stamp and the rest of a log line.
fn split(line: &str) -> (std::time::SystemTime, &str) {
    let (stamp, rest) = line.split_once(' ').unwrap();
    let t = humantime::parse_rfc3339(stamp).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    (t, rest)
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn assert_refused(out: &std::process::Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(needle), "{stderr:?} should say {needle:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
}

/// `rollwave logs --follow ...`, its stdout read line by line.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn start(fleet: &Fleet, args: &[&str]) -> Follower {
        let mut child = fleet
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Follower { child, lines }
    }

    /// Lines until one contains `needle`, which is the last.
    fn until(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(PATIENCE) {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(e) => panic!("no {needle:?} followed ({e}); saw {seen:?}"),
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn service_output_is_kept_rotated_and_served_across_agent_restarts() {
    let mut spec = FleetSpec::new(exe().into(), 2);
    spec.agent_settings = vec![format!(
        "logs = {{ max_size = \"{}KiB\", keep = {KEEP} }}",
        MAX_SIZE / 1024
    )];
    let mut fleet = installed(spec).await;
    let dir = logs_dir(&fleet, 0);
    let port = fleet.nodes[0].port;
    let agent_log = fleet.nodes[0].state_dir.join("agent.log");

    // The service's start is in its log, stamped, and not in the agent's.
    let text = wait_on_disk(&dir, "api 1.0.0 serving").await;
    for line in text.lines() {
        split(line);
    }
    let out = stdout(&cli(
        &fleet,
        &["logs", "--node", "node-1", "--service", "api"],
    ));
    assert!(out.contains("api 1.0.0 serving (pid "), "{out}");
    assert_eq!(out, text, "the whole log, as on disk");

    // Enough output to rotate several times: the files stay under
    // max_size, `keep` of them are kept, and what they hold is an
    // unbroken run of the newest lines.
    requests(port, "a", 300).await;
    let text = wait_on_disk(&dir, &request_line("a", 299)).await;
    for n in 1..=KEEP {
        assert!(dir.join(format!("api.log.{n}")).exists(), "api.log.{n}");
    }
    assert!(!dir.join(format!("api.log.{}", KEEP + 1)).exists());
    for name in ["api.log", "api.log.1", "api.log.2"] {
        let len = std::fs::metadata(dir.join(name)).unwrap().len();
        assert!(len <= MAX_SIZE, "{name} holds {len} bytes");
    }
    let kept: Vec<&str> = text
        .lines()
        .map(|l| split(l).1)
        .filter(|l| l.starts_with("GET /a-"))
        .collect();
    let first = 300 - kept.len();
    assert!(first > 0, "rotation dropped nothing: {} lines", kept.len());
    let want: Vec<String> = (first..300).map(|i| request_line("a", i)).collect();
    assert_eq!(kept, want);

    // The whole of what is kept, through the control plane.
    let out = stdout(&cli(
        &fleet,
        &["logs", "--node", "node-1", "--service", "api"],
    ));
    assert_eq!(out, text);

    // --since: only what was written from then on.
    requests(port, "b", 5).await;
    let text = wait_on_disk(&dir, &request_line("b", 4)).await;
    let b0 = text
        .lines()
        .find(|l| l.ends_with(&request_line("b", 0)))
        .unwrap();
    let since = b0.split_once(' ').unwrap().0;
    let out = stdout(&cli(
        &fleet,
        &[
            "logs",
            "--node",
            "node-1",
            "--service",
            "api",
            "--since",
            since,
        ],
    ));
    // The control plane takes times to the millisecond.
    let (t, _) = split(b0);
    let ms = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let from = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    let want: String = text
        .lines()
        .filter(|l| split(l).0 >= from)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(out, want);
    assert!(out.contains(&request_line("b", 0)) && out.contains(&request_line("b", 4)));
    assert!(!out.contains(&request_line("a", first)), "{out}");
    let hour = stdout(&cli(
        &fleet,
        &[
            "logs",
            "--node",
            "node-1",
            "--service",
            "api",
            "--since",
            "1h",
        ],
    ));
    assert_eq!(hour, text);

    // --json: a line as its time and its text.
    let json = stdout(&cli(
        &fleet,
        &[
            "logs",
            "--node",
            "node-1",
            "--service",
            "api",
            "--since",
            since,
            "--json",
        ],
    ));
    let last: serde_json::Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    assert_eq!(last["line"], request_line("b", 4));
    assert!(humantime::parse_rfc3339(last["time"].as_str().unwrap()).is_ok());

    // The agent is killed; the service it supervised goes on serving and
    // writing; a new agent re-adopts it and its output lands in the same
    // log, nothing of it lost.
    fleet.kill_agent(0);
    requests(port, "c", 10).await;
    fleet.start_agent(0).unwrap();
    fleet.wait_online(2).await.unwrap();
    requests(port, "d", 1).await;
    let text = wait_on_disk(&dir, &request_line("d", 0)).await;
    let after: Vec<&str> = text
        .lines()
        .map(|l| split(l).1)
        .filter(|l| l.starts_with("GET /c-") || l.starts_with("GET /d-"))
        .collect();
    let mut want: Vec<String> = (0..10).map(|i| request_line("c", i)).collect();
    want.push(request_line("d", 0));
    assert_eq!(after, want);
    let out = stdout(&cli(
        &fleet,
        &["logs", "--node", "node-1", "--service", "api"],
    ));
    assert!(out.contains(&request_line("d", 0)), "{out}");

    // A new version started by handoff (through the listen-exec shim) is
    // captured too, and the old one's last words.
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.min_healthy_time = Some("0s".into()))
        .await
        .unwrap();
    assert!(wait_done(&fleet, r.id).await.fully_upgraded());
    let text = wait_on_disk(&dir, "api 2.0.0 serving").await;
    wait_on_disk(&dir, "stopping: draining").await;
    assert!(text.contains("api 2.0.0 serving (pid "));

    // None of it in the agent's own log, nor in the other node's.
    let agent = std::fs::read_to_string(&agent_log).unwrap();
    for needle in ["serving (pid", "GET /", "draining"] {
        assert!(!agent.contains(needle), "agent.log has {needle:?}");
    }
    assert!(!on_disk(&logs_dir(&fleet, 1)).contains("GET /a-"));
}

#[tokio::test(flavor = "multi_thread")]
async fn following_a_service_shows_new_lines_and_ends_quietly_into_a_closed_pipe() {
    let fleet = installed_fleet(1).await;
    let dir = logs_dir(&fleet, 0);
    let port = fleet.nodes[0].port;
    wait_on_disk(&dir, "api 1.0.0 serving").await;

    let args = ["logs", "--node", "node-1", "--service", "api", "--follow"];
    let follower = Follower::start(&fleet, &args);
    // What the log held, then what is written while following.
    follower.until("api 1.0.0 serving");
    requests(port, "live", 3).await;
    let seen = follower.until(&request_line("live", 2));
    let bodies: Vec<&str> = seen.iter().map(|l| split(l).1).collect();
    let want: Vec<String> = (0..3).map(|i| request_line("live", i)).collect();
    assert_eq!(bodies, want);

    // Its reader gone (`| head -1`), the follower ends at its next line,
    // quietly.
    let mut head = fleet
        .command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = head.stdout.take().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert!(line.contains("api 1.0.0 serving"), "{line:?}");
    })
    .await
    .unwrap();
    let status = wait_until("the follower to end", || {
        let polled = head.try_wait().unwrap();
        async move {
            if polled.is_none() {
                requests(port, "more", 1).await;
            }
            polled
        }
    })
    .await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(head.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stderr, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn service_log_requests_that_cannot_be_answered_are_refused() {
    let mut fleet = installed_fleet(2).await;
    let http = fleet.http();
    let base = fleet.url();
    let url = |node: &str, service: &str, query: &str| {
        format!(
            "{base}{}{query}",
            rollwave_api::service_logs_path(node, service)
        )
    };
    let status = |url: String| {
        let http = http.clone();
        async move {
            let resp = http.get(url).send().await.unwrap();
            let status = resp.status().as_u16();
            let body: rollwave_api::ErrorBody = resp.json().await.unwrap();
            (status, body.error.message)
        }
    };
    let (code, msg) = status(url("nope", "api", "")).await;
    assert_eq!((code, msg.as_str()), (404, "node \"nope\" not found"));
    let (code, msg) = status(url("node-1", "nope", "")).await;
    assert_eq!(
        (code, msg.as_str()),
        (404, "node \"node-1\" has no service \"nope\"")
    );
    let (code, msg) = status(url("node-1", "api", "?since=yesterday")).await;
    assert_eq!(code, 400);
    assert!(msg.starts_with("since: \"yesterday\" is neither"), "{msg}");
    let (code, msg) = status(url("node-1", "api", "?follow=maybe")).await;
    assert_eq!(
        (code, msg.as_str()),
        (400, "follow: \"maybe\" is not true or false")
    );

    let out = cli(&fleet, &["logs", "--node", "nope", "--service", "api"]);
    assert_refused(&out, 2, "node \"nope\" not found");
    let out = cli(&fleet, &["logs", "--node", "node-1", "--service", "nope"]);
    assert_refused(&out, 2, "node \"node-1\" has no service \"nope\"");
    let out = cli(
        &fleet,
        &[
            "logs",
            "--node",
            "node-1",
            "--service",
            "api",
            "--since",
            "yesterday",
        ],
    );
    assert_refused(&out, 2, "since: \"yesterday\" is neither a duration");
    let out = cli(&fleet, &["logs", "--service", "api"]);
    assert_refused(&out, 2, "--service: also name the node");
    let out = cli(&fleet, &["logs", "--since", "10m"]);
    assert_refused(&out, 2, "--since: only with --service");
    let out = cli(
        &fleet,
        &["logs", "1", "--node", "node-1", "--service", "api"],
    );
    assert_refused(
        &out,
        2,
        "--service: shows a service's output, not rollout 1's log",
    );
    let out = cli(&fleet, &["logs", "--node", "a b", "--service", "api"]);
    assert_refused(&out, 2, "--node: \"a b\" is not a node name");

    // An offline node's output cannot be read: its agent holds it.
    fleet.kill_agent(1);
    wait_until("node-2 to be offline", || async {
        nodes(&fleet)
            .await
            .into_iter()
            .any(|n| n.name == "node-2" && !n.online)
            .then_some(())
    })
    .await;
    let (code, msg) = status(url("node-2", "api", "")).await;
    assert_eq!(
        (code, msg.as_str()),
        (
            503,
            "node \"node-2\" is offline: its logs are read from its agent"
        )
    );
    let out = cli(&fleet, &["logs", "--node", "node-2", "--service", "api"]);
    assert_refused(&out, 1, "node \"node-2\" is offline");
    // The rollout log keeps its own --node.
    let out = cli(&fleet, &["logs", "1", "--node", "node-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
