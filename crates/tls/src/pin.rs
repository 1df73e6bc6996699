//! A pin of the server's certificate: the SHA-256 of its DER encoding, as
//! `openssl x509 -outform der | sha256sum` prints it. The whole certificate
//! rather than its public key: a pin then names one issued certificate,
//! which is what `certs init` prints, and a renewed certificate must be
//! pinned again even if it kept its key.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::TlsError;

const PREFIX: &str = "sha256:";

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pin([u8; 32]);

impl Pin {
    pub fn of_der(cert: &[u8]) -> Pin {
        Pin(Sha256::digest(cert).into())
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `sha256:` and 64 hex digits, in either case; colons between the digits
/// are allowed, so that openssl's `-fingerprint` output can be pasted.
impl FromStr for Pin {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Pin, TlsError> {
        let bad = || TlsError::Pin(s.to_string());
        let trimmed = s.trim();
        let (scheme, digits) = trimmed.split_at_checked(PREFIX.len()).ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case(PREFIX) {
            return Err(bad());
        }
        let digits: String = digits.chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes).map_err(|_| bad())?;
        Ok(Pin(bytes))
    }
}

/// The server's certificate chains to a trusted root but is not the pinned
/// one.
#[derive(Debug)]
pub struct PinMismatch {
    pub pinned: Pin,
    pub presented: Pin,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate is {}, not the pinned {}",
            self.presented, self.pinned
        )
    }
}

impl std::error::Error for PinMismatch {}

/// The usual chain and name checks, then the pin: a pin narrows what the
/// roots allow, it never replaces them.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pub inner: Arc<WebPkiServerVerifier>,
    pub pin: Pin,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let presented = Pin::of_der(end_entity);
        if presented != self.pin {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    pinned: self.pin,
                    presented,
                })),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints_and_openssl_fingerprints() {
        let pin = Pin::of_der(b"certificate");
        assert_eq!(pin.to_string().parse::<Pin>().unwrap(), pin);
        let openssl = hex::encode_upper(pin.0)
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(format!("SHA256:{openssl}").parse::<Pin>().unwrap(), pin);
    }

    #[test]
    fn refuses_other_forms() {
        let hex64 = "ab".repeat(32);
        for bad in [
            hex64.clone(),
            format!("sha1:{hex64}"),
            format!("sha256:{}", &hex64[2..]),
            format!("sha256:{hex64}00"),
            format!("sha256:{}zz", &hex64[2..]),
            "sha256".into(),
            String::new(),
        ] {
            let err = bad.parse::<Pin>().unwrap_err().to_string();
            assert!(err.contains("sha256:<64 hex digits>"), "{bad}: {err}");
        }
    }
}
