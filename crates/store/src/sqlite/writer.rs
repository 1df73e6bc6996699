//! Group commit: every write of the SQLite engine runs on one thread of its
//! own, which takes whatever writes are queued, runs each in a savepoint of
//! one transaction and commits them with one sync to disk.
//!
//! Like Nomad's `AllocUpdateBatcher`, batching is not a timer: writes that
//! arrive while a commit syncs wait for the next one, so a burst of node
//! results costs a few syncs rather than one each, and a lone write is not
//! delayed. Callers await their own outcome; the async runtime never blocks
//! on SQLite.

use std::sync::mpsc;
use std::thread;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::{Result, StoreError};

/// At most this many writes share one transaction, so that one commit's
/// latency stays bounded however deep the queue.
const MAX_BATCH: usize = 1024;

/// Runs a job's statements on the connection, or learns that the
/// transaction could not start; returns whether its statements succeeded
/// and what to tell its caller once the transaction is committed (or not).
type Job = Box<dyn FnOnce(std::result::Result<&Connection, &StoreError>) -> (bool, Reply) + Send>;
/// Tells a caller its outcome, given the commit's error if it failed.
type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread, which owns `conn` and ends when the last
    /// `Writer` handle is dropped.
    pub fn spawn(conn: Connection, what: String) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("rollwave-store".into())
            .spawn(move || run(conn, rx, what))?;
        Ok(Writer { jobs: tx })
    }

    /// Runs `f` inside the next transaction and returns its result once
    /// that transaction is durable. If `f` fails, its statements are undone
    /// and the transaction's other writes go ahead.
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => f(conn),
                Err(e) => Err(e.clone()),
            };
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |commit: Option<&StoreError>| {
                let outcome = match (result, commit) {
                    (Ok(_), Some(e)) => Err(e.clone()),
                    (result, _) => result,
                };
                let _ = tx.send(outcome);
            });
            (ok, reply)
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Backend("the store's writer has stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Backend("the store's writer has stopped".into()))?
    }
}

fn run(conn: Connection, rx: mpsc::Receiver<Job>, what: String) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        commit(&conn, batch, &what);
    }
}

fn commit(conn: &Connection, batch: Vec<Job>, what: &str) {
    let failed = |action: &str, e: rusqlite::Error| {
        StoreError::Backend(format!("{action} a transaction in {what}: {e}"))
    };
    // IMMEDIATE takes the write lock up front: another process holding the
    // file (a backup, a CLI) makes this wait for the busy timeout, not fail
    // half-way through.
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = failed("starting", e);
        for job in batch {
            let (_, reply) = job(Err(&e));
            reply(None);
        }
        return;
    }
    let mut replies = Vec::with_capacity(batch.len());
    let mut broken = None;
    for job in batch {
        if let Some(e) = &broken {
            let (_, reply) = job(Err(e));
            replies.push(reply);
            continue;
        }
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            let e = failed("opening a savepoint in", e);
            let (_, reply) = job(Err(&e));
            replies.push(reply);
            broken = Some(e);
            continue;
        }
        let (ok, reply) = job(Ok(conn));
        // A job that failed part-way leaves nothing behind; the others in
        // the transaction go ahead.
        let end = if ok {
            conn.execute_batch("RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        replies.push(reply);
        if let Err(e) = end {
            broken = Some(failed("closing a savepoint in", e));
        }
    }
    let result = match broken {
        Some(e) => Err(e),
        None => conn
            .execute_batch("COMMIT")
            .map_err(|e| failed("committing", e)),
    };
    match result {
        Ok(()) => replies.into_iter().for_each(|reply| reply(None)),
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            replies.into_iter().for_each(|reply| reply(Some(&e)));
        }
    }
}
