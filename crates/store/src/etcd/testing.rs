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
    members: Vec<Child>,
    /// The first member's client URL.
    pub endpoint: String,
    /// Every member's client URL.
    pub endpoints: Vec<String>,
    dir: std::path::PathBuf,
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        for child in &mut self.members {
            let _ = child.kill();
            let _ = child.wait();
        }
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
    /// One member.
    pub async fn start() -> TestEtcd {
        TestEtcd::cluster(1).await
    }

    /// A cluster of `n` members, each on its own ports and data dir.
    pub async fn cluster(n: usize) -> TestEtcd {
        'attempt: for _ in 0..10 {
            let dir = std::env::temp_dir().join(format!("rollwave-etcd-{}", random_id().unwrap()));
            std::fs::create_dir_all(&dir).unwrap();
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let endpoints: Vec<String> = ports
                .iter()
                .map(|(c, _)| format!("http://127.0.0.1:{c}"))
                .collect();
            let initial: Vec<String> = ports
                .iter()
                .enumerate()
                .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
                .collect();
            let mut members = Vec::new();
            for (i, (client, peer)) in ports.iter().enumerate() {
                let endpoint = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let child = Command::new("etcd")
                    .args([
                        "--name",
                        &format!("m{i}"),
                        "--data-dir",
                        dir.join(format!("data-{i}")).to_str().unwrap(),
                        "--listen-client-urls",
                        &endpoint,
                        "--advertise-client-urls",
                        &endpoint,
                        "--listen-peer-urls",
                        &peer_url,
                        "--initial-advertise-peer-urls",
                        &peer_url,
                        "--initial-cluster",
                        &initial.join(","),
                        "--initial-cluster-token",
                        "rollwave-test",
                    ])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join(format!("etcd-{i}.log"))).unwrap())
                    .spawn()
                    .expect("starting etcd (Debian: apt install etcd-server)");
                members.push(child);
            }
            let mut etcd = TestEtcd {
                members,
                endpoint: endpoints[0].clone(),
                endpoints,
                dir,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if etcd
                    .members
                    .iter_mut()
                    .any(|c| c.try_wait().unwrap().is_some())
                {
                    // A port was taken meanwhile: try others.
                    continue 'attempt;
                }
                let options = EtcdOptions {
                    endpoints: etcd.endpoints.clone(),
                    ..Default::default()
                };
                if Client::connect(&etcd.endpoints, None).await.is_ok()
                    && EtcdStore::connect(&options).await.is_ok()
                {
                    return etcd;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("etcd did not start");
    }

    /// The members' process ids, to pause or stop some.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(Child::id).collect()
    }

    /// The store URL of every member, for `--store`.
    pub fn store_url(&self) -> String {
        let hosts: Vec<&str> = self
            .endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    pub async fn store(&self, prefix: &str) -> EtcdStore {
        EtcdStore::connect(&EtcdOptions {
            endpoints: self.endpoints.clone(),
            prefix: prefix.into(),
            ..Default::default()
        })
        .await
        .unwrap()
    }
}
