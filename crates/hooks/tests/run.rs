//! `rollwave_hooks::run` against real processes and a real HTTP listener.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rollwave_core::{Hook, HookAction, HookReport, OnError};
use rollwave_hooks::HookContext;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long a test waits for an effect it polls for; only a broken build
/// waits this long.
const PATIENCE: Duration = Duration::from_secs(20);

fn exec(command: &[&str], timeout_ms: u64, retries: u32) -> Hook {
    Hook {
        name: "hooks.pre_node[0]".into(),
        action: HookAction::Exec {
            command: command.iter().map(|s| s.to_string()).collect(),
        },
        timeout: timeout_ms,
        retries,
        on_error: OnError::Fail,
    }
}

fn http(url: &str, slack: bool, timeout_ms: u64, retries: u32) -> Hook {
    Hook {
        name: "hooks.on_success[0]".into(),
        action: HookAction::Http {
            url: url.into(),
            slack,
        },
        timeout: timeout_ms,
        retries,
        on_error: OnError::Fail,
    }
}

async fn run(hook: &Hook, ctx: &HookContext) -> HookReport {
    let client = rollwave_hooks::client().unwrap();
    rollwave_hooks::run(hook, ctx, &client).await
}

async fn run_sh(script: &str) -> HookReport {
    run(
        &exec(&["sh", "-c", script], 20_000, 0),
        &HookContext::default(),
    )
    .await
}

#[tokio::test]
async fn exec_success_keeps_stdout_and_stderr() {
    let r = run_sh("echo hello; echo warning >&2").await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.name, "hooks.pre_node[0]");
    assert_eq!((r.attempts, r.exit_code, r.http_status), (1, Some(0), None));
    assert_eq!(r.error, None);
    assert!(r.output.contains("hello\n"), "{r:?}");
    assert!(r.output.contains("warning\n"), "{r:?}");
}

#[tokio::test]
async fn exec_nonzero_exit_fails_with_its_output() {
    let r = run_sh("echo 'database locked' >&2; exit 3").await;
    assert!(!r.ok);
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.error.as_deref(), Some("exited 3"));
    assert_eq!(r.output, "database locked\n");
    assert!(
        r.summary()
            .starts_with("hook hooks.pre_node[0] failed: exited 3 in "),
        "{}",
        r.summary()
    );
    assert!(
        r.summary().ends_with(": database locked"),
        "{}",
        r.summary()
    );

    let r = run_sh("kill -9 $$").await;
    assert_eq!(r.error.as_deref(), Some("killed by signal 9"));
    assert_eq!(r.exit_code, None);
}

#[tokio::test]
async fn exec_keeps_the_last_4kib_of_output() {
    let r = run_sh("i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done").await;
    assert!(r.ok);
    assert!(r.output.len() <= 4096, "{}", r.output.len());
    assert!(r.output.len() > 4000, "{}", r.output.len());
    assert!(r.output.ends_with("line1998\nline1999\n"));
    assert!(!r.output.contains("line0\n"));
}

#[tokio::test]
async fn exec_gets_the_context_env_and_dir_and_inherits_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = HookContext {
        env: BTreeMap::from([
            ("ROLLWAVE_HOOK".to_string(), "pre_node".to_string()),
            ("ROLLWAVE_VERSION".to_string(), "2.0.0".to_string()),
        ]),
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let script = r#"echo "$ROLLWAVE_HOOK $ROLLWAVE_VERSION path=${PATH:+set} $(pwd -P)""#;
    let r = run(&exec(&["sh", "-c", script], 20_000, 0), &ctx).await;
    assert!(r.ok, "{r:?}");
    let here = dir.path().canonicalize().unwrap();
    assert_eq!(
        r.output,
        format!("pre_node 2.0.0 path=set {}\n", here.display())
    );
}

#[tokio::test]
async fn exec_that_cannot_start_is_a_plain_failure() {
    let r = run(
        &exec(&["/nonexistent/rollwave-hook", "--x"], 20_000, 0),
        &HookContext::default(),
    )
    .await;
    assert!(!r.ok);
    assert_eq!(
        r.error.as_deref(),
        Some("cannot run /nonexistent/rollwave-hook: no such file or directory")
    );
    assert_eq!((r.attempts, r.exit_code), (1, None));
}

