//! A rollout on disk: a header row (everything but the parts that grow
//! with the fleet), a plan row (`batches`, `left_out`: written once), one
//! row per node and one row per log entry. Encoded on the caller's task,
//! written on the writer's thread, read back into one [`Rollout`].

use std::collections::BTreeMap;

use rollwave_core::{NodeProblem, NodeProgress, Rollout, RolloutSummary, PROBLEMS_SHOWN};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{decode, encode, failed, sql_int};
use crate::{Result, RolloutWrite, StoreError};

#[derive(Serialize, Deserialize)]
struct Plan {
    batches: Vec<Vec<String>>,
    left_out: Vec<String>,
}

/// A rollout write, encoded: only what the write changes.
pub(super) struct Encoded {
    id: i64,
    /// The generation the write compares against.
    expected: i64,
    /// The generation it stores.
    next: i64,
    header: String,
    active: bool,
    plan: Option<String>,
    /// The node records to write: `(name, state, json)`.
    nodes: Vec<(String, &'static str, String)>,
    /// Whether `nodes` is every node, replacing those stored.
    all_nodes: bool,
    events_from: i64,
    events: Vec<String>,
}

impl Encoded {
    pub fn new(w: &RolloutWrite<'_>, next: u64) -> Result<Encoded> {
        let r = w.rollout;
        let key = format!("rollout {}", r.id);
        let header = Rollout {
            generation: next,
            ..r.header()
        };
        let node = |name: &str, n: &NodeProgress| -> Result<(String, &'static str, String)> {
            Ok((
                name.to_string(),
                n.state.as_str(),
                encode(&format!("{key} node {name}"), n)?,
            ))
        };
        let (nodes, all_nodes) = match &w.nodes {
            Some(changed) => {
                let mut out = Vec::with_capacity(changed.len());
                for name in changed {
                    let n = r.nodes.get(*name).ok_or_else(|| {
                        StoreError::Backend(format!("{key}: changed node {name} is not in it"))
                    })?;
                    out.push(node(name, n)?);
                }
                (out, false)
            }
            None => (
                r.nodes
                    .iter()
                    .map(|(name, n)| node(name, n))
                    .collect::<Result<_>>()?,
                true,
            ),
        };
        let events_from = w.events_stored.min(r.events.len());
        let plan = w
            .plan
            .then(|| {
                encode(
                    &format!("{key} plan"),
                    &Plan {
                        batches: r.batches.clone(),
                        left_out: r.left_out.clone(),
                    },
                )
            })
            .transpose()?;
        Ok(Encoded {
            id: sql_int("rollout id", r.id)?,
            expected: sql_int("rollout generation", r.generation)?,
            next: sql_int("rollout generation", next)?,
            header: encode(&key, &header)?,
            active: r.is_active(),
            plan,
            nodes,
            all_nodes,
            events_from: sql_int("log position", events_from as u64)?,
            events: r.events[events_from..]
                .iter()
                .map(|e| encode(&format!("{key} log"), e))
                .collect::<Result<_>>()?,
        })
    }

    /// Stores a new rollout; refuses an id in use.
    pub fn insert(&self, conn: &Connection, path: &str) -> Result<()> {
        let inserted = conn
            .execute(
                "INSERT INTO rollouts (id, generation, json, active) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO NOTHING",
                params![self.id, self.next, self.header, self.active],
            )
            .map_err(failed(path, &format!("storing rollout {}", self.id)))?;
        if inserted == 0 {
            return Err(StoreError::AlreadyExists(self.id as u64));
        }
        self.write_parts(conn, path)
    }

