//! `rollwave logs --node N --service S [--since T] [--follow]`: a service's
//! output on a node, which the control plane reads from the node's agent.

use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use rollwave_api::ErrorBody;

use crate::client::{user_error, ApiClient};

pub struct Show<'a> {
    pub since: Option<&'a str>,
    pub follow: bool,
    pub json: bool,
}

pub async fn show(
    api: &ApiClient,
    node: &str,
    service: &str,
    how: Show<'_>,
) -> anyhow::Result<ExitCode> {
    // Both go into the path: checked here, in the flags' names.
    rollwave_core::validate_service_name("--service", service)
        .map_err(|e| user_error(e.to_string()))?;
    if !valid_node_name(node) {
        return Err(user_error(format!(
            "--node: {node:?} is not a node name (1-128 characters of a-z, A-Z, 0-9, '-', '_', '.')"
        )));
    }
    let mut path = rollwave_api::service_logs_path(node, service);
    let mut query = Vec::new();
    if let Some(since) = how.since {
        query.push(format!("since={}", encode(since)));
    }
    if how.follow {
        query.push("follow=true".to_string());
    }
    if !query.is_empty() {
        path = format!("{path}?{}", query.join("&"));
    }
    let resp = api.get_response(&path).await?;
    if !how.follow {
        let truncated = resp
            .headers()
            .get(rollwave_api::SERVICE_LOGS_TRUNCATED_HEADER)
            .is_some_and(|v| v == "true");
        let text = resp.text().await.context("reading the log")?;
        if truncated {
            eprintln!(
                "(the newest 1 MiB of {service}'s output on {node}; --since shows a shorter span whole)"
            );
        }
        for line in text.lines() {
            print_line(line, how.json)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut events = SseReader::default();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("reading the log stream")?;
        for (kind, data) in events.feed(&chunk) {
            match kind.as_str() {
                "lines" => {
                    for line in data.split('\n') {
                        print_line(line, how.json)?;
                    }
                }
                "gap" => eprintln!("({data})"),
                "error" => {
                    let message = serde_json::from_str::<ErrorBody>(&data)
                        .map(|b| b.error.message)
                        .unwrap_or(data);
                    anyhow::bail!("following {service} on {node}: {message}");
                }
                _ => {}
            }
            // Whoever read the output is gone: following is all this does.
            if crate::out::closed() {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    anyhow::bail!("following {service} on {node}: the control plane ended the stream")
}

/// A line as the agent keeps it, `<time> <line>`: printed as is, or as
/// `{"time", "line"}`.
fn print_line(line: &str, json: bool) -> anyhow::Result<()> {
    if json {
        let (time, text) = line.split_once(' ').unwrap_or(("", line));
        let value = serde_json::json!({ "time": time, "line": text });
        crate::outln!("{}", serde_json::to_string(&value)?);
    } else {
        crate::outln!("{line}");
    }
    Ok(())
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Percent-encodes all but the unreserved characters of RFC 3986.
fn encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Server-sent events, parsed as the bytes arrive: `event:` and `data:`
/// fields, an event per blank line.
#[derive(Default)]
struct SseReader {
    pending: Vec<u8>,
    kind: Option<String>,
    data: Vec<String>,
}

impl SseReader {
    /// The events that `bytes` completes, as (type, data).
    fn feed(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=i).collect();
            let line = String::from_utf8_lossy(&raw[..i]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if !self.data.is_empty() || self.kind.is_some() {
                    let kind = self.kind.take().unwrap_or_else(|| "message".into());
                    out.push((kind, std::mem::take(&mut self.data).join("\n")));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.kind = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_events_split_anywhere() {
        let stream = b":\n\nevent: lines\ndata: T1 a\ndata: T2 b\n\nevent: gap\ndata: lost\n\n";
        for cut in 0..stream.len() {
            let mut r = SseReader::default();
            let mut got = r.feed(&stream[..cut]);
            got.extend(r.feed(&stream[cut..]));
            assert_eq!(
                got,
                [
                    ("lines".to_string(), "T1 a\nT2 b".to_string()),
                    ("gap".to_string(), "lost".to_string()),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn encodes_a_query_value() {
        assert_eq!(encode("10m"), "10m");
        assert_eq!(
            encode("2026-01-02T15:04:05+01:00"),
            "2026-01-02T15%3A04%3A05%2B01%3A00"
        );
    }
}
