//! A rollout in etcd: its generation, header, plan, one key per node, one
//! per log entry, its summary and, while it is watched, a `live` marker.
//! A write compares the generation and writes what changed.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, KeyValue};
use rollwave_core::{NodeProgress, Rollout, RolloutSummary};
use serde::{Deserialize, Serialize};

use super::{decode, encode, padded, parse_u64, prefix_end, EtcdStore, Op};
use crate::{Result, RolloutWrite, StoreError};

#[derive(Serialize, Deserialize)]
struct Plan {
    batches: Vec<Vec<String>>,
    left_out: Vec<String>,
}

/// The id a key ends with (`.../<padded id>`).
pub(super) fn id_of(kv: &KeyValue) -> Result<u64> {
    let key = String::from_utf8_lossy(kv.key());
    let last = key.rsplit('/').next().unwrap_or_default();
    parse_u64(&key, last.as_bytes())
}

struct Keys {
    gen: Vec<u8>,
    header: Vec<u8>,
    plan: Vec<u8>,
    nodes: Vec<u8>,
    log: Vec<u8>,
    summary: Vec<u8>,
    live: Vec<u8>,
}

impl Keys {
    fn of(store: &EtcdStore, id: u64) -> Keys {
        let id = padded(id);
        Keys {
            gen: store.key(&format!("gen/{id}")),
            header: store.key(&format!("rollout/{id}")),
            plan: store.key(&format!("plan/{id}")),
            nodes: store.key(&format!("rnode/{id}/")),
            log: store.key(&format!("rlog/{id}/")),
            summary: store.key(&format!("summary/{id}")),
            live: store.key(&format!("live/{id}")),
        }
    }

    fn node(&self, name: &str) -> Vec<u8> {
        let mut k = self.nodes.clone();
        k.extend_from_slice(name.as_bytes());
        k
    }

    fn entry(&self, seq: u64) -> Vec<u8> {
        let mut k = self.log.clone();
        k.extend_from_slice(padded(seq).as_bytes());
        k
    }
}

/// What a write stores, split into the parts (nodes, log, plan) and the
/// records that make them visible (header, summary, live marker and the
/// generation), which go last.
struct Encoded {
    parts: Vec<Op>,
    last: Vec<Op>,
}

impl Encoded {
    /// Writes under `compares`: in one transaction when it fits, which
    /// makes the write atomic (two writers racing on one generation: one
    /// wins, the other changes nothing); otherwise the parts first and the
    /// rest in a last transaction, so that the new header and generation
    /// are never seen before every part. `Ok(false)`: a compare failed.
    async fn write(self, store: &EtcdStore, compares: &[Compare], what: &str) -> Result<bool> {
        let Encoded { mut parts, last } = self;
        let split = super::chunks_needed(parts.iter().chain(&last)) > 1;
        if !split {
            parts.extend(last);
            return store.put_chunked(compares, parts, what).await;
        }
        Ok(store.put_chunked(compares, parts, what).await?
            && store.put_chunked(compares, last, what).await?)
    }
}

/// `stale`: nodes stored for this rollout that a full write drops.
fn encode_write(
    store: &EtcdStore,
    w: &RolloutWrite<'_>,
    next: u64,
    stale: &[String],
) -> Result<Encoded> {
    let r = w.rollout;
    let what = format!("rollout {}", r.id);
    let keys = Keys::of(store, r.id);
    let mut parts = Vec::new();
    if w.plan {
        let plan = Plan {
            batches: r.batches.clone(),
            left_out: r.left_out.clone(),
        };
        parts.push(Op::Put(keys.plan.clone(), encode(&what, &plan)?));
    }
    let node = |name: &str, n: &NodeProgress| -> Result<Op> {
        Ok(Op::Put(
            keys.node(name),
            encode(&format!("{what} node {name}"), n)?,
        ))
    };
    match &w.nodes {
        Some(changed) => {
            for name in changed {
                let n = r.nodes.get(*name).ok_or_else(|| {
                    StoreError::Backend(format!("{what}: changed node {name} is not in it"))
                })?;
                parts.push(node(name, n)?);
            }
        }
        None => {
            // etcd refuses a transaction that deletes a range and puts a key
            // inside it: the stored nodes no longer in the rollout are
            // deleted one by one.
            for name in stale {
                parts.push(Op::Delete(keys.node(name)));
            }
            for (name, n) in &r.nodes {
                parts.push(node(name, n)?);
            }
        }
    }
    // Appends, overwriting any entries stored from `from` on; drops those
    // past the new end, which only a log that shrank can leave.
    let from = w.events_stored.min(r.events.len());
    parts.push(Op::DeleteRange(
        keys.entry(r.events.len() as u64),
        prefix_end(&keys.log),
    ));
    for (i, e) in r.events[from..].iter().enumerate() {
        parts.push(Op::Put(
            keys.entry((from + i) as u64),
            encode(&format!("{what} log"), e)?,
        ));
    }
    let header = Rollout {
        generation: next,
        ..r.header()
    };
    // The summary is computed from the rollout in memory, which the writer
    // holds in full: a list then reads one key per rollout.
    let summary = RolloutSummary {
        generation: next,
        ..RolloutSummary::of(r)
    };
    let mut last = vec![
        Op::Put(keys.header.clone(), encode(&what, &header)?),
        Op::Put(keys.summary.clone(), encode(&what, &summary)?),
    ];
    if r.is_active() {
        last.push(Op::Put(keys.live.clone(), Vec::new()));
    } else {
        last.push(Op::Delete(keys.live.clone()));
    }
    last.push(Op::Put(keys.gen.clone(), next.to_string().into_bytes()));
    Ok(Encoded { parts, last })
}

