//! A real etcd for tests (Debian's `etcd-server`): one member on loopback,
//! in a directory of its own, killed and removed when dropped. Used by this
//! crate's tests and by the end-to-end tests of replicated control planes.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

use super::{random_id, EtcdOptions, EtcdStore};

/// One etcd member, killed when dropped.
pub struct TestEtcd {
    child: Child,
    pub endpoint: String,
    dir: std::path::PathBuf,
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port below the kernel's range for outgoing connections (32768 and
/// up), free when checked; etcd takes a port number, not a socket, so a
/// race with another test is possible and is retried by the caller.
pub fn free_port() -> u16 {
    loop {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).unwrap();
        let port = 20_000 + u16::from_le_bytes(b) % 12_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl TestEtcd {
    pub async fn start() -> TestEtcd {
        for _ in 0..10 {
            let dir = std::env::temp_dir().join(format!("rollwave-etcd-{}", random_id().unwrap()));
            std::fs::create_dir_all(&dir).unwrap();
            let (client, peer) = (free_port(), free_port());
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut child = Command::new("etcd")
                .args([
                    "--name",
                    "test",
                    "--data-dir",
                    dir.join("data").to_str().unwrap(),
                    "--listen-client-urls",
                    &endpoint,
                    "--advertise-client-urls",
                    &endpoint,
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                    "--initial-cluster",
                    &format!("test={peer_url}"),
                ])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
                .spawn()
                .expect("starting etcd (Debian: apt install etcd-server)");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break; // a port was taken meanwhile: try others
                }
                let options = EtcdOptions {
                    endpoints: vec![endpoint.clone()],
                    ..Default::default()
                };
                if Client::connect([&endpoint], None).await.is_ok()
                    && EtcdStore::connect(&options).await.is_ok()
                {
                    return TestEtcd {
                        child,
                        endpoint,
                        dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("etcd did not start");
    }

    pub async fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::connect(&EtcdOptions {
            endpoints: vec![self.endpoint.clone()],
            prefix: prefix.into(),
            ..Default::default()
        })
        .await
        .unwrap()
    }
}