#[tokio::test]
async fn exec_times_out() {
    let r = run(&exec(&["sleep", "30"], 300, 0), &HookContext::default()).await;
    assert!(!r.ok);
    assert_eq!(r.error.as_deref(), Some("timed out after 300ms"));
    assert_eq!(r.exit_code, None);
    assert!(
        r.summary()
            .starts_with("hook hooks.pre_node[0] failed: timed out after 300ms in "),
        "{}",
        r.summary()
    );
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
async fn exec_timeout_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "sleep 30 & echo $! > {0}.tmp; mv {0}.tmp {0}; wait",
        pidfile.display()
    );
    // The timeout must leave the shell time to start its child; on a
    // machine too loaded for that, try again with more.
    let mut timeout = 1_000;
    let r = loop {
        let r = run(
            &exec(&["sh", "-c", &script], timeout, 0),
            &HookContext::default(),
        )
        .await;
        if pidfile.exists() || timeout >= 16_000 {
            break r;
        }
        timeout *= 4;
    };
    assert_eq!(
        r.error,
        Some(format!(
            "timed out after {}",
            rollwave_core::format_duration(timeout)
        ))
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The kill is immediate; the patience only covers the kernel and the
    // reaper.
    let deadline = std::time::Instant::now() + PATIENCE;
    while alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "grandchild {pid} survived the timeout");
}

#[tokio::test]
async fn dropping_the_run_kills_the_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "sleep 30 & echo $! > {0}.tmp; mv {0}.tmp {0}; wait",
        pidfile.display()
    );
    let hook = exec(&["sh", "-c", &script], 60_000, 0);
    let client = rollwave_hooks::client().unwrap();
    let ctx = HookContext::default();
    // Boxed, so that dropping it drops the future itself.
    let mut running = Box::pin(rollwave_hooks::run(&hook, &ctx, &client));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // Drives the hook until the grandchild exists, then gives up on it.
    while !pidfile.exists() {
        tokio::select! {
            r = &mut running => panic!("hook ended early: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "no pid file");
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    drop(running);
    let deadline = std::time::Instant::now() + PATIENCE;
    while alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "grandchild {pid} survived the dropped run");
}

fn counter_script(counter: &Path, succeed_on: u32) -> String {
    format!(
        r#"n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo "attempt $n"; [ $n -ge {succeed_on} ]"#,
        c = counter.display()
    )
}

#[tokio::test]
async fn exec_retries_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let script = counter_script(&counter, 3);
    let r = run(
        &exec(&["sh", "-c", &script], 20_000, 5),
        &HookContext::default(),
    )
    .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.attempts, 3);
    assert_eq!((r.exit_code, r.error.as_deref()), (Some(0), None));
    assert_eq!(r.output, "attempt 3\n");
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "3\n");
    assert!(r.summary().contains("after 3 attempts"), "{}", r.summary());
}

#[tokio::test]
async fn exec_gives_up_after_its_retries() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("counter");
    let script = counter_script(&counter, 10);
    let r = run(
        &exec(&["sh", "-c", &script], 20_000, 1),
        &HookContext::default(),
    )
    .await;
    assert!(!r.ok);
    assert_eq!(r.attempts, 2);
    assert_eq!(r.error.as_deref(), Some("exited 1"));
    assert_eq!(r.output, "attempt 2\n");
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "2\n");
}

/// A request as the listener received it.
#[derive(Debug)]
struct Received {
    request_line: String,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Answers every request with `response` (raw, status line included), or
/// never answers if it is `None`; sends each request it read on the channel.
async fn serve(response: Option<String>) -> (String, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (tx, response) = (tx.clone(), response.clone());
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i;
                    }
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
                let mut lines = head.split("\r\n");
                let request_line = lines.next().unwrap_or_default().to_string();
                let headers: BTreeMap<String, String> = lines
                    .filter_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    })
                    .collect();
                let length: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mut body = raw[head_end + 4..].to_vec();
                while body.len() < length {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(Received {
                    request_line,
                    headers,
                    body: String::from_utf8_lossy(&body).to_string(),
                });
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
    (format!("http://{addr}"), rx)
}

fn response(status: &str, body: &str) -> Option<String> {
    Some(format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ))
}

