//! A load generator for the demo and the tests: a fresh connection per
//! request, so a refused connection during a switch is counted, as a real
//! client would see it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    /// Responses by the version they reported.
    pub versions: BTreeMap<String, u64>,
    /// A few failures, for the summary.
    pub errors: Vec<String>,
}

pub struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<Mutex<LoadStats>>,
}

impl Load {
    /// Starts `workers` loops, each going round the `targets` (base URLs),
    /// pausing `pace` between requests so the load leaves CPU for the fleet.
    pub fn start(targets: Vec<String>, workers: usize, pace: Duration) -> Load {
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let tasks = (0..workers.max(1))
            .map(|w| {
                let targets = targets.clone();
                let stats = stats.clone();
                let stop_rx = stop_rx.clone();
                tokio::spawn(async move { worker(w, targets, stats, stop_rx, pace).await })
            })
            .collect();
        Load { stop, tasks, stats }
    }

    pub fn snapshot(&self) -> LoadStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn stop(self) -> LoadStats {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        stats
    }
}

async fn worker(
    offset: usize,
    targets: Vec<String>,
    stats: Arc<Mutex<LoadStats>>,
    stop: watch::Receiver<bool>,
    pace: Duration,
) {
    let Ok(client) = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return;
    };
    let mut i = offset;
    while !*stop.borrow() {
        let url = &targets[i % targets.len()];
        i += 1;
        let result = match client.get(url).send().await {
            Ok(resp) if resp.status().is_success() => match resp.text().await {
                Ok(body) => Ok(body.split_whitespace().nth(1).unwrap_or("?").to_string()),
                Err(e) => Err(format!("{url}: reading body: {e}")),
            },
            Ok(resp) => Err(format!("{url}: http {}", resp.status())),
            Err(e) => Err(format!("{url}: {}", error_chain(&e))),
        };
        {
            let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
            record(&mut s, result);
        }
        tokio::time::sleep(pace).await;
    }
}

fn record(s: &mut LoadStats, result: Result<String, String>) {
    match result {
        Ok(version) => {
            s.ok += 1;
            *s.versions.entry(version).or_default() += 1;
        }
        Err(e) => {
            s.failed += 1;
            if s.errors.len() < 5 {
                s.errors.push(e);
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}
