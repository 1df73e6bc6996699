//! Release signatures: what a minisign signature must say to vouch for a
//! release, and the checks an agent with trusted keys applies before it
//! installs one.
//!
//! A signature is the text of a `.minisig` file, made by `rollwave release
//! push --sign-key` or by `minisign -S` anywhere else. It vouches for a
//! release when, in this order:
//!
//! 1. it is one (the task carries a signature at all, and it parses);
//! 2. its key id is one of the agent's trusted keys;
//! 3. it verifies, with that key, over the artifact's bytes and over its
//!    trusted comment;
//! 4. its trusted comment names the release, as the word `service@version`.
//!
//! The last check runs only once the comment is known to be the signer's:
//! without it, an artifact signed for `tool@1.0.0` could be served, under a
//! compromised control plane, as `api@2.0.0`.
//!
//! The bytes are fed by the caller ([`SignatureCheck::update`]), so this
//! module stays free of I/O; the agent streams the downloaded file through it.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

/// How `rollwave release push --sign-key` words the trusted comment: the
/// release it vouches for, and the sha256 of the bytes, for people reading
/// the signature.
pub fn trusted_comment(service: &str, version: &str, sha256: &str) -> String {
    format!(
        "rollwave release {} sha256:{sha256}",
        release_token(service, version)
    )
}

/// The word a trusted comment must contain to vouch for a release.
pub fn release_token(service: &str, version: &str) -> String {
    format!("{service}@{version}")
}

/// A key id as minisign prints it: 16 upper-case hex digits of the 8 id
/// bytes read as a little-endian number.
pub fn key_id_hex(id: [u8; 8]) -> String {
    format!("{:016X}", u64::from_le_bytes(id))
}

/// Why a signature does not vouch for a release.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature is not a minisign signature: {0}")]
    Malformed(String),
    #[error("unsigned (trusted: {trusted})")]
    Unsigned { trusted: String },
    #[error("signed by untrusted key id {key_id} (trusted: {trusted})")]
    UntrustedKey { key_id: String, trusted: String },
    #[error("signed only by untrusted key ids {key_ids} (trusted: {trusted})")]
    UntrustedKeys { key_ids: String, trusted: String },
    #[error("signature does not match the artifact (key id {key_id})")]
    Mismatch { key_id: String },
    #[error("signed for {signed_for}, not {wanted}")]
    OtherRelease { signed_for: String, wanted: String },
}

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";
/// Algorithm bytes of a signature over the BLAKE2b-512 hash of the data.
const PREHASHED: [u8; 2] = *b"ED";
/// Algorithm bytes of a signature over the data itself.
const LEGACY: [u8; 2] = *b"Ed";
/// Algorithm bytes of an Ed25519 public key.
const KEY_ALGORITHM: [u8; 2] = *b"Ed";

/// A parsed minisign signature, kept with its text in a canonical form (four
/// lines, each ending in `\n`), so that two copies of one signature compare
/// equal whatever line endings they travelled with.
#[derive(Clone)]
pub struct ReleaseSignature {
    text: String,
    key_id: String,
    trusted_comment: String,
    parsed: minisign_verify::Signature,
}

impl std::fmt::Debug for ReleaseSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleaseSignature")
            .field("key_id", &self.key_id)
            .field("trusted_comment", &self.trusted_comment)
            .finish()
    }
}