    /// Writes what changed, if the stored generation is the expected one.
    pub fn update(&self, conn: &Connection, path: &str) -> Result<u64> {
        let what = format!("updating rollout {}", self.id);
        let changed = conn
            .prepare_cached(
                "UPDATE rollouts SET json = ?1, generation = ?2, active = ?3
                 WHERE id = ?4 AND generation = ?5",
            )
            .and_then(|mut s| {
                s.execute(params![
                    self.header,
                    self.next,
                    self.active,
                    self.id,
                    self.expected
                ])
            })
            .map_err(failed(path, &what))?;
        if changed == 0 {
            let found: Option<i64> = conn
                .query_row(
                    "SELECT generation FROM rollouts WHERE id = ?1",
                    params![self.id],
                    |row| row.get(0),
                )
                .optional()
                .map_err(failed(path, &what))?;
            return Err(match found {
                None => StoreError::NotFound(self.id as u64),
                Some(found) => StoreError::Conflict {
                    id: self.id as u64,
                    expected: self.expected as u64,
                    found: u64::try_from(found).unwrap_or(0),
                },
            });
        }
        self.write_parts(conn, path)?;
        Ok(self.next as u64)
    }

    fn write_parts(&self, conn: &Connection, path: &str) -> Result<()> {
        let what = format!("storing rollout {}", self.id);
        let fail = failed(path, &what);
        if let Some(plan) = &self.plan {
            conn.execute(
                "INSERT INTO rollout_plans (rollout_id, json) VALUES (?1, ?2)
                 ON CONFLICT (rollout_id) DO UPDATE SET json = excluded.json",
                params![self.id, plan],
            )
            .map_err(&fail)?;
        }
        if self.all_nodes {
            conn.execute(
                "DELETE FROM rollout_nodes WHERE rollout_id = ?1",
                params![self.id],
            )
            .map_err(&fail)?;
        }
        let mut put = conn
            .prepare_cached(
                "INSERT INTO rollout_nodes (rollout_id, name, state, json) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rollout_id, name) DO UPDATE
                 SET state = excluded.state, json = excluded.json",
            )
            .map_err(&fail)?;
        for (name, state, json) in &self.nodes {
            put.execute(params![self.id, name, state, json])
                .map_err(&fail)?;
        }
        // Appends; also drops entries past the point the writer read, which
        // only a full write (events_from 0) or a log that shrank can leave.
        conn.prepare_cached("DELETE FROM rollout_events WHERE rollout_id = ?1 AND seq >= ?2")
            .and_then(|mut s| s.execute(params![self.id, self.events_from]))
            .map_err(&fail)?;
        let mut append = conn
            .prepare_cached(
                "INSERT INTO rollout_events (rollout_id, seq, json) VALUES (?1, ?2, ?3)",
            )
            .map_err(&fail)?;
        for (i, json) in self.events.iter().enumerate() {
            append
                .execute(params![self.id, self.events_from + i as i64, json])
                .map_err(&fail)?;
        }
        Ok(())
    }
}

/// Decodes a header row, checking it against the columns the store relies
/// on: a mismatch means the file was edited or damaged, and trusting either
/// copy could let a stale write through.
fn decode_header(id: i64, generation: i64, json: &str) -> Result<Rollout> {
    let key = format!("rollout {id}");
    let rollout: Rollout = decode(&key, json)?;
    if i64::try_from(rollout.id) != Ok(id) || i64::try_from(rollout.generation) != Ok(generation) {
        return Err(StoreError::Corrupt {
            key,
            message: format!(
                "record says id {} generation {}, its row says id {id} generation {generation}",
                rollout.id, rollout.generation
            ),
        });
    }
    Ok(rollout)
}

/// Fills a header with its plan, nodes and log.
fn complete(conn: &Connection, path: &str, r: &mut Rollout) -> Result<()> {
    let id = r.id as i64;
    let key = format!("rollout {id}");
    let fail = failed(path, &format!("reading {key}"));
    let plan: Option<String> = conn
        .prepare_cached("SELECT json FROM rollout_plans WHERE rollout_id = ?1")
        .and_then(|mut s| s.query_row(params![id], |row| row.get(0)).optional())
        .map_err(&fail)?;
    if let Some(plan) = plan {
        let plan: Plan = decode(format!("{key} plan"), &plan)?;
        r.batches = plan.batches;
        r.left_out = plan.left_out;
    }
    let mut stmt = conn
        .prepare_cached("SELECT name, json FROM rollout_nodes WHERE rollout_id = ?1")
        .map_err(&fail)?;
    let rows = stmt
        .query_map(params![id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .map_err(&fail)?;
    let mut nodes = BTreeMap::new();
    for row in rows {
        let (name, json) = row.map_err(&fail)?;
        let n: NodeProgress = decode(format!("{key} node {name}"), &json)?;
        nodes.insert(name, n);
    }
    r.nodes = nodes;
    let mut stmt = conn
        .prepare_cached("SELECT seq, json FROM rollout_events WHERE rollout_id = ?1 ORDER BY seq")
        .map_err(&fail)?;
    let rows = stmt
        .query_map(params![id], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })
        .map_err(&fail)?;
    let mut events = Vec::new();
    for row in rows {
        let (seq, json) = row.map_err(&fail)?;
        if seq != events.len() as i64 {
            return Err(StoreError::Corrupt {
                key: format!("{key} log"),
                message: format!("entry {seq} follows {} entries", events.len()),
            });
        }
        events.push(decode(format!("{key} log {seq}"), &json)?);
    }
    r.events = events;
    Ok(())
}

pub(super) fn read(conn: &Connection, path: &str, id: i64) -> Result<Option<Rollout>> {
    let row: Option<(i64, String)> = conn
        .prepare_cached("SELECT generation, json FROM rollouts WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()
        })
        .map_err(failed(path, &format!("reading rollout {id}")))?;
    let Some((generation, json)) = row else {
        return Ok(None);
    };
    let mut r = decode_header(id, generation, &json)?;
    complete(conn, path, &mut r)?;
    Ok(Some(r))
}

/// Every rollout matching `filter` (an SQL condition with its ordering, our
/// own constant), in full.
pub(super) fn read_where(conn: &Connection, path: &str, filter: &str) -> Result<Vec<Rollout>> {
    let fail = failed(path, "listing rollouts");
    let sql = format!("SELECT id, generation, json FROM rollouts WHERE {filter}");
    let rows = {
        let mut stmt = conn.prepare(&sql).map_err(&fail)?;
        let rows = stmt
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(&fail)?;
        rows.collect::<rusqlite::Result<Vec<(i64, i64, String)>>>()
            .map_err(&fail)?
    };
    rows.iter()
        .map(|(id, generation, json)| {
            let mut r = decode_header(*id, *generation, json)?;
            complete(conn, path, &mut r)?;
            Ok(r)
        })
        .collect()
}

/// Summaries of up to `limit` rollouts with ids below `before`, newest
/// first: each costs its header, a count per state and its problem nodes.
pub(super) fn summaries(
    conn: &Connection,
    path: &str,
    before: i64,
    limit: i64,
) -> Result<Vec<RolloutSummary>> {
    let fail = failed(path, "listing rollouts");
    let headers = {
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, generation, json FROM rollouts WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(&fail)?;
        let rows = stmt
            .query_map(params![before, limit], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(&fail)?;
        rows.collect::<rusqlite::Result<Vec<(i64, i64, String)>>>()
            .map_err(&fail)?
    };
    let mut out = Vec::with_capacity(headers.len());
    for (id, generation, json) in headers {
        let mut r = decode_header(id, generation, &json)?;
        let plan: Option<String> = conn
            .prepare_cached("SELECT json FROM rollout_plans WHERE rollout_id = ?1")
            .and_then(|mut s| s.query_row(params![id], |row| row.get(0)).optional())
            .map_err(&fail)?;
        if let Some(plan) = plan {
            let plan: Plan = decode(format!("rollout {id} plan"), &plan)?;
            r.batches = plan.batches;
        }
        let mut counts = BTreeMap::new();
        {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT state, count(*) FROM rollout_nodes WHERE rollout_id = ?1 GROUP BY state",
                )
                .map_err(&fail)?;
            let rows = stmt
                .query_map(params![id], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .map_err(&fail)?;
            for row in rows {
                let (state, n) = row.map_err(&fail)?;
                counts.insert(state, n as usize);
            }
        }
        // The states of `NodeState::is_problem`, as the query below names them.
        let problems_total = counts
            .iter()
            .filter(|(s, _)| matches!(s.as_str(), "failed" | "unreachable" | "rollback_failed"))
            .map(|(_, n)| n)
            .sum();
        let mut problems = Vec::new();
        if problems_total > 0 {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT name, json FROM rollout_nodes WHERE rollout_id = ?1
                     AND state IN ('failed', 'unreachable', 'rollback_failed')
                     ORDER BY name LIMIT ?2",
                )
                .map_err(&fail)?;
            let rows = stmt
                .query_map(params![id, PROBLEMS_SHOWN as i64], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(&fail)?;
            for row in rows {
                let (name, json) = row.map_err(&fail)?;
                let n: NodeProgress = decode(format!("rollout {id} node {name}"), &json)?;
                problems.push(NodeProblem {
                    node: name,
                    state: n.state,
                    reason: n.reason,
                });
            }
        }
        let log_len: i64 = conn
            .prepare_cached("SELECT count(*) FROM rollout_events WHERE rollout_id = ?1")
            .and_then(|mut s| s.query_row(params![id], |row| row.get(0)))
            .map_err(&fail)?;
        out.push(RolloutSummary::header(
            &r,
            counts,
            problems,
            problems_total,
            log_len as usize,
        ));
    }
    Ok(out)
}

/// The terminal states, as the header's `state` field spells them
/// ([`rollwave_core::RolloutState::is_terminal`]).
const TERMINAL: [&str; 5] = [
    "completed",
    "failed",
    "cancelled",
    "rolled_back",
    "rollback_failed",
];

/// Deletes what [`crate::Store::prune_rollouts`] says, inside a write: the
/// rollouts are chosen and deleted in one transaction, so none written in
/// between (a finished rollout rolled back) can be deleted.
pub(super) fn prune(conn: &Connection, path: &str, prune: &crate::Prune) -> Result<usize> {
    let fail = failed(path, "pruning rollouts");
    let keep = i64::try_from(prune.keep.max(1)).unwrap_or(i64::MAX);
    let before = i64::try_from(prune.before).unwrap_or(i64::MAX);
    // Rollouts below the newest `keep` may go.
    let below: Option<i64> = conn
        .prepare_cached("SELECT id FROM rollouts ORDER BY id DESC LIMIT 1 OFFSET ?1")
        .and_then(|mut s| s.query_row(params![keep - 1], |row| row.get(0)).optional())
        .map_err(&fail)?;
    let Some(below) = below else {
        return Ok(0);
    };
    let mut doomed = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, active, json_extract(json, '$.state'),
                        json_extract(json, '$.created_at'), json_extract(json, '$.finished_at')
                 FROM rollouts WHERE id < ?1 ORDER BY id",
            )
            .map_err(&fail)?;
        let mut rows = stmt.query(params![below]).map_err(&fail)?;
        while doomed.len() < prune.limit {
            let Some(row) = rows.next().map_err(&fail)? else {
                break;
            };
            let id: i64 = row.get(0).map_err(&fail)?;
            let active: bool = row.get(1).map_err(&fail)?;
            let state: Option<String> = row.get(2).map_err(&fail)?;
            let created: Option<i64> = row.get(3).map_err(&fail)?;
            let finished: Option<i64> = row.get(4).map_err(&fail)?;
            // Ids follow creation: once rollouts were created after the
            // cutoff, none further on can have finished before it (a clock
            // set back only delays their turn).
            if created.is_some_and(|c| c >= before) {
                break;
            }
            let ended = !active && state.as_deref().is_some_and(|s| TERMINAL.contains(&s));
            if ended && finished.is_some_and(|f| f < before) {
                doomed.push(id);
            }
        }
    }
    for id in &doomed {
        for sql in [
            "DELETE FROM rollout_nodes WHERE rollout_id = ?1",
            "DELETE FROM rollout_events WHERE rollout_id = ?1",
            "DELETE FROM rollout_plans WHERE rollout_id = ?1",
            "DELETE FROM rollouts WHERE id = ?1",
        ] {
            conn.prepare_cached(sql)
                .and_then(|mut s| s.execute(params![id]))
                .map_err(&fail)?;
        }
    }
    Ok(doomed.len())
}
