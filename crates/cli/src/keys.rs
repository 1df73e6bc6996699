//! Release signing on the operator's side: `keys generate` and the
//! signature `release push` uploads. Keys and signatures are in minisign's
//! formats, so that `minisign` itself can make or check either.

use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rollwave_core::signing::{key_id_hex, trusted_comment};
use rollwave_core::ReleaseSignature;
use sha2::{Digest, Sha256};

use crate::client::user_error;

/// What `keys generate` wrote.
pub struct Generated {
    pub secret: PathBuf,
    pub public: PathBuf,
    /// The public key's base64 line, for `trusted_keys`.
    pub public_key: String,
    pub key_id: String,
}

/// Writes a new key pair as `dir/name.key` (secret, 0600, not encrypted) and
/// `dir/name.pub`. Refuses to replace either file unless `force`.
pub fn generate(dir: &Path, name: &str, force: bool) -> anyhow::Result<Generated> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && Path::new(name).file_name() == Some(name.as_ref());
    if !plain {
        return Err(user_error(format!(
            "--name: {name:?} must be a plain file name"
        )));
    }
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    if !force {
        for path in [&secret, &public] {
            if fs::symlink_metadata(path).is_ok() {
                return Err(user_error(format!(
                    "{} exists: pass --force to replace it",
                    path.display()
                )));
            }
        }
    }
    fs::create_dir_all(dir)
        .map_err(|e| user_error(format!("--dir: creating {}: {e}", dir.display())))?;
    let minisign::KeyPair { pk, sk } = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| anyhow::anyhow!("generating a key pair: {e}"))?;
    let key_id = key_id_hex(
        pk.keynum()
            .try_into()
            .map_err(|_| anyhow::anyhow!("generating a key pair: the key id is not 8 bytes"))?,
    );
    let secret_box = sk
        .to_box(Some(&format!(
            "rollwave secret key {key_id}, not encrypted: keep it private"
        )))
        .map_err(|e| anyhow::anyhow!("encoding the secret key: {e}"))?;
    let public_box = pk
        .to_box()
        .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))?;
    write_new(&secret, secret_box.to_string().as_bytes(), 0o600)?;
    write_new(&public, public_box.into_string().as_bytes(), 0o644)?;
    Ok(Generated {
        secret,
        public,
        public_key: pk.to_base64(),
        key_id,
    })
}

/// Writes `path` through a new temporary sibling created with `mode`, so the
/// secret is never readable by others, not even for a moment, and a file
/// being replaced is replaced whole.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    rollwave_tls::write_atomic(path, bytes, mode)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Signs `artifact` as `service@version` with the minisign secret key in
/// `key_file`; returns the `.minisig` text.
pub fn sign(
    key_file: &Path,
    artifact: &[u8],
    service: &str,
    version: &str,
) -> anyhow::Result<String> {
    let at = format!("--sign-key {}", key_file.display());
    let text =
        fs::read_to_string(key_file).map_err(|e| user_error(format!("{at}: reading it: {e}")))?;
    let sk_box = minisign::SecretKeyBox::from_string(&text)
        .map_err(|e| user_error(format!("{at}: not a minisign secret key: {e}")))?;
    let sk = if is_encrypted(&text) {
        // minisign asks for the password on the terminal.
        minisign::SecretKey::from_box(sk_box, None)
            .map_err(|e| user_error(format!("{at}: password-protected key: {e}")))?
    } else {
        minisign::SecretKey::from_unencrypted_box(sk_box)
            .map_err(|e| user_error(format!("{at}: not a minisign secret key: {e}")))?
    };
    let pk = minisign::PublicKey::from_secret_key(&sk)
        .map_err(|e| user_error(format!("{at}: not a minisign secret key: {e}")))?;
    let sha256 = format!("{:x}", Sha256::digest(artifact));
    let comment = trusted_comment(service, version, &sha256);
    let signature = minisign::sign(
        Some(&pk),
        &sk,
        artifact,
        Some(&comment),
        Some("rollwave release signature"),
    )
    .map_err(|e| anyhow::anyhow!("signing with {}: {e}", key_file.display()))?;
    Ok(signature.into_string())
}

/// Whether a minisign secret key file holds a password-protected key: its
/// key line names a key derivation function.
fn is_encrypted(text: &str) -> bool {
    text.lines()
        .nth(1)
        .and_then(|line| BASE64.decode(line.trim()).ok())
        .is_some_and(|bytes| bytes.get(2..4).is_some_and(|kdf| kdf != [0, 0]))
}

/// Reads a detached signature made elsewhere. A signature whose trusted
/// comment does not name the release is still uploaded (the control plane
/// cannot verify it, agents refuse it), with a warning.
pub fn read_signature(path: &Path, service: &str, version: &str) -> anyhow::Result<String> {
    let at = format!("--signature {}", path.display());
    let text =
        fs::read_to_string(path).map_err(|e| user_error(format!("{at}: reading it: {e}")))?;
    let signature = ReleaseSignature::parse(&text).map_err(|e| user_error(format!("{at}: {e}")))?;
    if !signature.names(service, version) {
        eprintln!(
            "warning: {at}: its trusted comment {:?} does not name {service}@{version}; agents with trusted keys will refuse the release",
            signature.trusted_comment()
        );
    }
    Ok(signature.text().to_string())
}

/// The request header carrying a signature.
pub fn signature_header(signature: &str) -> (&'static str, String) {
    (rollwave_api::SIGNATURE_HEADER, BASE64.encode(signature))
}
