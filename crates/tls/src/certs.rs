//! `rollwave certs init`: a private CA and a server certificate it signed,
//! enough to run the control plane over TLS without an existing PKI. Agents
//! and the CLI trust the CA, so the server's certificate can be reissued
//! (for another name) without touching every node.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::{Pin, TlsError};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";

/// Names every server certificate is valid for, so that a control plane on
/// this machine is reachable as it is in the quick start.
pub const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

const CA_VALIDITY: Duration = Duration::days(3650);
/// Apple's platforms refuse server certificates valid for longer, even from
/// a private CA, and the dashboard should open there.
const SERVER_VALIDITY: Duration = Duration::days(825);
/// Lets a machine whose clock is a little behind accept a fresh certificate.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug)]
pub struct Generated {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The server certificate's names, as its subject alternative names.
    pub names: Vec<String>,
    pub not_after: OffsetDateTime,
    pub pin: Pin,
}

/// Writes a new CA and server certificate into `dir` (created if need be).
/// `hosts` are names or addresses the server is reached by, besides
/// [`LOCAL_NAMES`]. Existing files are kept, and nothing is written, unless
/// `force`.
pub fn generate(dir: &Path, hosts: &[String], force: bool) -> Result<Generated, TlsError> {
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|n| n.to_string()).collect();
    for host in hosts {
        let host = host.trim().trim_start_matches('[').trim_end_matches(']');
        if !is_host(host) {
            return Err(TlsError::Host(host.to_string()));
        }
        let host = host.to_ascii_lowercase();
        if !names.contains(&host) {
            names.push(host);
        }
    }
    let paths = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY].map(|f| dir.join(f));
    if !force {
        if let Some(existing) = paths.iter().find(|p| p.exists()) {
            return Err(TlsError::Exists(existing.clone()));
        }
    }

    let now = OffsetDateTime::now_utc();
    let generate = |what| {
        move |e: rcgen::Error| TlsError::Generate {
            what,
            cause: e.to_string(),
        }
    };

    let ca_key = KeyPair::generate().map_err(generate("CA key"))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    // A name of its own: a client given another quick-start CA then finds
    // no issuer (UnknownIssuer) rather than one whose signature fails.
    let id = Sha256::digest(ca_key.public_key_raw());
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("rollwave quick-start CA {}", hex::encode(&id[..4])),
    );
    // It signs server certificates and nothing that signs in turn.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - BACKDATE;
    ca.not_after = now + CA_VALIDITY;
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(generate("CA certificate"))?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().map_err(generate("server key"))?;
    let mut server =
        CertificateParams::new(names.clone()).map_err(generate("server certificate"))?;
    server.distinguished_name = rcgen::DistinguishedName::new();
    server
        .distinguished_name
        .push(DnType::CommonName, "rollwave control plane");
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    server.not_before = now - BACKDATE;
    server.not_after = now + SERVER_VALIDITY;
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .map_err(generate("server certificate"))?;

    std::fs::create_dir_all(dir).map_err(|e| TlsError::Write {
        path: dir.to_path_buf(),
        cause: rollwave_core::describe_io(&e),
    })?;
    let [ca_cert_path, ca_key_path, server_cert_path, server_key_path] = paths;
    write(&ca_cert_path, &ca_cert.pem(), 0o644, force)?;
    write(&ca_key_path, &issuer.key().serialize_pem(), 0o600, force)?;
    write(&server_cert_path, &server_cert.pem(), 0o644, force)?;
    write(&server_key_path, &server_key.serialize_pem(), 0o600, force)?;
    Ok(Generated {
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        server_cert: server_cert_path,
        server_key: server_key_path,
        names,
        not_after: server.not_after,
        pin: Pin::of_der(server_cert.der()),
    })
}

fn is_host(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok()
        || matches!(
            rustls::pki_types::ServerName::try_from(host),
            Ok(rustls::pki_types::ServerName::DnsName(_))
        )
}

/// Creates the file with `mode` from the start, so that a key is never
/// readable by others, even for a moment. A file being replaced is removed
/// first: opening it would keep its old mode.
fn write(path: &Path, contents: &str, mode: u32, replace: bool) -> Result<(), TlsError> {
    let failed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::AlreadyExists => TlsError::Exists(path.to_path_buf()),
        _ => TlsError::Write {
            path: path.to_path_buf(),
            cause: rollwave_core::describe_io(&e),
        },
    };
    if replace {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
            _ => {}
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_four_files_with_private_keys_private() {
        let dir = tempfile::tempdir().unwrap();
        let made = generate(
            dir.path(),
            &["rollwave.example".into(), "10.0.0.1".into()],
            false,
        )
        .unwrap();
        assert_eq!(
            made.names,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "rollwave.example",
                "10.0.0.1"
            ]
        );
        for (path, mode) in [
            (&made.ca_cert, 0o644),
            (&made.ca_key, 0o600),
            (&made.server_cert, 0o644),
            (&made.server_key, 0o600),
        ] {
            let meta = std::fs::metadata(path).unwrap();
            assert_eq!(
                meta.permissions().mode() & 0o777,
                mode,
                "{}",
                path.display()
            );
        }
        let der = crate::read_certs("certificate", &made.server_cert).unwrap();
        assert_eq!(Pin::of_der(&der[0]), made.pin);
    }

    #[test]
    fn keeps_existing_files_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate(dir.path(), &[], false).unwrap();
        let err = generate(dir.path(), &[], false).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{} already exists (pass --force to replace it)",
                first.ca_cert.display()
            )
        );
        let second = generate(dir.path(), &[], true).unwrap();
        assert_ne!(first.pin, second.pin);
        let meta = std::fs::metadata(&second.server_key).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn refuses_what_is_not_a_host() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["a b", "", "http://x", "x..y"] {
            let err = generate(dir.path(), &[bad.to_string()], false).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{bad:?} is not a DNS name or an IP address")
            );
        }
        assert!(!dir.path().join(CA_CERT).exists());
        generate(dir.path(), &["[::2]".into()], false).unwrap();
    }
}