impl ReleaseSignature {
    /// Parses the text of a `.minisig` file. Strict: the lengths are checked
    /// here so that a truncated line is named as such, and legacy signatures
    /// (over the data rather than its hash, `minisign -l`) are refused, as
    /// only prehashed ones can be verified over a stream.
    pub fn parse(text: &str) -> Result<ReleaseSignature, SignatureError> {
        let bad = |why: String| SignatureError::Malformed(why);
        let lines: Vec<&str> = text.trim_end().lines().collect();
        if lines.len() != 4 {
            return Err(bad(format!(
                "it has {} line{}; a .minisig file has 4 (untrusted comment, signature, trusted comment, global signature)",
                lines.len(),
                if lines.len() == 1 { "" } else { "s" }
            )));
        }
        if !lines[0].starts_with(UNTRUSTED_PREFIX) {
            return Err(bad(format!("line 1 must start with {UNTRUSTED_PREFIX:?}")));
        }
        let sig = decode_line(2, lines[1], 74)?;
        let algorithm = [sig[0], sig[1]];
        if algorithm == LEGACY {
            return Err(bad(
                "it is a legacy signature (minisign -l), not prehashed; sign without -l".into(),
            ));
        }
        if algorithm != PREHASHED {
            return Err(bad(format!(
                "line 2: unknown signature algorithm {:?}",
                String::from_utf8_lossy(&algorithm)
            )));
        }
        let Some(comment) = lines[2].strip_prefix(TRUSTED_PREFIX) else {
            return Err(bad(format!("line 3 must start with {TRUSTED_PREFIX:?}")));
        };
        decode_line(4, lines[3], 64)?;
        let mut canonical = String::with_capacity(text.len());
        for line in &lines {
            canonical.push_str(line.trim_end_matches('\r'));
            canonical.push('\n');
        }
        let parsed = minisign_verify::Signature::decode(&canonical)
            .map_err(|e| bad(e.to_string().to_lowercase()))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&sig[2..10]);
        Ok(ReleaseSignature {
            key_id: key_id_hex(id),
            trusted_comment: comment.trim_end_matches('\r').to_string(),
            text: canonical,
            parsed,
        })
    }

    /// The canonical text: what is stored and sent to agents.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The comment the signature covers. Only meaningful once the signature
    /// is verified: before that, anyone could have written it.
    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// Whether the trusted comment names `service@version` as a whole word
    /// (so that neither `api@2.0.0-rc1` nor `myapi@2.0.0` counts).
    pub fn names(&self, service: &str, version: &str) -> bool {
        let token = release_token(service, version);
        self.trusted_comment.split_whitespace().any(|w| w == token)
    }

    /// The release the trusted comment names, for saying what a signature
    /// is for when it is not the one wanted.
    pub fn signed_for(&self) -> String {
        let named = self.trusted_comment.split_whitespace().find(|w| {
            w.split_once('@').is_some_and(|(service, version)| {
                crate::validate_service_name("", service).is_ok()
                    && semver::Version::parse(version).is_ok()
            })
        });
        match named {
            Some(release) => release.to_string(),
            None => format!(
                "another release (trusted comment {:?})",
                self.trusted_comment
            ),
        }
    }
}

