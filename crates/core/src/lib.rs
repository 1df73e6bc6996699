//! Pure domain logic of rollwave: rollout specs, the fleet as observed, the
//! rollout state machine and the planner that drives it.
//!
//! Nothing in this crate performs I/O or reads a clock: time comes in as a
//! [`Timestamp`] argument, so every decision can be replayed and property-tested.

mod amount;
pub mod analysis;
mod audit;
mod auth;
mod describe;
mod duration;
mod error;
mod fleet;
mod gate;
mod hooks;
pub mod invariants;
mod manifest;
mod planner;
mod quorum;
mod rollout;
mod selector;
pub mod signing;
mod spec;
mod summary;

pub use amount::Amount;
pub use analysis::{
    Analysis, AnalysisFile, AnalysisRun, Measurement, OnInconclusive, RunState, Verdict,
};
pub use audit::AuditEntry;
pub use auth::{
    hash_secret, split_token, validate_token_name, Access, Role, TokenProblem, TokenRecord,
    TokenView,
};
pub use describe::{describe_io, error_chain, find_io_error};
pub use duration::{format_bytes, format_duration, parse_duration, Span};
pub use error::SpecError;
pub use fleet::{BackupInfo, Fleet, Health, NodeView, ServiceView};
pub use gate::{check_downgrade, check_finalize, newest_running, ActiveVersion, FinalizeError};
pub use hooks::{
    check_haproxy_name, check_hook_name, Hook, HookAction, HookFile, HookReport, Hooks, HooksFile,
    LbState, OnError, DEFAULT_HOOK_TIMEOUT,
};
pub use manifest::{
    ReleaseManifest, MANIFEST_SCAN_BYTES, MANIFEST_SCAN_ENTRIES, MAX_MANIFEST_BYTES,
    RELEASE_MANIFEST,
};
pub use planner::{plan_batches, plan_id, step, step_in_place, Actions, Decision, Dispatch};
pub use quorum::{describe_group, Floor, GroupCount, Quorum};
pub use rollout::{
    CommandError, Dependency, HookStage, NodeProgress, NodeState, Rollout, RolloutEvent,
    RolloutState, TaskKind, TaskOutcome, TaskRef,
};
pub use selector::Selector;
pub use signing::{ReleaseSignature, SignatureError, TrustedKey, TrustedKeys};
pub use spec::{
    CountOrText, Order, OrderFile, RolloutFile, RolloutSpec, ServiceFile, Spread, StrategyFile,
    Wave, WaveFile,
};
pub use summary::{NodeProblem, RolloutSummary, PROBLEMS_SHOWN};

/// Milliseconds since the Unix epoch. The only notion of time in this crate.
pub type Timestamp = u64;

/// The longest version accepted, in bytes: a version names a directory on
/// every node, and file names stop at 255 bytes.
pub const MAX_VERSION_BYTES: usize = 128;

/// Validates a version string: semantic versioning (`MAJOR.MINOR.PATCH`,
/// optionally `-PRERELEASE` and `+BUILD` of `0-9A-Za-z-.`), at most
/// [`MAX_VERSION_BYTES`] bytes, as releases are ordered by it. Surrounding
/// whitespace is ignored; [`normalize_version`] gives the form to store.
pub fn parse_version(field: &str, s: &str) -> Result<semver::Version, SpecError> {
    let trimmed = s.trim();
    if trimmed.len() > MAX_VERSION_BYTES {
        return Err(SpecError::new(
            field,
            format!(
                "{} bytes is longer than the limit of {MAX_VERSION_BYTES} for a version",
                trimmed.len()
            ),
        ));
    }
    semver::Version::parse(trimmed).map_err(|e| {
        SpecError::new(
            field,
            format!("{s:?} is not a semantic version (like 1.2.3): {e}"),
        )
    })
}

/// A valid version in the one form it is stored, looked up and compared
/// under: `" 2.0.0\n"` is `"2.0.0"`.
pub fn normalize_version(field: &str, s: &str) -> Result<String, SpecError> {
    parse_version(field, s).map(|v| v.to_string())
}

/// `n` and a noun in the number it takes: "1 node", "3 nodes". For the
/// nouns messages count (node, rollout, wave...), whose plural adds "s".
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Validates a service name: it becomes a directory name on every node.
pub fn validate_service_name(field: &str, s: &str) -> Result<(), SpecError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("{s:?} is not a valid service name (1-64 characters of a-z, A-Z, 0-9, '-', '_', '.', not starting with '.')"),
        ))
    }
}

