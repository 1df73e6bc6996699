//! The agent's local endpoint (`rollwave_agent::local`) served on a real Unix
//! socket and queried over it with plain HTTP/1.1, as a service would.

use std::collections::BTreeMap;
use std::path::Path;

use rollwave_agent::layout::ServiceDirs;
use rollwave_agent::local;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Status, content type and body of `GET path` over the socket.
async fn get(socket: &Path, path: &str) -> (u16, String, String) {
    let mut conn = UnixStream::connect(socket).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

fn services(state_dir: &Path, names: &[&str]) -> BTreeMap<String, ServiceDirs> {
    names
        .iter()
        .map(|n| {
            let dirs = ServiceDirs::new(state_dir, n);
            dirs.create().unwrap();
            (n.to_string(), dirs)
        })
        .collect()
}

#[tokio::test]
async fn serves_active_versions_on_the_agent_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");
    let dirs = services(tmp.path(), &["api", "web"]);
    let listener = local::bind(&socket).unwrap();
    let server = tokio::spawn(local::serve(listener, local::router(dirs.clone())));

    let (status, _, body) = get(&socket, "/v1/services/api/active-version").await;
    assert_eq!(
        (status, body.as_str()),
        (404, "no active version set for service api\n")
    );
    let (status, _, body) = get(&socket, "/v1/services/x/active-version").await;
    assert_eq!(
        (status, body.as_str()),
        (404, "no service named x on this node\n")
    );
    let (status, _, body) = get(&socket, "/v1/active-versions").await;
    assert_eq!((status, body.as_str()), (200, "{}"));

    dirs["api"].write_active_version("2.0.0").unwrap();
    let (status, content_type, body) = get(&socket, "/v1/services/api/active-version").await;
    assert_eq!((status, body.as_str()), (200, "2.0.0\n"));
    assert!(content_type.starts_with("text/plain"), "{content_type}");

    // Read from the file on every request: a change shows at once.
    dirs["api"].write_active_version("2.1.0").unwrap();
    dirs["web"].write_active_version("7.0.0").unwrap();
    let (_, _, body) = get(&socket, "/v1/services/api/active-version").await;
    assert_eq!(body, "2.1.0\n");
    let (status, content_type, body) = get(&socket, "/v1/active-versions").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let all: BTreeMap<String, String> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        all,
        BTreeMap::from([
            ("api".to_string(), "2.1.0".to_string()),
            ("web".to_string(), "7.0.0".to_string())
        ])
    );
    server.abort();
}

#[tokio::test]
async fn replaces_a_stale_socket_but_not_a_live_one() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("agent.sock");

    // A socket file left by an agent that died: nothing listens on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let listener = local::bind(&socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);

    // While it is served, a second agent on the same state dir is refused.
    let err = local::bind(&socket).unwrap_err().to_string();
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(err.contains("another agent is serving it"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    drop(listener);

    // Anything else at the path is not ours to delete.
    let file = tmp.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let err = local::bind(&file).unwrap_err().to_string();
    assert!(
        err.contains("not-a-socket: exists and is not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}
