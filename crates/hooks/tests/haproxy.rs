//! `rollwave_hooks::haproxy` against a real HAProxy: the agent's drain around
//! a restart switch and the `haproxy` hook kind.
//!
//! Each test starts its own `haproxy -db` (foreground) with a generated
//! configuration in a temp dir: a frontend on a free loopback port and a
//! backend `api` with two servers, `node-1` and `node-2`, which are tiny HTTP
//! servers running in the test itself. They answer with their own name, so a
//! test sees where HAProxy sent each request. `GET /hold` is answered only
//! when the test releases it, which keeps a session open on the server for
//! as long as a test needs, without sleeping and hoping.
//!
//! HAProxy must be installed (`scripts/test.sh` installs it); without it
//! these tests fail rather than pass without testing anything.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rollwave_hooks::haproxy::{Haproxy, HaproxyError, ServerStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

const SERVERS: [&str; 2] = ["node-1", "node-2"];

/// How long a test waits for HAProxy to reach a state it polls for.
const PATIENCE: Duration = Duration::from_secs(10);

/// One HAProxy with its two backend servers.
struct Lb {
    dir: tempfile::TempDir,
    /// Killed (and reaped) on drop, also when a test panics.
    _haproxy: KillOnDrop,
    frontend: u16,
    /// Set to true to answer every held `GET /hold`.
    release: watch::Sender<bool>,
    /// Names of the servers that received a `GET /hold`, in order.
    held: mpsc::UnboundedReceiver<&'static str>,
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Lb {
    async fn start() -> Lb {
        let binary = haproxy_binary();
        let dir = tempfile::tempdir().unwrap();
        let (release, release_rx) = watch::channel(false);
        let (held_tx, held) = mpsc::unbounded_channel();
        let mut backends = Vec::new();
        for name in SERVERS {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            backends.push(listener.local_addr().unwrap());
            tokio::spawn(serve(listener, name, release_rx.clone(), held_tx.clone()));
        }
        let (haproxy, frontend) = start_haproxy(&binary, dir.path(), &backends).await;
        Lb {
            dir,
            _haproxy: haproxy,
            frontend,
            release,
            held,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    fn server(&self, name: &str) -> Haproxy {
        server_at(&self.socket(), name)
    }

    /// `GET path` through HAProxy; returns the name of the server that
    /// answered.
    async fn get(&self, path: &str) -> String {
        get(self.frontend, path).await
    }

    /// Sends `GET /hold` and returns the request (answered once released)
    /// and the name of the server holding it.
    async fn hold(&mut self) -> (tokio::task::JoinHandle<String>, &'static str) {
        let frontend = self.frontend;
        let request = tokio::spawn(async move { get(frontend, "/hold").await });
        let name = tokio::time::timeout(PATIENCE, self.held.recv())
            .await
            .expect("no server received GET /hold")
            .unwrap();
        // Wait for HAProxy to count the session, too.
        let server = self.server(name);
        wait_for(&server, |st| st.current_sessions == 1).await;
        (request, name)
    }
}

fn server_at(socket: &Path, name: &str) -> Haproxy {
    Haproxy {
        socket: socket.to_path_buf(),
        backend: "api".into(),
        server: name.into(),
        timeout: PATIENCE,
    }
}

/// Starts HAProxy in `dir` in front of `backends`; returns it and its
/// frontend port once both servers are UP.
async fn start_haproxy(binary: &Path, dir: &Path, backends: &[SocketAddr]) -> (KillOnDrop, u16) {
    // The frontend port is found by binding port 0 and letting it go, so
    // another process may take it before HAProxy binds it: try again with
    // a new port if so.
    for _attempt in 0..5 {
        let frontend = free_port().await;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global
    stats socket {admin} mode 600 level admin
    stats socket {user} mode 600 level user

defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s

frontend fe
    bind 127.0.0.1:{frontend}
    default_backend api

backend api
    balance roundrobin
    server node-1 {b1} check inter 100ms
    server node-2 {b2} check inter 100ms
",
                admin = dir.join("admin.sock").display(),
                user = dir.join("user.sock").display(),
                b1 = backends[0],
                b2 = backends[1],
            ),
        )
        .unwrap();
        let log = dir.join("haproxy.log");
        let child = Command::new(binary)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut child = KillOnDrop(child);
        match wait_until_up(&mut child, dir).await {
            Ok(()) => return (child, frontend),
            Err(output) if output.contains("cannot bind") => continue,
            Err(output) => panic!("haproxy did not start:\n{output}"),
        }
    }
    panic!("haproxy could not bind a free port five times in a row");
}

/// Waits for the admin socket to answer and both servers to pass their
/// health checks. `Err` carries HAProxy's output if it exited.
async fn wait_until_up(child: &mut KillOnDrop, dir: &Path) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let socket = dir.join("admin.sock");
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let output = std::fs::read_to_string(dir.join("haproxy.log")).unwrap();
            return Err(format!("haproxy exited with {status}:\n{output}"));
        }
        let mut up = 0;
        for name in SERVERS {
            if let Ok(st) = server_at(&socket, name).status().await {
                if st.status == "UP" {
                    up += 1;
                }
            }
        }
        if up == SERVERS.len() {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "haproxy's servers were not both UP after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn haproxy_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy is not installed: run scripts/test.sh, which installs it \
                 (or `apt-get install haproxy`)"
            )
        })
}