fn event_ctx() -> HookContext {
    HookContext {
        event: serde_json::json!({
            "hook": "post_node",
            "rollout": 7,
            "node": "n1",
            "message": "post_node of rollout 7: api 2.0.0 on n1",
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn http_posts_the_event_as_json() {
    let (base, mut got) = serve(response("200 OK", "thanks")).await;
    let url = format!("{base}/hooks/rollwave?token=x");
    let ctx = event_ctx();
    let r = run(&http(&url, false, 20_000, 0), &ctx).await;
    assert!(r.ok, "{r:?}");
    assert_eq!((r.http_status, r.exit_code), (Some(200), None));
    assert_eq!((r.attempts, r.error.as_deref()), (1, None));
    assert_eq!(r.output, "thanks");
    assert!(
        r.summary()
            .starts_with("hook hooks.on_success[0] answered 200 in "),
        "{}",
        r.summary()
    );

    let req = got.recv().await.unwrap();
    assert_eq!(req.request_line, "POST /hooks/rollwave?token=x HTTP/1.1");
    assert_eq!(req.headers["content-type"], "application/json");
    let posted: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(posted, ctx.event);
}

#[tokio::test]
async fn http_slack_posts_a_text_line() {
    let (base, mut got) = serve(response("200 OK", "ok")).await;
    let r = run(&http(&base, true, 20_000, 0), &event_ctx()).await;
    assert!(r.ok, "{r:?}");
    let req = got.recv().await.unwrap();
    assert_eq!(req.headers["content-type"], "application/json");
    let posted: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(
        posted,
        serde_json::json!({ "text": "post_node of rollout 7: api 2.0.0 on n1" })
    );

    // Without a message, the event itself, on one line.
    let ctx = HookContext {
        event: serde_json::json!({ "hook": "pre_rollout", "rollout": 7 }),
        ..Default::default()
    };
    let r = run(&http(&base, true, 20_000, 0), &ctx).await;
    assert!(r.ok, "{r:?}");
    let req = got.recv().await.unwrap();
    let posted: serde_json::Value = serde_json::from_str(&req.body).unwrap();
    assert_eq!(
        posted,
        serde_json::json!({ "text": r#"{"hook":"pre_rollout","rollout":7}"# })
    );
}

#[tokio::test]
async fn http_error_status_fails_and_is_retried() {
    let long = "x".repeat(5000);
    let (base, mut got) = serve(response(
        "500 Internal Server Error",
        &format!("queue full {long}"),
    ))
    .await;
    let r = run(&http(&base, false, 20_000, 1), &event_ctx()).await;
    assert!(!r.ok);
    assert_eq!(r.attempts, 2);
    assert_eq!(r.http_status, Some(500));
    assert_eq!(r.error.as_deref(), Some("http 500"));
    assert!(r.output.starts_with("queue full xxx"), "{}", r.output);
    assert_eq!(r.output.len(), 1024);
    assert!(got.recv().await.is_some());
    assert!(got.recv().await.is_some());
}

#[tokio::test]
async fn http_does_not_follow_redirects() {
    let (target, mut reached) = serve(response("200 OK", "")).await;
    let (base, _got) = serve(Some(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )))
    .await;
    let r = run(&http(&base, false, 20_000, 0), &event_ctx()).await;
    assert_eq!(r.error.as_deref(), Some("http 307"));
    assert!(reached.try_recv().is_err());
}

#[tokio::test]
async fn http_unreachable_names_only_the_origin() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let r = run(
        &http(
            &format!("http://{addr}/services/T000/B000/secret"),
            true,
            20_000,
            0,
        ),
        &event_ctx(),
    )
    .await;
    assert!(!r.ok);
    assert_eq!(
        r.error,
        Some(format!("cannot reach http://{addr}: connection refused"))
    );
    assert_eq!(r.http_status, None);
    assert!(!r.summary().contains("secret"), "{}", r.summary());
}

#[tokio::test]
async fn http_times_out() {
    let (base, _got) = serve(None).await;
    let r = run(&http(&base, false, 300, 0), &event_ctx()).await;
    assert_eq!(r.error.as_deref(), Some("timed out after 300ms"));
    assert_eq!(r.http_status, None);
}
