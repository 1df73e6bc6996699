//! Node views on their way to the store, gathered for a moment and written
//! together: when a wave of agents reports at once, their views share one
//! transaction instead of taking one each.
//!
//! A view is an observation, not a decision: what the store keeps of a node
//! serves only while it is offline (a restarted control plane plans with
//! it), and an agent that reconnects says it all again in its hello. So a
//! view may wait [`GATHER`] before it is written, and one lost to a crash
//! in that time costs nothing; the newest view of a node replaces one still
//! waiting.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollwave_core::NodeView;
use rollwave_store::Store;
use tokio::sync::Notify;

/// How long the first view waits for others to join it.
const GATHER: Duration = Duration::from_millis(100);

#[derive(Default)]
pub struct NodeWrites {
    pending: Mutex<BTreeMap<String, NodeView>>,
    wake: Notify,
}

impl NodeWrites {
    /// Queues a node's view for the next write.
    pub fn put(&self, view: NodeView) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(view.name.clone(), view);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<NodeView> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
            .into_values()
            .collect()
    }

    /// Queues views whose write failed, unless a newer one replaced them.
    fn put_back(&self, batch: Vec<NodeView>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for view in batch {
            pending.entry(view.name.clone()).or_insert(view);
        }
    }

    /// Writes queued views until the process ends.
    pub fn spawn(self: Arc<Self>, store: Arc<dyn Store>) {
        tokio::spawn(async move {
            loop {
                self.wake.notified().await;
                tokio::time::sleep(GATHER).await;
                let batch = self.take();
                if batch.is_empty() {
                    continue;
                }
                if let Err(e) = store.upsert_nodes(&batch).await {
                    tracing::error!(nodes = batch.len(), error = %e, "storing nodes");
                    // Put back what no newer view has replaced meanwhile,
                    // and try again after the next gathering.
                    self.put_back(batch);
                    self.wake.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        });
    }
}
