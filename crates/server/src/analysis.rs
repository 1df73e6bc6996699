//! Analysis queries against Prometheus, for the reconciler (a measurement
//! when one is due) and for plan time (each query tried once, so that a
//! query Prometheus rejects or a Prometheus this control plane cannot reach
//! is refused before anything changes). What an answer means is decided in
//! `rollwave_core::analysis`; this module only sends the request.

use std::time::Duration;

use rollwave_core::analysis::{read_answer, QueryError, Sample};
use rollwave_core::{Analysis, RolloutFile};

use crate::ApiError;

/// A query that takes longer is an error, so that a hung Prometheus counts
/// toward `consecutive_error_limit` instead of holding a wave forever.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A plan is answered while the operator waits: a Prometheus that does not
/// answer a trial query this quickly is reported as unreachable.
const PLAN_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer larger than this is not one number: Prometheus returned a
/// great many series.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(QUERY_TIMEOUT)
        .connect_timeout(Duration::from_secs(5))
        .build()
}

/// Runs `a`'s query once, as an instant query at the current time.
pub async fn query(client: &reqwest::Client, a: &Analysis) -> Result<Sample, QueryError> {
    let url = format!("{}/api/v1/query", a.prometheus);
    let unreachable = |e: reqwest::Error| {
        QueryError::Unreachable(if e.is_timeout() {
            format!("no answer within {}s", QUERY_TIMEOUT.as_secs())
        } else {
            let e = e.without_url();
            match rollwave_core::find_io_error(&e) {
                Some(io) => rollwave_core::describe_io(io),
                None => rollwave_core::error_chain(&e),
            }
        })
    };
    let mut resp = client
        .get(&url)
        .query(&[("query", a.query.as_str())])
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ANSWER_BYTES {
            return Err(QueryError::NotANumber(format!(
                "an answer over {} MiB",
                MAX_ANSWER_BYTES >> 20
            )));
        }
    }
    read_answer(status, &String::from_utf8_lossy(&body))
}

/// Tries each analysis of the request once against its Prometheus; the
/// error names the field at fault (`analysis[0].query` for a query
/// Prometheus rejects, `analysis[0].prometheus` for one it cannot reach).
///
/// Answered with 400, as every other field the control plane cannot act
/// on: from where the operator stands the spec names a Prometheus that
/// does not work, and `plan` exists to say so before anything starts.
pub async fn check(file: &RolloutFile) -> Result<(), ApiError> {
    let specs = file.resolve_all()?;
    let Some(spec) = specs.first() else {
        return Ok(());
    };
    if spec.analysis.is_empty() {
        return Ok(());
    }
    let client =
        client().map_err(|e| ApiError::internal(format!("building the Prometheus client: {e}")))?;
    // At once, so that a plan with several analyses waits for the slowest,
    // not for their sum.
    let trials = spec.analysis.iter().map(|a| async {
        tokio::time::timeout(PLAN_TIMEOUT, query(&client, a))
            .await
            .unwrap_or_else(|_| {
                Err(QueryError::Unreachable(format!(
                    "no answer within {}s",
                    PLAN_TIMEOUT.as_secs()
                )))
            })
    });
    let answers = futures_util::future::join_all(trials).await;
    for (i, (a, answer)) in spec.analysis.iter().zip(answers).enumerate() {
        match answer {
            Ok(Sample::Several(n)) => {
                return Err(ApiError::bad_request(format!(
                    "analysis[{i}].query: returns {n} series now; an analysis needs one number (aggregate it, e.g. with sum(...))"
                )))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "analysis[{i}].{}: prometheus {} {e}",
                    e.field(),
                    a.prometheus
                )))
            }
        }
    }
    Ok(())
}