/// Decodes the base64 line `n`, which must hold `len` bytes.
fn decode_line(n: usize, line: &str, len: usize) -> Result<Vec<u8>, SignatureError> {
    let bytes = BASE64.decode(line.trim()).map_err(|e| {
        SignatureError::Malformed(format!(
            "line {n}: not base64: {}",
            e.to_string().to_lowercase()
        ))
    })?;
    if bytes.len() != len {
        return Err(SignatureError::Malformed(format!(
            "line {n}: {} bytes where a signature line holds {len}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// A minisign public key an agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    id: String,
    base64: String,
    key: minisign_verify::PublicKey,
}

impl TrustedKey {
    /// From the key's base64 line (`RWQ...`), as `minisign -G` prints it.
    pub fn from_base64(text: &str) -> Result<TrustedKey, String> {
        let text = text.trim();
        let bytes = BASE64
            .decode(text)
            .map_err(|_| format!("{text:?} is not a minisign public key: not base64"))?;
        if bytes.len() != 42 {
            return Err(format!(
                "{text:?} is not a minisign public key: {} bytes where a key has 42",
                bytes.len()
            ));
        }
        if bytes[..2] != KEY_ALGORITHM {
            return Err(format!(
                "{text:?} is not a minisign public key: it is not an Ed25519 key"
            ));
        }
        let key = minisign_verify::PublicKey::from_base64(text)
            .map_err(|e| format!("{text:?} is not a minisign public key: {e}"))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[2..10]);
        Ok(TrustedKey {
            id: key_id_hex(id),
            base64: text.to_string(),
            key,
        })
    }

    /// From the text of a minisign `.pub` file: an untrusted comment line,
    /// then the key's base64 line.
    pub fn from_pub_file(text: &str) -> Result<TrustedKey, String> {
        let key = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with(UNTRUSTED_PREFIX.trim_end()))
            .ok_or_else(|| "holds no public key line".to_string())?;
        TrustedKey::from_base64(key)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key's base64 line, as in a `.pub` file.
    pub fn base64(&self) -> &str {
        &self.base64
    }
}

/// The keys an agent accepts release signatures from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// The same key listed twice (inline and as a file) counts once; two
    /// different keys with one id cannot be told apart by a signature and
    /// are refused.
    pub fn new(keys: Vec<TrustedKey>) -> Result<TrustedKeys, String> {
        let mut out: Vec<TrustedKey> = Vec::with_capacity(keys.len());
        for key in keys {
            match out.iter().find(|k| k.id == key.id) {
                Some(k) if k.key == key.key => {}
                Some(_) => {
                    return Err(format!(
                    "two different keys have the key id {}; a signature names its key by id only",
                    key.id
                ))
                }
                None => out.push(key),
            }
        }
        Ok(TrustedKeys { keys: out })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// The trusted key ids, comma-separated, for messages.
    pub fn ids(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        ids.join(", ")
    }

    /// The signature a task carries, parsed: refuses none at all.
    pub fn require(&self, signature: Option<&str>) -> Result<ReleaseSignature, SignatureError> {
        match signature {
            None => Err(SignatureError::Unsigned {
                trusted: self.ids(),
            }),
            Some(text) => ReleaseSignature::parse(text),
        }
    }

    /// Starts checking `signature`; refuses an untrusted key before a byte
    /// is read.
    pub fn start<'a>(
        &'a self,
        signature: &'a ReleaseSignature,
    ) -> Result<SignatureCheck<'a>, SignatureError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == signature.key_id)
            .ok_or_else(|| SignatureError::UntrustedKey {
                key_id: signature.key_id.clone(),
                trusted: self.ids(),
            })?;
        let verifier = key
            .key
            .verify_stream(&signature.parsed)
            .map_err(|e| SignatureError::Malformed(e.to_string().to_lowercase()))?;
        Ok(SignatureCheck {
            verifier,
            signature,
        })
    }

    /// Of a release's signatures, those by a trusted key, parsed, in the
    /// order given: the ones worth reading the artifact for. Refuses none
    /// at all, and signatures by untrusted keys only (naming them); a
    /// signature that does not parse is skipped when another one is usable.
    pub fn candidates(&self, signatures: &[&str]) -> Result<Vec<ReleaseSignature>, SignatureError> {
        let mut trusted = Vec::new();
        let mut untrusted = Vec::new();
        let mut malformed = None;
        for text in signatures {
            match ReleaseSignature::parse(text) {
                Ok(sig) if self.keys.iter().any(|k| k.id == sig.key_id) => trusted.push(sig),
                Ok(sig) => untrusted.push(sig.key_id),
                Err(e) => {
                    malformed.get_or_insert(e);
                }
            }
        }
        if !trusted.is_empty() {
            return Ok(trusted);
        }
        match (untrusted.len(), malformed) {
            (0, Some(e)) => Err(e),
            (0, None) => Err(SignatureError::Unsigned {
                trusted: self.ids(),
            }),
            (1, _) => Err(SignatureError::UntrustedKey {
                key_id: untrusted.remove(0),
                trusted: self.ids(),
            }),
            _ => Err(SignatureError::UntrustedKeys {
                key_ids: untrusted.join(", "),
                trusted: self.ids(),
            }),
        }
    }

    /// Checks a signature over bytes held in memory; returns the key id.
    pub fn verify(
        &self,
        signature: Option<&str>,
        data: &[u8],
        service: &str,
        version: &str,
    ) -> Result<String, SignatureError> {
        self.verify_any(signature.as_slice(), data, service, version)
    }

    /// Checks a release's signatures over bytes held in memory: the first
    /// by a trusted key that verifies vouches for it; returns its key id.
    /// When none does, the first failure says why.
    pub fn verify_any(
        &self,
        signatures: &[&str],
        data: &[u8],
        service: &str,
        version: &str,
    ) -> Result<String, SignatureError> {
        let mut first_error = None;
        for signature in self.candidates(signatures)? {
            let mut check = self.start(&signature)?;
            check.update(data);
            match check.finish(service, version) {
                Ok(id) => return Ok(id),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("candidates returns at least one signature"))
    }
}

/// A signature being verified over a stream of bytes.
pub struct SignatureCheck<'a> {
    verifier: minisign_verify::StreamVerifier<'a>,
    signature: &'a ReleaseSignature,
}

impl SignatureCheck<'_> {
    pub fn update(&mut self, bytes: &[u8]) {
        self.verifier.update(bytes);
    }

    /// Verifies the signature over every byte fed, then that it vouches for
    /// `service@version`; returns the key id.
    pub fn finish(mut self, service: &str, version: &str) -> Result<String, SignatureError> {
        let key_id = self.signature.key_id.clone();
        if self.verifier.finalize().is_err() {
            return Err(SignatureError::Mismatch { key_id });
        }
        if !self.signature.names(service, version) {
            return Err(SignatureError::OtherRelease {
                signed_for: self.signature.signed_for(),
                wanted: release_token(service, version),
            });
        }
        Ok(key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTIFACT: &[u8] = b"the bytes of api 2.0.0";

    struct Key {
        pk: minisign::PublicKey,
        sk: minisign::SecretKey,
    }

    impl Key {
        fn new() -> Key {
            let minisign::KeyPair { pk, sk } =
                minisign::KeyPair::generate_unencrypted_keypair().unwrap();
            Key { pk, sk }
        }

        fn sign(&self, data: &[u8], comment: &str) -> String {
            minisign::sign(Some(&self.pk), &self.sk, data, Some(comment), None)
                .unwrap()
                .into_string()
        }

        fn trusted(&self) -> TrustedKey {
            TrustedKey::from_base64(&self.pk.to_base64()).unwrap()
        }

        fn id(&self) -> String {
            let id: [u8; 8] = self.pk.keynum().try_into().unwrap();
            key_id_hex(id)
        }
    }

    fn trust(keys: &[&Key]) -> TrustedKeys {
        TrustedKeys::new(keys.iter().map(|k| k.trusted()).collect()).unwrap()
    }

    fn comment() -> String {
        trusted_comment("api", "2.0.0", "ab12")
    }

    #[test]
    fn a_good_signature_vouches_for_its_release() {
        let key = Key::new();
        let sig = key.sign(ARTIFACT, &comment());
        let keys = trust(&[&Key::new(), &key]);
        assert_eq!(
            keys.verify(Some(&sig), ARTIFACT, "api", "2.0.0"),
            Ok(key.id())
        );
        // Fed in pieces, as the agent streams a file.
        let parsed = keys.require(Some(&sig)).unwrap();
        let mut check = keys.start(&parsed).unwrap();
        for chunk in ARTIFACT.chunks(5) {
            check.update(chunk);
        }
        assert_eq!(check.finish("api", "2.0.0"), Ok(key.id()));
    }

    #[test]
    fn key_ids_read_as_minisign_prints_them() {
        let key = Key::new();
        let pub_file = key.pk.to_box().unwrap().into_string();
        assert!(pub_file.contains(&key.id()), "{pub_file} {}", key.id());
        let parsed = ReleaseSignature::parse(&key.sign(ARTIFACT, "x")).unwrap();
        assert_eq!(parsed.key_id(), key.id());
        assert_eq!(TrustedKey::from_pub_file(&pub_file).unwrap(), key.trusted());
    }

    #[test]
    fn unsigned_is_refused_naming_the_trusted_keys() {
        let key = Key::new();
        let err = trust(&[&key])
            .verify(None, ARTIFACT, "api", "2.0.0")
            .unwrap_err();
        assert_eq!(err.to_string(), format!("unsigned (trusted: {})", key.id()));
    }

    #[test]
    fn a_signature_by_another_key_is_refused_naming_both() {
        let (trusted, other) = (Key::new(), Key::new());
        let sig = other.sign(ARTIFACT, &comment());
        let err = trust(&[&trusted])
            .verify(Some(&sig), ARTIFACT, "api", "2.0.0")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "signed by untrusted key id {} (trusted: {})",
                other.id(),
                trusted.id()
            )
        );
    }

    #[test]
    fn tampered_bytes_do_not_match() {
        let key = Key::new();
        let sig = key.sign(ARTIFACT, &comment());
        let mut tampered = ARTIFACT.to_vec();
        tampered[0] ^= 1;
        let keys = trust(&[&key]);
        let err = keys
            .verify(Some(&sig), &tampered, "api", "2.0.0")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "signature does not match the artifact (key id {})",
                key.id()
            )
        );
        let err = keys
            .verify(Some(&sig), &ARTIFACT[1..], "api", "2.0.0")
            .unwrap_err();
        assert!(matches!(err, SignatureError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn an_edited_trusted_comment_does_not_match() {
        // Renaming the release in the comment breaks the global signature,
        // so the edit is caught before the comment is believed.
        let key = Key::new();
        let sig = key.sign(ARTIFACT, &trusted_comment("tool", "1.0.0", "ab"));
        let edited = sig.replace("tool@1.0.0", "api@2.0.0");
        assert_ne!(edited, sig);
        let err = trust(&[&key])
            .verify(Some(&edited), ARTIFACT, "api", "2.0.0")
            .unwrap_err();
        assert!(matches!(err, SignatureError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn a_signature_for_another_release_is_refused_naming_it() {
        let key = Key::new();
        let keys = trust(&[&key]);
        let cases = [
            (
                trusted_comment("tool", "1.0.0", "ab"),
                "signed for tool@1.0.0, not api@2.0.0",
            ),
            (
                trusted_comment("api", "2.0.0-rc1", "ab"),
                "signed for api@2.0.0-rc1, not api@2.0.0",
            ),
            (
                "rollwave release myapi@2.0.0".into(),
                "signed for myapi@2.0.0, not api@2.0.0",
            ),
            (
                "timestamp:1700000000\tfile:api.tar.gz".into(),
                "signed for another release (trusted comment \"timestamp:1700000000\\tfile:api.tar.gz\"), not api@2.0.0",
            ),
        ];
        for (comment, want) in cases {
            let sig = key.sign(ARTIFACT, &comment);
            let err = keys
                .verify(Some(&sig), ARTIFACT, "api", "2.0.0")
                .unwrap_err();
            assert_eq!(err.to_string(), want, "{comment}");
        }
        // What `minisign -S -t "rollwave release api@2.0.0"` writes is enough.
        let sig = key.sign(ARTIFACT, "rollwave release api@2.0.0");
        assert!(keys.verify(Some(&sig), ARTIFACT, "api", "2.0.0").is_ok());
    }

    #[test]
    fn malformed_signatures_are_refused_naming_the_problem() {
        let key = Key::new();
        let good = key.sign(ARTIFACT, &comment());
        let lines: Vec<&str> = good.lines().collect();
        let with = |i: usize, line: &str| {
            let mut l = lines.clone();
            l[i] = line;
            l.join("\n")
        };
        let mut legacy = BASE64.decode(lines[1]).unwrap();
        legacy[1] = b'd';
        let legacy = BASE64.encode(legacy);
        let short = BASE64.encode([0u8; 10]);
        let cases = [
            ("".to_string(), "it has 0 lines"),
            ("hello".to_string(), "it has 1 line;"),
            (lines[..3].join("\n"), "it has 3 lines"),
            (
                with(0, "a comment"),
                "line 1 must start with \"untrusted comment: \"",
            ),
            (with(1, "not base64!"), "line 2: not base64"),
            (
                with(1, &short),
                "line 2: 10 bytes where a signature line holds 74",
            ),
            (with(1, &legacy), "legacy signature (minisign -l)"),
            (
                with(2, "comment: x"),
                "line 3 must start with \"trusted comment: \"",
            ),
            (
                with(3, &short),
                "line 4: 10 bytes where a signature line holds 64",
            ),
        ];
        for (text, want) in cases {
            let err = ReleaseSignature::parse(&text).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with("signature is not a minisign signature: "),
                "{msg}"
            );
            assert!(msg.contains(want), "{msg} should say {want}");
            assert!(!msg.contains('\n'), "{msg}");
            let err = trust(&[&key])
                .verify(Some(&text), ARTIFACT, "api", "2.0.0")
                .unwrap_err();
            assert!(matches!(err, SignatureError::Malformed(_)), "{err}");
        }
    }

    #[test]
    fn the_canonical_text_ignores_line_endings() {
        let key = Key::new();
        let sig = key.sign(ARTIFACT, &comment());
        let crlf = sig.replace('\n', "\r\n");
        let a = ReleaseSignature::parse(&sig).unwrap();
        let b = ReleaseSignature::parse(&crlf).unwrap();
        assert_eq!(a.text(), sig);
        assert_eq!(b.text(), sig);
        assert_eq!(b.trusted_comment(), comment());
        assert!(trust(&[&key])
            .verify(Some(&crlf), ARTIFACT, "api", "2.0.0")
            .is_ok());
    }

    #[test]
    fn a_repush_adds_each_new_signature_once_up_to_the_limit() {
        use crate::{ArtifactFormat, Release, Repush, SignatureRecord, MAX_RELEASE_SIGNATURES};
        let (key, other) = (Key::new(), Key::new());
        let record = |text: String| SignatureRecord {
            key_id: ReleaseSignature::parse(&text).unwrap().key_id().to_string(),
            text,
        };
        let release = |sigs: Vec<String>| Release {
            service: "api".into(),
            version: "2.0.0".into(),
            sha256: "ab12".into(),
            size: 3,
            format: ArtifactFormat::TarGz,
            filename: "api.tar.gz".into(),
            created_at: 1,
            manifest: None,
            signatures: sigs.into_iter().map(record).collect(),
        };
        let unsigned = release(vec![]);
        let first_sig = key.sign(ARTIFACT, &comment());
        let first = release(vec![first_sig.clone()]);
        // Signing is randomised: the same key and comment give another text.
        let again = release(vec![key.sign(ARTIFACT, &comment())]);
        assert_ne!(first.signatures, again.signatures);
        let other_sig = other.sign(ARTIFACT, &comment());
        let other_key = release(vec![other_sig.clone()]);

        assert_eq!(
            unsigned.repush(&first),
            Repush::Sign(Box::new(first.clone()))
        );
        assert_eq!(unsigned.repush(&unsigned), Repush::Same);
        assert_eq!(first.repush(&unsigned), Repush::Same);
        assert_eq!(first.repush(&again), Repush::Same);
        // A rogue key's signature pushed first does not keep the owner's out.
        let both = release(vec![first_sig, other_sig]);
        assert_eq!(
            first.repush(&other_key),
            Repush::Sign(Box::new(both.clone()))
        );
        assert_eq!(both.signers(), format!("{}, {}", key.id(), other.id()));
        assert_eq!(both.repush(&other_key), Repush::Same);
        let other_bytes = Release {
            sha256: "cd34".into(),
            ..first.clone()
        };
        assert_eq!(first.repush(&other_bytes), Repush::OtherContent);
        assert_eq!(unsigned.repush(&other_bytes), Repush::OtherContent);

        let mut full = unsigned.clone();
        for _ in 0..MAX_RELEASE_SIGNATURES {
            let more = release(vec![Key::new().sign(ARTIFACT, &comment())]);
            match full.repush(&more) {
                Repush::Sign(next) => full = *next,
                other => panic!("expected a signature added, got {other:?}"),
            }
        }
        assert_eq!(full.repush(&first), Repush::TooManySignatures);
        assert_eq!(full.repush(&unsigned), Repush::Same);
    }

    #[test]
    fn any_trusted_signature_that_verifies_vouches_for_a_release() {
        let (owner, rogue, other_owner) = (Key::new(), Key::new(), Key::new());
        let keys = trust(&[&owner, &other_owner]);
        let good = owner.sign(ARTIFACT, &comment());
        let rogue_sig = rogue.sign(ARTIFACT, &comment());
        // A trusted key's signature over other bytes: tried, then passed over.
        let wrong_bytes = other_owner.sign(b"other bytes", &comment());
        assert_eq!(
            keys.verify_any(&[&rogue_sig, &wrong_bytes, &good], ARTIFACT, "api", "2.0.0"),
            Ok(owner.id())
        );
        assert_eq!(
            keys.verify_any(&[&rogue_sig, &wrong_bytes], ARTIFACT, "api", "2.0.0"),
            Err(SignatureError::Mismatch {
                key_id: other_owner.id()
            }),
            "the failure of the trusted signature is the one reported"
        );
        let rogue2 = Key::new().sign(ARTIFACT, &comment());
        let err = keys
            .verify_any(&[&rogue_sig, &rogue2, "junk"], ARTIFACT, "api", "2.0.0")
            .unwrap_err();
        assert!(matches!(err, SignatureError::UntrustedKeys { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("signed only by untrusted key ids "));
        assert_eq!(
            keys.verify_any(&[], ARTIFACT, "api", "2.0.0"),
            Err(SignatureError::Unsigned {
                trusted: keys.ids()
            })
        );
        assert!(matches!(
            keys.verify_any(&["junk"], ARTIFACT, "api", "2.0.0"),
            Err(SignatureError::Malformed(_))
        ));
    }

    #[test]
    fn trusted_keys_parse_strictly_and_count_a_key_once() {
        let key = Key::new();
        assert!(TrustedKey::from_base64("RWQ")
            .unwrap_err()
            .contains("not base64"));
        let short = BASE64.encode([b'E', b'd', 1, 2]);
        assert!(TrustedKey::from_base64(&short)
            .unwrap_err()
            .contains("4 bytes where a key has 42"));
        assert_eq!(
            TrustedKey::from_pub_file("untrusted comment: x\n").unwrap_err(),
            "holds no public key line"
        );
        let keys = TrustedKeys::new(vec![key.trusted(), key.trusted()]).unwrap();
        assert_eq!(keys.keys().len(), 1);
        assert_eq!(keys.ids(), key.id());

        let other = Key::new();
        let mut bytes = BASE64.decode(other.pk.to_base64()).unwrap();
        bytes[2..10].copy_from_slice(key.pk.keynum());
        let clash = TrustedKey::from_base64(&BASE64.encode(bytes)).unwrap();
        let err = TrustedKeys::new(vec![key.trusted(), clash]).unwrap_err();
        assert!(err.contains(&key.id()), "{err}");
    }
}
