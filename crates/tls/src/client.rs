//! What a client of the control plane trusts. The CLI, the agent's artifact
//! downloads and the agent's session all build their TLS from [`ClientTls`],
//! so they cannot disagree about which server is genuine.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, RootCertStore};

use crate::pin::{PinMismatch, PinnedVerifier};
use crate::{invalid, provider, read_certs, Pin, TlsError};

#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Trust only the CA certificates in this PEM file; without it, the
    /// usual web roots.
    pub ca_file: Option<PathBuf>,
    /// Also require the server's certificate to be this one.
    pub pin: Option<Pin>,
}

impl ClientTls {
    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                const WHAT: &str = "CA file";
                for (i, cert) in read_certs(WHAT, path)?.into_iter().enumerate() {
                    roots
                        .add(cert)
                        .map_err(|e| invalid(WHAT, path, format!("certificate {}: {e}", i + 1)))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let roots = Arc::new(roots);
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let config = match self.pin {
            None => builder.with_root_certificates(roots),
            Some(pin) => {
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedVerifier { inner, pin }))
            }
        };
        Ok(Arc::new(config.with_no_client_auth()))
    }
}

/// The TLS failure behind a failed connection, in one line, if that is why
/// it failed: `invalid peer certificate: UnknownIssuer`, or the pin that did
/// not match. HTTP and WebSocket clients carry rustls's error inside an
/// `io::Error`, whose `source()` skips it, hence the look inside.
pub fn describe_error(e: &(dyn Error + 'static)) -> Option<String> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(tls));
        }
        current = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    None
}

fn describe_rustls(e: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = e {
        if let Some(mismatch) = other.0.downcast_ref::<PinMismatch>() {
            return format!("invalid peer certificate: {mismatch}");
        }
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;
    use rustls::pki_types::ServerName;

    /// A whole handshake between `client` and a server with the
    /// certificate `certs init` wrote into `dir`, in memory.
    fn handshake(client: Arc<rustls::ClientConfig>, dir: &std::path::Path) -> Result<(), String> {
        let server =
            crate::ServerTls::load(&dir.join(certs::SERVER_CERT), &dir.join(certs::SERVER_KEY))
                .unwrap()
                .config;
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut flight = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut flight).unwrap();
            }
            let mut rd = &flight[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            // The server's own errors are not what is tested here.
            let _ = s.process_new_packets();
            let mut flight = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut flight).unwrap();
            }
            if flight.is_empty() && !c.wants_write() {
                return Err("the handshake stalled".into());
            }
            let mut rd = &flight[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().map_err(|e| describe_rustls(&e))?;
        }
        Ok(())
    }

    #[test]
    fn a_ca_file_is_all_that_is_trusted() {
        let ours = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        certs::generate(ours.path(), &[], false).unwrap();
        certs::generate(other.path(), &[], false).unwrap();
        let tls = ClientTls {
            ca_file: Some(ours.path().join(certs::CA_CERT)),
            pin: None,
        };
        let config = tls.config().unwrap();
        handshake(config.clone(), ours.path()).unwrap();
        let err = handshake(config, other.path()).unwrap_err();
        assert_eq!(err, "invalid peer certificate: UnknownIssuer");
        // Without a CA file, only the web roots: a private CA is not one.
        let err = handshake(ClientTls::default().config().unwrap(), ours.path());
        assert_eq!(err.unwrap_err(), "invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn a_pin_must_match_too() {
        let dir = tempfile::tempdir().unwrap();
        let made = certs::generate(dir.path(), &[], false).unwrap();
        let ca_file = Some(dir.path().join(certs::CA_CERT));
        let right = ClientTls {
            ca_file: ca_file.clone(),
            pin: Some(made.pin),
        };
        handshake(right.config().unwrap(), dir.path()).unwrap();
        let wrong_pin = Pin::of_der(b"another certificate");
        let wrong = ClientTls {
            ca_file,
            pin: Some(wrong_pin),
        };
        let err = handshake(wrong.config().unwrap(), dir.path()).unwrap_err();
        assert_eq!(
            err,
            format!(
                "invalid peer certificate: the server's certificate is {}, not the pinned {wrong_pin}",
                made.pin
            )
        );
        // The pin narrows the roots, it does not replace them.
        let pin_only = ClientTls {
            ca_file: None,
            pin: Some(made.pin),
        };
        let err = handshake(pin_only.config().unwrap(), dir.path()).unwrap_err();
        assert_eq!(err, "invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn bad_ca_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let tls = ClientTls {
            ca_file: Some(missing.clone()),
            pin: None,
        };
        let err = tls.config().unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "reading CA file {}: no such file or directory",
                missing.display()
            )
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let tls = ClientTls {
            ca_file: Some(empty.clone()),
            pin: None,
        };
        let err = tls.config().unwrap_err().to_string();
        assert_eq!(
            err,
            format!("CA file {}: holds no PEM certificate", empty.display())
        );
    }

    #[test]
    fn finds_the_tls_error_inside_io_errors() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let wrapped = std::io::Error::other(io);
        assert_eq!(
            describe_error(&wrapped).as_deref(),
            Some("invalid peer certificate: UnknownIssuer")
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(describe_error(&refused), None);
    }
}