async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// A backend server: answers every request with its name, `GET /hold` only
/// once `release` turns true.
async fn serve(
    listener: TcpListener,
    name: &'static str,
    release: watch::Receiver<bool>,
    held: mpsc::UnboundedSender<&'static str>,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let mut release = release.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf).await {
                    // Health checks connect and close without a request.
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head);
            let path = head.split(' ').nth(1).unwrap_or("/");
            if path == "/hold" {
                let _ = held.send(name);
                let _ = release.wait_for(|r| *r).await;
            }
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                name.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// A one-shot HTTP/1.1 GET; returns the body of a 200 response.
async fn get(port: u16, path: &str) -> String {
    let exchange = async {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(PATIENCE, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response within {PATIENCE:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(
        head.starts_with("HTTP/1.1 200 "),
        "GET {path}: {response:?}"
    );
    body.to_string()
}

/// Polls the server's status until `done` holds.
async fn wait_for(server: &Haproxy, done: impl Fn(&ServerStatus) -> bool) -> ServerStatus {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let st = server.status().await.unwrap();
        if done(&st) {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}/{} never reached the expected state; last: {st:?}",
            server.backend,
            server.server
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn other(name: &str) -> &'static str {
    if name == SERVERS[0] {
        SERVERS[1]
    } else {
        SERVERS[0]
    }
}

async fn answers(lb: &Lb, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for _ in 0..n {
        names.push(lb.get("/").await);
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn drain_sends_new_requests_to_the_other_server() {
    let lb = Lb::start().await;
    assert_eq!(answers(&lb, 4).await, ["node-1", "node-2"]);

    let node1 = lb.server("node-1");
    node1.drain().await.unwrap();

    let st = node1.status().await.unwrap();
    assert_eq!(st.status, "DRAIN");
    assert_eq!(st.current_sessions, 0);
    assert_eq!(answers(&lb, 10).await, ["node-2"]);
}

#[tokio::test]
async fn ready_sends_requests_to_a_drained_server_again() {
    let lb = Lb::start().await;
    let node1 = lb.server("node-1");
    node1.drain().await.unwrap();
    assert_eq!(answers(&lb, 4).await, ["node-2"]);

    node1.ready().await.unwrap();

    assert_eq!(node1.status().await.unwrap().status, "UP");
    assert_eq!(answers(&lb, 4).await, ["node-1", "node-2"]);
    // Ready on a ready server is fine: the agent may retry after a crash.
    node1.ready().await.unwrap();
}

#[tokio::test]
async fn drain_waits_for_in_flight_requests_to_finish() {
    let mut lb = Lb::start().await;
    let (request, name) = lb.hold().await;
    let server = lb.server(name);

    let drain = tokio::spawn({
        let server = server.clone();
        async move { server.drain().await }
    });
    wait_for(&server, |st| st.status == "DRAIN").await;
    // New requests go elsewhere while the held one keeps the drain waiting.
    assert_eq!(lb.get("/").await, other(name));
    assert_eq!(server.status().await.unwrap().current_sessions, 1);
    assert!(
        !drain.is_finished(),
        "drain returned while {name} was still serving a request"
    );

    lb.release.send(true).unwrap();
    tokio::time::timeout(PATIENCE, drain)
        .await
        .expect("drain did not return after the request finished")
        .unwrap()
        .unwrap();
    // The in-flight request was served in full by the draining server.
    assert_eq!(request.await.unwrap(), name);
    let st = server.status().await.unwrap();
    assert_eq!((st.status.as_str(), st.current_sessions), ("DRAIN", 0));
}

#[tokio::test]
async fn drain_times_out_when_a_session_stays_open() {
    let mut lb = Lb::start().await;
    let (request, name) = lb.hold().await;
    let server = Haproxy {
        timeout: Duration::from_millis(300),
        ..lb.server(name)
    };

    let started = tokio::time::Instant::now();
    let err = server.drain().await.unwrap_err();

    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        matches!(
            err,
            HaproxyError::DrainTimeout {
                sessions: 1,
                queued: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("api/{name} still has 1 session after 300ms of draining")
    );
    // The server is left draining; the caller decides what comes next.
    assert_eq!(server.status().await.unwrap().status, "DRAIN");
    lb.release.send(true).unwrap();
    assert_eq!(request.await.unwrap(), name);
}

#[tokio::test]
async fn an_unknown_server_is_a_clear_error() {
    let lb = Lb::start().await;
    let socket = lb.socket().display().to_string();
    let node9 = lb.server("node-9");
    for err in [
        node9.drain().await.unwrap_err(),
        node9.ready().await.unwrap_err(),
        node9.status().await.unwrap_err(),
    ] {
        assert!(matches!(err, HaproxyError::NoSuchServer { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("haproxy has no server api/node-9 (socket {socket})")
        );
    }
    let web = Haproxy {
        backend: "web".into(),
        ..lb.server("node-1")
    };
    for err in [
        web.drain().await.unwrap_err(),
        web.status().await.unwrap_err(),
    ] {
        assert_eq!(
            err.to_string(),
            format!("haproxy has no server web/node-1 (socket {socket})")
        );
    }
}

#[tokio::test]
async fn a_socket_without_admin_level_is_refused() {
    let lb = Lb::start().await;
    let socket = lb.dir.path().join("user.sock");
    let node1 = Haproxy {
        socket: socket.clone(),
        ..lb.server("node-1")
    };
    let err = node1.drain().await.unwrap_err();
    assert!(matches!(err, HaproxyError::Refused { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "haproxy refused `set server api/node-1 state drain`: Permission denied (socket {})",
            socket.display()
        )
    );
    // Reading the status is allowed at level user.
    assert_eq!(node1.status().await.unwrap().status, "UP");
}

fn unreachable(socket: &Path) -> Haproxy {
    Haproxy {
        socket: socket.to_path_buf(),
        backend: "api".into(),
        server: "node-1".into(),
        timeout: Duration::from_secs(1),
    }
}

#[tokio::test]
async fn a_missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let err = unreachable(&socket).drain().await.unwrap_err();
    assert!(matches!(err, HaproxyError::Socket { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "haproxy socket {}: no such file or directory",
            socket.display()
        )
    );
}

#[tokio::test]
async fn a_socket_nobody_listens_on_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    // Binding and closing leaves the socket file behind, as a crashed
    // HAProxy does.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let err = unreachable(&socket).status().await.unwrap_err();
    // Another test in this process may be spawning HAProxy while the
    // listener exists; its child holds a copy of the fd until it execs, so
    // the connect can land in that backlog and be reset instead of refused.
    let prefix = format!("haproxy socket {}: ", socket.display());
    let message = err.to_string();
    let reason = message
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{message}"));
    assert!(
        ["connection refused", "connection reset by peer"].contains(&reason),
        "{message}"
    );
}

/// An `haproxy` hook as `rollout.toml` declares it, resolved like one.
fn lb_hook(lb: &Lb, state: &str, server: Option<&str>) -> rollwave_core::Hook {
    let file = rollwave_core::HooksFile {
        pre_node: vec![rollwave_core::HookFile {
            kind: Some("haproxy".into()),
            haproxy_socket: Some(lb.socket().display().to_string()),
            backend: Some("api".into()),
            server: server.map(str::to_string),
            state: Some(state.into()),
            timeout: Some("10s".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    file.resolve().unwrap().pre_node.remove(0)
}

fn on_node(node: &str) -> rollwave_hooks::HookContext {
    rollwave_hooks::HookContext {
        env: [("ROLLWAVE_NODE".to_string(), node.to_string())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn haproxy_hooks_drain_and_re_enable_the_node_they_run_on() {
    let lb = Lb::start().await;
    let client = rollwave_hooks::client().unwrap();
    let ctx = on_node("node-1");

    let report = rollwave_hooks::run(&lb_hook(&lb, "drain", None), &ctx, &client).await;

    assert!(report.ok, "{report:?}");
    assert_eq!(report.output, "api/node-1 drained");
    assert!(
        report
            .summary()
            .starts_with("hook hooks.pre_node[0] ok in "),
        "{}",
        report.summary()
    );
    assert_eq!(lb.server("node-1").status().await.unwrap().status, "DRAIN");
    assert_eq!(answers(&lb, 6).await, ["node-2"]);

    let report = rollwave_hooks::run(&lb_hook(&lb, "ready", None), &ctx, &client).await;

    assert!(report.ok, "{report:?}");
    assert_eq!(report.output, "api/node-1 ready");
    assert_eq!(lb.server("node-1").status().await.unwrap().status, "UP");
    assert_eq!(answers(&lb, 4).await, ["node-1", "node-2"]);
}

#[tokio::test]
async fn an_haproxy_hook_for_a_server_haproxy_lacks_fails_naming_it() {
    let lb = Lb::start().await;
    let client = rollwave_hooks::client().unwrap();
    let hook = lb_hook(&lb, "drain", Some("web-{node}"));

    let report = rollwave_hooks::run(&hook, &on_node("node-1"), &client).await;

    assert!(!report.ok);
    assert_eq!(
        report.error.as_deref(),
        Some(
            format!(
                "haproxy has no server api/web-node-1 (socket {})",
                lb.socket().display()
            )
            .as_str()
        )
    );
    // Nothing else was touched.
    assert_eq!(answers(&lb, 4).await, ["node-1", "node-2"]);
}