/// How a release's artifact is packaged.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactFormat {
    /// A gzip-compressed tarball, unpacked into the release directory.
    /// Spelled `tar.gz` everywhere; records stored as `tar_gz` still read.
    #[serde(rename = "tar.gz", alias = "tar_gz")]
    TarGz,
    /// A single executable, installed as `<release dir>/<service>`.
    Executable,
}

impl ArtifactFormat {
    /// The one spelling of the format, in the API, the CLI and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactFormat::TarGz => "tar.gz",
            ArtifactFormat::Executable => "executable",
        }
    }
}

impl std::fmt::Display for ArtifactFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pushed release: one version of one service, stored content-addressed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Release {
    pub service: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub format: ArtifactFormat,
    pub filename: String,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub created_at: Timestamp,
    /// The archive's `rollwave.toml`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ReleaseManifest>,
    /// The minisign signatures pushed for these bytes, oldest first. Agents
    /// with trusted keys install the release when any one of them is by a
    /// trusted key and verifies; the control plane only checks that each
    /// parses. Several, so that a signature by a key no agent trusts (pushed
    /// first, by mistake or by someone else) never keeps the owner's out.
    #[serde(default)]
    pub signatures: Vec<SignatureRecord>,
}

/// One signature of a release, as stored and sent to agents.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SignatureRecord {
    /// The id of the key that made it, as minisign prints it.
    pub key_id: String,
    /// The text of the `.minisig` file.
    pub text: String,
}

/// How many signatures one release may carry: enough for every owner and
/// rotation a fleet has, bounded so that a release record stays small.
pub const MAX_RELEASE_SIGNATURES: usize = 16;

/// What pushing a release again, as `service@version` already exists, does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repush {
    /// Nothing to change: the same bytes, and no signature or only ones the
    /// stored release carries already.
    Same,
    /// The same bytes with a signature the stored release lacks: the stored
    /// release with it added.
    Sign(Box<Release>),
    /// Other bytes: releases are immutable.
    OtherContent,
    /// The same bytes with a new signature, but the release carries
    /// [`MAX_RELEASE_SIGNATURES`] already.
    TooManySignatures,
}

impl Release {
    /// How a push of `pushed` onto this stored release is answered.
    pub fn repush(&self, pushed: &Release) -> Repush {
        if pushed.sha256 != self.sha256 {
            return Repush::OtherContent;
        }
        let mut signed = self.clone();
        for new in &pushed.signatures {
            if signed
                .signatures
                .iter()
                .any(|s| same_signature(&s.text, &new.text))
            {
                continue;
            }
            if signed.signatures.len() >= MAX_RELEASE_SIGNATURES {
                return Repush::TooManySignatures;
            }
            signed.signatures.push(new.clone());
        }
        if signed.signatures.len() == self.signatures.len() {
            Repush::Same
        } else {
            Repush::Sign(Box::new(signed))
        }
    }

    /// The ids of the keys that signed it, comma-separated; `-` if none.
    pub fn signers(&self) -> String {
        if self.signatures.is_empty() {
            return "-".into();
        }
        let ids: Vec<&str> = self.signatures.iter().map(|s| s.key_id.as_str()).collect();
        ids.join(", ")
    }
}

/// Signing is randomised: the same key signing the same bytes with the same
/// trusted comment twice gives two texts that vouch for the same thing, so a
/// retried `release push --sign-key` is not a conflict.
fn same_signature(a: &str, b: &str) -> bool {
    match (ReleaseSignature::parse(a), ReleaseSignature::parse(b)) {
        (Ok(a), Ok(b)) => a.key_id() == b.key_id() && a.trusted_comment() == b.trusted_comment(),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_stored_in_one_form() {
        assert_eq!(normalize_version("v", " 2.0.0\n").unwrap(), "2.0.0");
        assert_eq!(
            normalize_version("v", "1.2.3-rc.1+build.7").unwrap(),
            "1.2.3-rc.1+build.7"
        );
        let long = format!("1.0.0-{}", "a".repeat(MAX_VERSION_BYTES));
        let e = normalize_version("version", &long).unwrap_err().to_string();
        assert!(e.starts_with("version: "), "{e}");
        assert!(e.contains("limit of 128"), "{e}");
        assert!(normalize_version("version", "2.0.0/../x").is_err());
        assert!(normalize_version("version", "2.0 .0").is_err());
    }
}
