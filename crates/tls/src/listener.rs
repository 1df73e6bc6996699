//! A TLS listener for `axum::serve`. Each handshake runs in a task of its
//! own, under a deadline: a client that connects and says nothing, or
//! trickles its hello, holds one task for a while and never the accept
//! loop, which keeps taking connections and hands over whichever handshake
//! finishes first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longer than any honest client needs on a slow link, short enough that
/// silent connections do not pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Past this many handshakes in flight, connections wait in the kernel's
/// backlog instead of each costing a task and a buffer here.
const MAX_HANDSHAKES: usize = 1024;

/// The content type of a TLS handshake record, the first byte a client sends.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The body of the answer to a connection that speaks plain HTTP to the TLS
/// port: the API's JSON error body.
const PLAIN_HTTP_BODY: &str = r#"{"error":{"code":"bad_request","message":"this port speaks TLS: use https:// (this request was sent as plain HTTP)"}}"#;

async fn answer_plain_http(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{PLAIN_HTTP_BODY}",
        PLAIN_HTTP_BODY.len()
    );
    // Best effort: the client may be gone already.
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Closing with the request still unread would reset the connection,
    // and the client could lose the answer: read what it sent (bounded,
    // and under the handshake deadline) until it closes its side.
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

type Handshake = (SocketAddr, Result<TlsStream<TcpStream>, String>);

pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Handshake>,
    timeout: Duration,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
            timeout: HANDSHAKE_TIMEOUT,
        }
    }

    fn start_handshake(&mut self, stream: TcpStream, addr: SocketAddr) {
        let acceptor = self.acceptor.clone();
        let timeout = self.timeout;
        self.handshakes.spawn(async move {
            // Small writes (the session ticket, then a short answer) would
            // otherwise wait for the client's delayed ACK.
            let _ = stream.set_nodelay(true);
            let handshake = async {
                // A TLS connection opens with a handshake record; anything
                // else is most likely plain HTTP sent to the wrong scheme,
                // which gets an answer it can show instead of a reset.
                let mut first = [0u8; 1];
                if stream.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE_RECORD {
                    answer_plain_http(stream).await;
                    return Err(std::io::Error::other("plain HTTP sent to the TLS port"));
                }
                acceptor.accept(stream).await
            };
            let result = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(tls)) => Ok(tls),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no handshake within {timeout:?}")),
            };
            (addr, result)
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    // Cancel-safe, as `axum::serve` needs for its graceful shutdown: both
    // awaited futures are, and nothing else is awaited in between.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                // A finished handshake has a client waiting on it.
                biased;
                Some(done) = self.handshakes.join_next() => match done {
                    Ok((addr, Ok(tls))) => return (tls, addr),
                    Ok((addr, Err(e))) => tracing::debug!(%addr, error = %e, "tls handshake failed"),
                    Err(e) => tracing::warn!(error = %e, "tls handshake task failed"),
                },
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => match accepted {
                    Ok((stream, addr)) => self.start_handshake(stream, addr),
                    Err(e) => accept_error(e).await,
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// As axum does for its own TcpListener: errors of one connection are
/// skipped, others (out of file descriptors) are waited out.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection; retrying in 1s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{certs, ClientTls, ServerTls};
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Guards against a hung test only; nothing here depends on speed.
    const GUARD: Duration = Duration::from_secs(30);

    /// A listener with the quick-start certificates, serving "hello" on
    /// every connection it hands over.
    async fn serve(dir: &std::path::Path, timeout: Duration) -> SocketAddr {
        certs::generate(dir, &[], false).unwrap();
        let config = ServerTls::load(&dir.join(certs::SERVER_CERT), &dir.join(certs::SERVER_KEY))
            .unwrap()
            .config;
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = TlsListener::new(tcp, config);
        listener.timeout = timeout;
        tokio::spawn(async move {
            loop {
                let (mut tls, _) = listener.accept().await;
                tokio::spawn(async move {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_silent_client_does_not_hold_up_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path(), Duration::from_secs(3600)).await;
        // Connects first, then never speaks.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let client = ClientTls {
            ca_file: Some(dir.path().join(certs::CA_CERT)),
            pin: None,
        };
        let connector = tokio_rustls::TlsConnector::from(client.config().unwrap());
        let got = tokio::time::timeout(GUARD, async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut got = String::new();
            tls.read_to_string(&mut got).await.unwrap();
            got
        })
        .await
        .expect("the second client waited for the silent one");
        assert_eq!(got, "hello");
    }

    #[tokio::test]
    async fn a_silent_client_is_let_go_after_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path(), Duration::from_millis(200)).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(GUARD, silent.read(&mut buf))
            .await
            .expect("the connection was kept past the deadline");
        // Closed without a byte: the server never got a hello to answer.
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn plain_http_gets_an_answer_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve(dir.path(), Duration::from_secs(3600)).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        tokio::time::timeout(GUARD, tcp.read_to_string(&mut got))
            .await
            .expect("no answer")
            .unwrap();
        assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
        let body = got.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "bad_request");
        assert!(json["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("this port speaks TLS"));
    }
}