/// Stores new rollouts with generation 1, all or none: refused if any id is
/// in use, before anything is written.
pub(super) async fn insert(store: &EtcdStore, new: &[Rollout]) -> Result<Vec<Rollout>> {
    let stored: Vec<Rollout> = new
        .iter()
        .map(|r| Rollout {
            generation: 1,
            ..r.clone()
        })
        .collect();
    let absent: Vec<Compare> = stored
        .iter()
        .map(|r| Compare::create_revision(Keys::of(store, r.id).gen, CompareOp::Equal, 0))
        .collect();
    let mut parts = Vec::new();
    let mut last = Vec::new();
    for r in &stored {
        let e = encode_write(store, &RolloutWrite::full(r), 1, &[])?;
        parts.extend(e.parts);
        last.extend(e.last);
    }
    let taken = || async {
        for r in &stored {
            let keys = Keys::of(store, r.id);
            if store.get(keys.gen, "storing rollouts").await?.is_some() {
                return Ok(StoreError::AlreadyExists(r.id));
            }
        }
        Err(store.backend("storing rollouts", "a rollout id was taken concurrently"))
    };
    if last.len() > super::MAX_TXN_OPS {
        return Err(store.backend(
            "storing rollouts",
            "too many rollouts in one request for one transaction",
        ));
    }
    // Each transaction only while no rollout of these ids exists.
    let e = Encoded { parts, last };
    if !e.write(store, &absent, "storing rollouts").await? {
        return Err(taken().await?);
    }
    Ok(stored)
}

/// Writes what changed if the stored generation is `rollout.generation`;
/// returns the new one.
pub(super) async fn update(store: &EtcdStore, w: &RolloutWrite<'_>) -> Result<u64> {
    let r = w.rollout;
    let next = r.generation + 1;
    let keys = Keys::of(store, r.id);
    let what = format!("updating rollout {}", r.id);
    let stale = match w.nodes {
        Some(_) => Vec::new(),
        None => {
            let (stored, _) = store.range(&keys.nodes, None, &what).await?;
            stored
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key()[keys.nodes.len()..]).to_string())
                .filter(|name| !r.nodes.contains_key(name))
                .collect()
        }
    };
    let e = encode_write(store, w, next, &stale)?;
    let same = [Compare::value(
        keys.gen.clone(),
        CompareOp::Equal,
        r.generation.to_string(),
    )];
    if e.write(store, &same, &what).await? {
        return Ok(next);
    }
    Err(match store.get(keys.gen.clone(), &what).await? {
        None => StoreError::NotFound(r.id),
        Some(kv) => StoreError::Conflict {
            id: r.id,
            expected: r.generation,
            found: parse_u64(&format!("rollout {} generation", r.id), kv.value())?,
        },
    })
}

pub(super) async fn read(store: &EtcdStore, id: u64) -> Result<Option<Rollout>> {
    read_at(store, id, 0).await
}

