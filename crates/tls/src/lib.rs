//! TLS for every connection to the control plane, configured in one place:
//! the server's certificate and key ([`ServerTls`]), what clients trust
//! ([`ClientTls`]: a CA file instead of the web roots, and an optional pin of
//! the server's certificate), the accept loop that runs handshakes off the
//! listener ([`TlsListener`]) and the quick-start CA ([`certs::generate`]).
//! The secrets that go with them (tokens, credentials, keys) are written
//! through [`write_atomic`].
//!
//! ring is the only crypto provider, named explicitly rather than taken from
//! rustls's process-wide default: that default depends on which features
//! other crates turned on, and an aws-lc build needs a C toolchain.

pub mod certs;
mod client;
mod listener;
mod pin;
mod private_file;
mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use client::{describe_error, ClientTls};
pub use listener::TlsListener;
pub use pin::{Pin, PinMismatch};
pub use private_file::write_atomic;
pub use rustls::{ClientConfig, ServerConfig};
pub use server::ServerTls;

/// What can go wrong; each message is one line naming the file or value.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {}: {cause}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        cause: String,
    },
    #[error("{what} {}: {problem}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{} already exists (pass --force to replace it)", .0.display())]
    Exists(PathBuf),
    #[error("writing {}: {cause}", path.display())]
    Write { path: PathBuf, cause: String },
    #[error("{0:?} is not a DNS name or an IP address")]
    Host(String),
    #[error("{0:?} is not a pin like sha256:<64 hex digits>")]
    Pin(String),
    #[error("generating the {what}: {cause}")]
    Generate { what: &'static str, cause: String },
    #[error("setting up TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        what,
        path: path.to_path_buf(),
        cause: rollwave_core::describe_io(&e),
    })
}

fn invalid(what: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Every certificate of a PEM file, at least one.
fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(what, path, "holds no PEM certificate"));
    }
    Ok(certs)
}
