//! The control plane's certificate and key.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::{invalid, provider, read, read_certs, Pin, TlsError};

const CERT: &str = "TLS certificate";
const KEY: &str = "TLS key";

#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The pin of the leaf certificate, for clients that pin it.
    pub pin: Pin,
}

impl ServerTls {
    /// From a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
        let chain = read_certs(CERT, cert)?;
        let pin = Pin::of_der(&chain[0]);
        let key_pem = read(KEY, key)?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                invalid(KEY, key, "holds no PEM private key")
            }
            e => invalid(KEY, key, format!("not PEM: {e}")),
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => invalid(
                    KEY,
                    key,
                    format!("is not the key of the certificate {}", cert.display()),
                ),
                e => invalid(KEY, key, e.to_string()),
            })?;
        // The API and the agents' WebSocket upgrade are served over HTTP/1.1
        // only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(config),
            pin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs;

    #[test]
    fn loads_what_certs_init_writes_and_names_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let made = certs::generate(dir.path(), &[], false).unwrap();
        let cert = dir.path().join(certs::SERVER_CERT);
        let key = dir.path().join(certs::SERVER_KEY);
        let tls = ServerTls::load(&cert, &key).unwrap();
        assert_eq!(tls.pin, made.pin);

        let ca_key = dir.path().join(certs::CA_KEY);
        let err = ServerTls::load(&cert, &ca_key).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "TLS key {}: is not the key of the certificate {}",
                ca_key.display(),
                cert.display()
            )
        );
        let err = ServerTls::load(&key, &key).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "TLS certificate {}: holds no PEM certificate",
                key.display()
            )
        );
        let err = ServerTls::load(&cert, &cert).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("TLS key {}: holds no PEM private key", cert.display())
        );
        let missing = dir.path().join("nope.pem");
        let err = ServerTls::load(&missing, &key).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "reading TLS certificate {}: no such file or directory",
                missing.display()
            )
        );
    }
}
