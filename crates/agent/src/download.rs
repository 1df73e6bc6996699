//! Downloading a release artifact from the control plane, verified, through
//! the failures a crowd brings.
//!
//! When a rollout starts, every node asks for the release at once. The
//! control plane streams only so many at a time (`--max-downloads`) and
//! answers the others `429` with `Retry-After`; connections break, reads time
//! out. [`download_verified`] rides that out:
//!
//! - A failed attempt (connection error, timeout, a cut body, `408`, `429`,
//!   `5xx`) is tried again after an exponential backoff with jitter, never
//!   sooner than the server's `Retry-After` (itself capped), and never past
//!   the caller's deadline. Other answers (`404`, `401`, `403`, ...) fail at
//!   once: waiting does not change them.
//! - A retry resumes with `Range: bytes=N-` from the bytes already written,
//!   and the sha256 is computed incrementally across attempts, so nothing is
//!   fetched or hashed twice. A server that answers `200` instead starts the
//!   file over; a `206` for other bytes than asked does too.
//! - Wrong bytes (a server that says its artifact has another size, sends
//!   more than the release's size, or a complete file whose sha256 differs)
//!   are not a load problem: the file starts over from zero once, then the
//!   download fails.
//!
//! The file is only handed to the caller once its size and sha256 are exactly
//! what the control plane published; on any failure, or if the future is
//! dropped, it is deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, RANGE, RETRY_AFTER};
use reqwest::StatusCode;
use rollwave_core::error_chain;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::artifact::{io_err, size_problem, tmp_name, ArtifactError, Cleanup};

/// How long, and how often, a download is tried.
#[derive(Debug, Clone)]
pub struct Retry {
    /// No attempt starts, or goes on, past this.
    pub deadline: Instant,
    /// At most this many attempts.
    pub max_attempts: u32,
    /// The pause after a first failure; it doubles with each failure in a
    /// row, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// A longer `Retry-After` is cut to this: a server (or something posing
    /// as one) cannot park the agent for an hour.
    pub max_retry_after: Duration,
}

impl Retry {
    /// Retries until `deadline`, starting at half a second and backing off
    /// to 10 s: with a thousand agents waiting, pauses that grow spread them
    /// out, while the cap keeps a node from idling long after the control
    /// plane has room again.
    pub fn until(deadline: Instant) -> Retry {
        Retry {
            deadline,
            max_attempts: u32::MAX,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(30),
        }
    }

