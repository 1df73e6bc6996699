//! Electing one leader among the control planes on one etcd prefix, with
//! etcd's election service over a lease: the leader is whoever holds the
//! oldest key under `<prefix>leader/`, and holds it only while its lease is
//! kept alive. Once elected, every write of this store requires that key
//! (see `EtcdStore::txn`).

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::EtcdStore;
use crate::{Election, Lead, Result, Store};

/// How long a leader that stops renewing (killed, paused, cut off) keeps
/// its role: the time before another replica takes over. Two seconds is
/// the shortest lease etcd grants with its default election timeout (1 s):
/// a lease shorter than etcd's own failover would lapse whenever etcd
/// changes leader. Renewed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

impl EtcdStore {
    fn election_name(&self) -> Vec<u8> {
        self.key("leader")
    }

    /// Grants a lease and keeps it alive until it cannot; then says why on
    /// the returned channel.
    async fn keep_lease(&self) -> Result<(i64, oneshot::Receiver<String>)> {
        let ttl = LEASE_TTL.as_secs() as i64;
        let mut leases = self.client.lease_client();
        let lease = leases
            .grant(ttl, None)
            .await
            .map_err(|e| self.backend("granting the leader lease", e))?
            .id();
        let (mut keeper, mut stream) = leases
            .keep_alive(lease)
            .await
            .map_err(|e| self.backend("keeping the leader lease alive", e))?;
        let (lost, on_lost) = oneshot::channel();
        // Held from the grant: the lease runs at least TTL from when the
        // last renewal that etcd confirmed was sent.
        let mut held_from = tokio::time::Instant::now();
        tokio::spawn(async move {
            let why = loop {
                tokio::time::sleep_until(held_from + LEASE_TTL / 3).await;
                let sent = tokio::time::Instant::now();
                if let Err(e) = keeper.keep_alive().await {
                    break format!("renewing the lease: {e}");
                }
                // A slow answer is waited for as long as the lease may
                // still run: given up on sooner, a loaded etcd would depose
                // a leader that still holds its lease.
                match tokio::time::timeout_at(held_from + LEASE_TTL, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => held_from = sent,
                    Ok(Ok(Some(_))) => break "the lease expired".to_string(),
                    Ok(Ok(None)) => break "etcd closed the lease stream".to_string(),
                    Ok(Err(e)) => break format!("renewing the lease: {e}"),
                    Err(_) => {
                        break "etcd confirmed no lease renewal within the lease's TTL".to_string()
                    }
                }
            };
            let _ = lost.send(why);
        });
        Ok((lease, on_lost))
    }
}

#[async_trait]
impl Election for EtcdStore {
    async fn campaign(&self, address: &str) -> Result<Lead> {
        let (lease, mut lost) = self.keep_lease().await?;
        let mut election = self.campaigner.election_client();
        loop {
            if let Ok(why) = lost.try_recv() {
                return Err(self.backend("campaigning", why));
            }
            // Waits until elected, as long as it takes: cut short, etcd
            // would resign the campaign and this replica lose its place.
            // The lease lapsing ends the wait (etcd deletes the key).
            let campaign = election.campaign(self.election_name(), address, lease);
            let result = tokio::select! {
                r = campaign => r,
                why = &mut lost => {
                    let why = why.unwrap_or_else(|_| "the lease keeper stopped".into());
                    return Err(self.backend("campaigning", why));
                }
            };
            match result {
                Ok(mut resp) => {
                    let Some(key) = resp.take_leader() else {
                        return Err(self.backend("campaigning", "etcd named no leader key"));
                    };
                    *self
                        .fence
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some((key.key().to_vec(), key.rev()));
                    // Above every term of the history this store took
                    // over (`store restore`), if any.
                    let base = self.term_base().await?;
                    return Ok(Lead {
                        term: base.saturating_add(u64::try_from(key.rev()).unwrap_or(0)),
                        lost,
                    });
                }
                Err(e) => {
                    pause_after(&e).await;
                }
            }
        }
    }

    async fn register(&self, address: &str) -> Result<oneshot::Receiver<String>> {
        let (lease, lost) = self.keep_lease().await?;
        let key = self.key(&format!("replicas/{lease:x}"));
        self.client
            .kv_client()
            .put(
                key,
                address,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.backend("registering this replica", e))?;
        Ok(lost)
    }

    async fn replicas(&self) -> Result<Vec<String>> {
        let (kvs, _) = self
            .range(&self.key("replicas/"), None, "listing replicas")
            .await?;
        Ok(kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).to_string())
            .collect())
    }

    fn secret(&self) -> &str {
        &self.secret
    }

    fn cluster_id(&self) -> &str {
        &self.cluster
    }

    async fn leader(&self) -> Result<Option<String>> {
        match self
            .client
            .election_client()
            .leader(self.election_name())
            .await
        {
            Ok(mut resp) => Ok(resp
                .take_kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).to_string())),
            Err(e) if e.to_string().contains("no leader") => Ok(None),
            Err(e) => Err(self.backend("reading the leader", e)),
        }
    }
}

/// A failed campaign call (timeout, etcd unavailable) is retried after a
/// pause; a timeout needs none.
async fn pause_after(e: &etcd_client::Error) {
    if !e.to_string().to_lowercase().contains("timeout")
        && !e.to_string().to_lowercase().contains("deadline")
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