/// Reads a rollout in full at one revision (0: the latest), so that its
/// header, nodes and log agree.
pub(super) async fn read_at(store: &EtcdStore, id: u64, revision: i64) -> Result<Option<Rollout>> {
    let keys = Keys::of(store, id);
    let what = format!("reading rollout {id}");
    let key = format!("rollout {id}");
    let (header, revision) = store
        .range(&keys.header, Some(revision).filter(|r| *r > 0), &what)
        .await?;
    // `range` over a full key also matches longer keys: keep the exact one.
    let Some(header) = header
        .into_iter()
        .find(|kv| kv.key() == keys.header.as_slice())
    else {
        return Ok(None);
    };
    let mut r: Rollout = decode(&key, header.value())?;
    if r.id != id {
        return Err(StoreError::Corrupt {
            key,
            message: format!("record says id {}", r.id),
        });
    }
    let (gen, _) = store.range(&keys.gen, Some(revision), &what).await?;
    match gen.iter().find(|kv| kv.key() == keys.gen.as_slice()) {
        Some(kv) if parse_u64(&key, kv.value())? == r.generation => {}
        other => {
            return Err(StoreError::Corrupt {
                key,
                message: format!(
                    "record says generation {}, its generation key says {}",
                    r.generation,
                    other.map_or("nothing".into(), |kv| String::from_utf8_lossy(kv.value())
                        .to_string())
                ),
            })
        }
    }
    let (plan, _) = store.range(&keys.plan, Some(revision), &what).await?;
    if let Some(plan) = plan.iter().find(|kv| kv.key() == keys.plan.as_slice()) {
        let plan: Plan = decode(&format!("{key} plan"), plan.value())?;
        r.batches = plan.batches;
        r.left_out = plan.left_out;
    }
    let (nodes, _) = store.range(&keys.nodes, Some(revision), &what).await?;
    let mut map = BTreeMap::new();
    for kv in &nodes {
        let name = String::from_utf8_lossy(&kv.key()[keys.nodes.len()..]).to_string();
        let n: NodeProgress = decode(&format!("{key} node {name}"), kv.value())?;
        map.insert(name, n);
    }
    r.nodes = map;
    let (log, _) = store.range(&keys.log, Some(revision), &what).await?;
    let mut events = Vec::with_capacity(log.len());
    for kv in &log {
        let seq = id_of(kv)?;
        if seq != events.len() as u64 {
            return Err(StoreError::Corrupt {
                key: format!("{key} log"),
                message: format!("entry {seq} follows {} entries", events.len()),
            });
        }
        events.push(decode(&format!("{key} log {seq}"), kv.value())?);
    }
    r.events = events;
    Ok(Some(r))
}

/// Deletes what [`crate::Store::prune_rollouts`] says: the oldest rollouts
/// but the newest `keep`, read from their summaries in id order, each
/// deleted in a transaction of its own (seven operations, however large the
/// rollout: its nodes and log go as two ranges) that requires its
/// generation to be the one its summary showed and no `live` marker, so a
/// rollout written meanwhile (a finished one rolled back) is left alone.
pub(super) async fn prune(store: &EtcdStore, prune: &crate::Prune) -> Result<usize> {
    let what = "pruning rollouts";
    let mut allowed = store
        .count(&store.key("gen/"), what)
        .await?
        .saturating_sub(prune.keep.max(1));
    let prefix = store.key("summary/");
    let mut start = prefix.clone();
    let mut deleted = 0;
    'scan: while allowed > 0 && deleted < prune.limit {
        let (kvs, more) = store
            .range_page(&start, &prefix_end(&prefix), allowed.min(500), what)
            .await?;
        for kv in &kvs {
            allowed -= 1;
            let s: RolloutSummary = decode("rollout summary", kv.value())?;
            // Ids follow creation: once rollouts were created after the
            // cutoff, none further on can have finished before it.
            if s.created_at >= prune.before {
                break 'scan;
            }
            let ended = s.state.is_terminal() && s.finished_at.is_some_and(|f| f < prune.before);
            if ended && delete(store, s.id, s.generation).await? {
                deleted += 1;
                if deleted == prune.limit {
                    break 'scan;
                }
            }
            if allowed == 0 {
                break 'scan;
            }
        }
        let Some(last) = kvs.last() else { break };
        start = last.key().to_vec();
        start.push(0);
        if !more {
            break;
        }
    }
    Ok(deleted)
}

/// Deletes rollout `id` if it is still at `generation` and not watched.
async fn delete(store: &EtcdStore, id: u64, generation: u64) -> Result<bool> {
    let keys = Keys::of(store, id);
    let what = format!("pruning rollout {id}");
    let compares = vec![
        Compare::value(keys.gen.clone(), CompareOp::Equal, generation.to_string()),
        Compare::create_revision(keys.live.clone(), CompareOp::Equal, 0),
    ];
    let ops = vec![
        Op::Delete(keys.gen),
        Op::Delete(keys.header),
        Op::Delete(keys.plan),
        Op::Delete(keys.summary),
        Op::DeleteRange(keys.nodes.clone(), prefix_end(&keys.nodes)),
        Op::DeleteRange(keys.log.clone(), prefix_end(&keys.log)),
    ];
    let ops = ops.into_iter().map(Op::into_txn).collect();
    Ok(store
        .txn(compares, ops, Vec::new(), &what)
        .await?
        .succeeded())
}