    /// The pause before the next attempt, after `streak` failures in a row
    /// (from 1) and the server's `retry_after`: the longer of the backoff
    /// and the server's wish, plus up to half of it again at random
    /// (`jitter` in `[0, 1]`), so that agents refused together do not come
    /// back together.
    fn pause(&self, streak: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let backoff = self
            .first_backoff
            .saturating_mul(2u32.saturating_pow(streak.saturating_sub(1)))
            .min(self.max_backoff);
        let wait = retry_after
            .map(|r| r.min(self.max_retry_after))
            .unwrap_or_default()
            .max(backoff);
        wait + wait.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// Downloads `url` into a temporary file inside `tmp_dir` while hashing it,
/// retrying and resuming as the module documentation says, within `retry`.
///
/// Refuses, and deletes the file, if the size or the sha256 differ from
/// `size` and `sha256` (hex, any case). Stops reading as soon as more than
/// `size` bytes arrive. The file is also deleted if the returned future is
/// dropped before it completes. Returns the path of the verified file, which
/// the caller owns (and should delete after staging).
pub async fn download_verified(
    client: &reqwest::Client,
    url: &str,
    sha256: &str,
    size: u64,
    tmp_dir: &Path,
    retry: &Retry,
) -> Result<PathBuf, ArtifactError> {
    let expected_sha = sha256.trim().to_ascii_lowercase();
    tokio::fs::create_dir_all(tmp_dir)
        .await
        .map_err(io_err("creating", tmp_dir))?;
    let path = tmp_dir.join(tmp_name("download"));
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .await
        .map_err(io_err("creating", &path))?;
    let mut cleanup = Cleanup::file(path.clone());
    let mut part = Partial {
        path: path.clone(),
        file,
        hasher: Sha256::new(),
        got: 0,
    };

    let began = Instant::now();
    let mut attempts = 0u32;
    let mut streak = 0u32;
    let mut started_over = false;
    loop {
        attempts += 1;
        let before = part.got;
        let attempt = tokio::time::timeout_at(retry.deadline, fetch(client, url, size, &mut part));
        let failure = match attempt.await {
            Err(_) => {
                return Err(ArtifactError::Download {
                    url: url.to_owned(),
                    reason: format!(
                    "not finished within the download deadline ({} of {size} bytes after {}, {})",
                    part.got,
                    seconds(began.elapsed()),
                    plural(attempts, "attempt")
                ),
                })
            }
            Ok(Ok(())) => match part.finish(url, &expected_sha).await {
                Ok(()) => {
                    cleanup.disarm();
                    if attempts > 1 {
                        info!(
                            url,
                            attempts,
                            bytes = size,
                            "download verified after retries"
                        );
                    } else {
                        debug!(url, path = %path.display(), bytes = size, "download verified");
                    }
                    return Ok(path);
                }
                Err(e @ ArtifactError::ChecksumMismatch { .. }) => Failure::Corrupt(e),
                Err(e) => return Err(e),
            },
            Ok(Err(failure)) => failure,
        };
        match failure {
            Failure::Fatal(e) => return Err(e),
            Failure::Corrupt(e) if started_over => return Err(e),
            Failure::Corrupt(e) => {
                warn!(url, error = %e, "downloaded bytes are wrong; starting over once");
                started_over = true;
                part.restart().await?;
            }
            Failure::Retry { reason, after } => {
                // A cut connection that brought bytes is progress, not a
                // failing server: the backoff starts again.
                streak = if part.got > before { 1 } else { streak + 1 };
                let pause = retry.pause(streak, after, jitter());
                if attempts >= retry.max_attempts || Instant::now() + pause >= retry.deadline {
                    return Err(ArtifactError::Download {
                        url: url.to_owned(),
                        reason: format!(
                            "{reason} (gave up after {} over {})",
                            plural(attempts, "attempt"),
                            seconds(began.elapsed())
                        ),
                    });
                }
                warn!(
                    url,
                    attempt = attempts,
                    have = part.got,
                    size,
                    retry_in_ms = pause.as_millis() as u64,
                    error = %reason,
                    "download failed; retrying"
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Why an attempt did not bring the whole file.
enum Failure {
    /// Worth another attempt, after a pause of at least `after` if the
    /// server said so.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The bytes are wrong: start over, once.
    Corrupt(ArtifactError),
    /// No attempt will do better.
    Fatal(ArtifactError),
}

/// The file so far: `got` bytes written and hashed.
struct Partial {
    path: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    got: u64,
}

impl Partial {
    async fn restart(&mut self) -> Result<(), ArtifactError> {
        let path = &self.path;
        self.file.flush().await.map_err(io_err("writing", path))?;
        self.file
            .set_len(0)
            .await
            .map_err(io_err("truncating", path))?;
        self.file
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(io_err("truncating", path))?;
        self.hasher = Sha256::new();
        self.got = 0;
        Ok(())
    }

    async fn append(&mut self, chunk: &[u8]) -> Result<(), ArtifactError> {
        self.file
            .write_all(chunk)
            .await
            .map_err(io_err("writing", &self.path))?;
        self.hasher.update(chunk);
        self.got += chunk.len() as u64;
        Ok(())
    }

    /// Makes the complete file durable and checks its sha256.
    async fn finish(&mut self, url: &str, expected: &str) -> Result<(), ArtifactError> {
        let path = &self.path;
        self.file.flush().await.map_err(io_err("writing", path))?;
        self.file
            .sync_all()
            .await
            .map_err(io_err("syncing", path))?;
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if actual != expected {
            return Err(ArtifactError::ChecksumMismatch {
                url: url.to_owned(),
                expected: expected.to_owned(),
                got: actual,
            });
        }
        Ok(())
    }
}

/// One request: from `part.got` (a `Range` request past 0) to the end.
async fn fetch(
    client: &reqwest::Client,
    url: &str,
    size: u64,
    part: &mut Partial,
) -> Result<(), Failure> {
    let fatal = |reason: String| {
        Failure::Fatal(ArtifactError::Download {
            url: url.to_owned(),
            reason,
        })
    };
    let size_err = |got: u64| {
        Failure::Corrupt(ArtifactError::SizeMismatch {
            url: url.to_owned(),
            expected: size,
            got,
        })
    };
    let mut request = client.get(url);
    if part.got > 0 {
        request = request.header(RANGE, format!("bytes={}-", part.got));
    }
    let mut response = request.send().await.map_err(|e| {
        if e.is_builder() {
            fatal(error_chain(&e))
        } else {
            Failure::Retry {
                reason: error_chain(&e),
                after: None,
            }
        }
    })?;
    let status = response.status();
    // The artifact's length as the server tells it: a different one than
    // the release's means other bytes, not a transfer to resume.
    let total = match status {
        StatusCode::OK => response.content_length(),
        _ => response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit_once('/'))
            .and_then(|(_, total)| total.trim().parse::<u64>().ok()),
    };
    if let (
        StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE,
        Some(total),
    ) = (status, total)
    {
        if total != size {
            return Err(size_err(total));
        }
    }
    match status {
        StatusCode::OK => {
            if part.got > 0 {
                debug!(
                    url,
                    have = part.got,
                    "the server ignored the range; starting over"
                );
                part.restart().await.map_err(Failure::Fatal)?;
            }
        }
        StatusCode::PARTIAL_CONTENT => {
            let range = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let wanted = format!("bytes {}-{}/{size}", part.got, size.saturating_sub(1));
            if range != wanted {
                let reason = format!(
                    "asked for bytes {}- and got Content-Range {range:?}",
                    part.got
                );
                part.restart().await.map_err(Failure::Fatal)?;
                return Err(Failure::Retry {
                    reason,
                    after: None,
                });
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            // Not beyond an artifact of the right size: a server that
            // answers at random. Start over.
            let reason = format!("server answered {status} to bytes={}-", part.got);
            part.restart().await.map_err(Failure::Fatal)?;
            return Err(Failure::Retry {
                reason,
                after: None,
            });
        }
        s if s == StatusCode::REQUEST_TIMEOUT
            || s == StatusCode::TOO_MANY_REQUESTS
            || s.is_server_error() =>
        {
            let after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(Failure::Retry {
                reason: format!("server answered {status}"),
                after,
            });
        }
        _ => return Err(fatal(format!("server answered {status}"))),
    }
    if let Some(announced) = response.content_length() {
        if part.got.saturating_add(announced) > size {
            return Err(size_err(part.got.saturating_add(announced)));
        }
    }
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                // What arrived is written and hashed: the next attempt
                // resumes after it.
                return Err(Failure::Retry {
                    reason: format!("{}: {}", size_problem(size, part.got), error_chain(&e)),
                    after: None,
                });
            }
        };
        let got = part.got.saturating_add(chunk.len() as u64);
        if got > size {
            // Dropping the response closes the connection: a hostile or
            // broken server cannot make us read (or store) more.
            return Err(size_err(got));
        }
        part.append(&chunk).await.map_err(Failure::Fatal)?;
    }
    if part.got < size {
        // A body delimited by the connection's close ended early: as good as
        // a cut connection.
        return Err(Failure::Retry {
            reason: size_problem(size, part.got),
            after: None,
        });
    }
    Ok(())
}

/// A number in `[0, 1]`, different for each call and each agent: jitter
/// needs no cryptographic randomness, only agents that do not agree.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

fn plural(n: u32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use crate::artifact::sha256_file;

    /// One attempt, no retry: what a single request makes of each answer.
    fn once() -> Retry {
        Retry {
            max_attempts: 1,
            ..Retry::until(far())
        }
    }

    /// Retries without waiting: the tests never depend on the clock.
    fn quick() -> Retry {
        Retry {
            deadline: far(),
            max_attempts: 20,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            max_retry_after: Duration::from_millis(1),
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Serves `response` (raw bytes, status line included) to every
    /// connection, then closes it, or keeps it open if `hold` is set.
    async fn serve(response: Vec<u8>, hold: bool) -> String {
        let (url, _) = script(move |_, _| (response.clone(), hold)).await;
        url
    }

    /// Serves what `reply(i, request)` returns to the i-th connection (from
    /// 0), then closes it (or keeps it open if told); returns the URL and
    /// every request's head, lowercased, in order.
    async fn script(
        reply: impl Fn(usize, &str) -> (Vec<u8>, bool) + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let reply = Arc::new(reply);
        tokio::spawn(async move {
            let mut i = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                let (reply, log) = (reply.clone(), log.clone());
                let n = i;
                i += 1;
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&request).to_lowercase();
                    log.lock().unwrap().push(head.clone());
                    let (bytes, hold) = reply(n, &head);
                    let _ = sock.write_all(&bytes).await;
                    if hold {
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        (format!("http://{addr}/artifacts/app-1.2.3.tar.gz"), seen)
    }

    fn response(head: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 {head}\r\n\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn files_in(dir: &Path) -> usize {
        fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
    }

    const BODY: &[u8] = b"the artifact bytes, exactly as pushed";

    fn ok_response(body: &[u8]) -> Vec<u8> {
        response(&format!("200 OK\r\nContent-Length: {}", body.len()), body)
    }

    /// A complete answer on a connection that closes after it.
    fn closing(head: &str, body: &[u8]) -> (Vec<u8>, bool) {
        let head = format!(
            "{head}\r\nConnection: close\r\nContent-Length: {}",
            body.len()
        );
        (response(&head, body), false)
    }

    async fn download(
        url: &str,
        body: &[u8],
        dir: &Path,
        retry: &Retry,
    ) -> Result<PathBuf, ArtifactError> {
        let client = reqwest::Client::new();
        download_verified(&client, url, &sha(body), body.len() as u64, dir, retry).await
    }

    // ---- one attempt ----

    #[tokio::test]
    async fn download_verified_returns_verified_file() {
        let tmp = tempfile::tempdir().unwrap();
        let url = serve(ok_response(BODY), false).await;
        let client = reqwest::Client::new();
        let path = download_verified(
            &client,
            &url,
            &sha(BODY).to_uppercase(),
            BODY.len() as u64,
            tmp.path(),
            &once(),
        )
        .await
        .unwrap();
        assert_eq!(path.parent(), Some(tmp.path()));
        assert_eq!(fs::read(&path).unwrap(), BODY);
        assert_eq!(sha256_file(&path).unwrap(), sha(BODY));
    }

    #[tokio::test]
    async fn download_verified_refuses_checksum_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let url = serve(ok_response(BODY), false).await;
        let wrong = sha(b"something else");
        let err = download_verified(
            &reqwest::Client::new(),
            &url,
            &wrong,
            BODY.len() as u64,
            tmp.path(),
            &once(),
        )
        .await
        .unwrap_err();
        match &err {
            ArtifactError::ChecksumMismatch { expected, got, .. } => {
                assert_eq!(expected, &wrong);
                assert_eq!(got, &sha(BODY));
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[tokio::test]
    async fn download_verified_refuses_truncated_body() {
        // The server promises 100 bytes, sends 50 and closes.
        let tmp = tempfile::tempdir().unwrap();
        let body = [b'x'; 50];
        let url = serve(response("200 OK\r\nContent-Length: 100", &body), false).await;
        let err = download(&url, &[b'x'; 100], tmp.path(), &once())
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::Download { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("truncated download: got 50 of 100 bytes"),
            "{err}"
        );
        assert!(
            err.to_string().contains("gave up after 1 attempt "),
            "{err}"
        );
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[tokio::test]
    async fn download_verified_refuses_short_body() {
        // The server sends a complete, but short, body (delimited by close).
        let tmp = tempfile::tempdir().unwrap();
        let body = [b'x'; 50];
        let url = serve(response("200 OK\r\nConnection: close", &body), false).await;
        let err = download(&url, &[b'x'; 100], tmp.path(), &once())
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::Download { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("truncated download: got 50 of 100 bytes"),
            "{err}"
        );
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[tokio::test]
    async fn download_verified_refuses_announced_longer_body() {
        let tmp = tempfile::tempdir().unwrap();
        let body = [b'x'; 200];
        let url = serve(ok_response(&body), false).await;
        let err = download_verified(
            &reqwest::Client::new(),
            &url,
            &sha(&body),
            100,
            tmp.path(),
            &once(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::SizeMismatch {
                    expected: 100,
                    got: 200,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("download longer than the expected 100 bytes"),
            "{err}"
        );
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[tokio::test]
    async fn download_verified_stops_reading_past_expected_size() {
        // No length announced and the connection stays open: only the size
        // check can end this download.
        let tmp = tempfile::tempdir().unwrap();
        let body = [b'x'; 200];
        let url = serve(response("200 OK\r\nConnection: close", &body), true).await;
        let client = reqwest::Client::new();
        let expected = sha(&body[..100]);
        let retry = quick();
        let download = download_verified(&client, &url, &expected, 100, tmp.path(), &retry);
        let err = tokio::time::timeout(Duration::from_secs(30), download)
            .await
            .expect("download did not stop at the expected size")
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::SizeMismatch { expected: 100, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("download longer than the expected 100 bytes"),
            "{err}"
        );
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[tokio::test]
    async fn download_verified_reports_http_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let url = serve(response("404 Not Found\r\nContent-Length: 0", b""), false).await;
        let err = download_verified(
            &reqwest::Client::new(),
            &url,
            &sha(BODY),
            10,
            tmp.path(),
            &once(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ArtifactError::Download { .. }), "{err}");
        assert!(err.to_string().contains("404"), "{err}");
        assert!(err.to_string().contains(&url), "{err}");
        assert_eq!(files_in(tmp.path()), 0);
    }

    // ---- retries ----

    #[tokio::test]
    async fn a_download_cut_mid_way_resumes_with_range_and_ends_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let half = BODY.len() / 2;
        let (url, seen) = script(move |i, request| match i {
            // Promises the whole body, sends half and closes.
            0 => (
                response(
                    &format!(
                        "200 OK\r\nAccept-Ranges: bytes\r\nContent-Length: {}",
                        BODY.len()
                    ),
                    &BODY[..half],
                ),
                false,
            ),
            _ if request.contains(&format!("\r\nrange: bytes={half}-\r\n")) => closing(
                &format!(
                    "206 Partial Content\r\nContent-Range: bytes {half}-{}/{}",
                    BODY.len() - 1,
                    BODY.len()
                ),
                &BODY[half..],
            ),
            _ => closing("400 Bad Request", b"expected a range"),
        })
        .await;
        let path = download(&url, BODY, tmp.path(), &quick()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), BODY);
        assert_eq!(sha256_file(&path).unwrap(), sha(BODY));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(!seen[0].contains("range:"), "{}", seen[0]);
        assert!(
            seen[1].contains(&format!("\r\nrange: bytes={half}-\r\n")),
            "{}",
            seen[1]
        );
        assert_eq!(files_in(tmp.path()), 1);
    }

    #[tokio::test]
    async fn a_server_that_ignores_the_range_is_read_again_from_the_start() {
        let tmp = tempfile::tempdir().unwrap();
        let (url, seen) = script(|i, _| match i {
            0 => (
                response(
                    &format!("200 OK\r\nContent-Length: {}", BODY.len()),
                    &BODY[..7],
                ),
                false,
            ),
            _ => closing("200 OK", BODY),
        })
        .await;
        let path = download(&url, BODY, tmp.path(), &quick()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), BODY);
        let seen = seen.lock().unwrap();
        assert!(seen[1].contains("range: bytes=7-"), "{}", seen[1]);
    }

    #[tokio::test]
    async fn a_partial_answer_for_other_bytes_starts_the_file_over() {
        let tmp = tempfile::tempdir().unwrap();
        let len = BODY.len();
        let (url, seen) = script(move |i, _| match i {
            0 => (
                response(&format!("200 OK\r\nContent-Length: {len}"), &BODY[..7]),
                false,
            ),
            // Bytes from 3, not from 7.
            1 => closing(
                &format!(
                    "206 Partial Content\r\nContent-Range: bytes 3-{}/{len}",
                    len - 1
                ),
                &BODY[3..],
            ),
            _ => closing("200 OK", BODY),
        })
        .await;
        let path = download(&url, BODY, tmp.path(), &quick()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), BODY);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(!seen[2].contains("range:"), "{}", seen[2]);
    }

    #[tokio::test]
    async fn a_busy_or_failing_server_is_asked_again_until_it_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let (url, seen) = script(|i, _| match i {
            0 => closing("429 Too Many Requests\r\nRetry-After: 1", b"{}"),
            1 => closing("503 Service Unavailable", b""),
            2 => closing("408 Request Timeout", b""),
            _ => closing("200 OK", BODY),
        })
        .await;
        let path = download(&url, BODY, tmp.path(), &quick()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), BODY);
        assert_eq!(seen.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn refusals_are_not_retried() {
        for status in ["404 Not Found", "403 Forbidden", "401 Unauthorized"] {
            let tmp = tempfile::tempdir().unwrap();
            let (url, seen) = script(move |_, _| closing(status, b"{}")).await;
            let err = download(&url, BODY, tmp.path(), &quick())
                .await
                .unwrap_err();
            assert!(err.to_string().contains(status), "{err}");
            assert_eq!(seen.lock().unwrap().len(), 1, "{status}");
            assert_eq!(files_in(tmp.path()), 0);
        }
    }

    #[tokio::test]
    async fn retries_stop_at_the_attempt_limit_or_the_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let (url, seen) = script(|_, _| closing("503 Service Unavailable", b"")).await;
        let err = download(&url, BODY, tmp.path(), &quick())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains(
                "server answered 503 Service Unavailable (gave up after 20 attempts over "
            ),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 20);

        // A deadline already past: one attempt, then no pause fits.
        let (url, seen) = script(|_, _| closing("503 Service Unavailable", b"")).await;
        let retry = Retry {
            deadline: Instant::now(),
            ..quick()
        };
        let client = reqwest::Client::new();
        let err = download_verified(
            &client,
            &url,
            &sha(BODY),
            BODY.len() as u64,
            tmp.path(),
            &retry,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ArtifactError::Download { .. }), "{err}");
        assert!(seen.lock().unwrap().len() <= 1);
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[tokio::test]
    async fn wrong_bytes_start_over_once_then_fail() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wrong = BODY.to_vec();
        wrong[3] ^= 1;
        let (url, seen) = script(move |_, _| closing("200 OK", &wrong)).await;
        let err = download(&url, BODY, tmp.path(), &quick())
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert_eq!(files_in(tmp.path()), 0);

        // Wrong once (a bit flipped on the way), right the second time.
        let mut wrong = BODY.to_vec();
        wrong[3] ^= 1;
        let (url, seen) = script(move |i, _| match i {
            0 => closing("200 OK", &wrong),
            _ => closing("200 OK", BODY),
        })
        .await;
        let path = download(&url, BODY, tmp.path(), &quick()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), BODY);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert!(!seen[1].contains("range:"), "{}", seen[1]);
    }

    #[tokio::test]
    async fn an_artifact_of_another_size_starts_over_once_then_fails() {
        // The server holds 50 bytes where the release has 100, and says so
        // (Content-Length, then Content-Range): nothing to resume.
        let tmp = tempfile::tempdir().unwrap();
        let (url, seen) = script(|_, _| closing("200 OK", &[b'x'; 50])).await;
        let err = download(&url, &[b'x'; 100], tmp.path(), &quick())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::SizeMismatch {
                    expected: 100,
                    got: 50,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 2);

        let (url, seen) = script(|i, _| match i {
            0 => (
                response("200 OK\r\nContent-Length: 100", &[b'x'; 10]),
                false,
            ),
            _ => closing(
                "416 Range Not Satisfiable\r\nContent-Range: bytes */50",
                b"{}",
            ),
        })
        .await;
        let err = download(&url, &[b'x'; 100], tmp.path(), &quick())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::SizeMismatch {
                    expected: 100,
                    got: 50,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(files_in(tmp.path()), 0);
    }

    #[test]
    fn pauses_back_off_honour_retry_after_and_stay_capped() {
        let r = Retry::until(far());
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(r.pause(1, None, 0.0), ms(500));
        assert_eq!(r.pause(2, None, 0.0), s(1));
        assert_eq!(r.pause(3, None, 0.0), s(2));
        assert_eq!(r.pause(5, None, 0.0), s(8));
        assert_eq!(r.pause(6, None, 0.0), s(10));
        assert_eq!(r.pause(1000, None, 0.0), s(10));
        // Jitter adds up to half.
        assert_eq!(r.pause(6, None, 1.0), s(15));
        assert_eq!(r.pause(1, None, 0.5), ms(625));
        // Never sooner than the server asks, up to the cap.
        assert_eq!(r.pause(1, Some(s(3)), 0.0), s(3));
        assert_eq!(r.pause(6, Some(s(3)), 0.0), s(10));
        assert_eq!(r.pause(1, Some(s(3600)), 0.0), s(30));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..=1.0).contains(&j), "{j}");
        }
    }
}
