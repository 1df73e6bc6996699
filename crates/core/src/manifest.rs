//! `rollwave.toml` at the root of a release archive: what the release itself
//! asks of every node that installs it.
//!
//! ```toml
//! # Run by the new version against the service's data, before it serves.
//! [migrate]
//! command = ["./bin/api", "migrate"]
//! timeout = "10m"
//!
//! # Run once per rollout, on one node, against a throwaway copy of the data.
//! [dry_run]
//! command = ["./bin/api", "migrate", "--dry-run"]
//!
//! # Node hooks that travel with the release, run inside the rollout's own.
//! [[hooks.post_node]]
//! command = ["./bin/api", "verify"]
//! ```
//!
//! Commands run without a shell, from the release directory, so a relative
//! program (`./bin/api`) is the release's own. They find the data through
//! `ROLLWAVE_DATA_DIR` (for a dry run, a copy of it).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::hooks::{HookAction, HookFile, OnError};
use crate::{parse_duration, Hook, Span, SpecError};

/// The file's name at the archive's root.
pub const RELEASE_MANIFEST: &str = "rollwave.toml";
/// A manifest is a few lines; anything larger is not one.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Where in an archive the manifest is looked for: among its first
/// `MANIFEST_SCAN_ENTRIES` entries, with its header within the first
/// `MANIFEST_SCAN_BYTES` of the inflated tar stream. The control plane reads
/// no further when a release is pushed, so that a small upload that inflates
/// to gigabytes costs it a bounded amount of work; agents refuse a
/// `rollwave.toml` found further on, so that a node never runs a manifest the
/// control plane did not see and validate.
pub const MANIFEST_SCAN_ENTRIES: u64 = 10_000;
/// See [`MANIFEST_SCAN_ENTRIES`].
pub const MANIFEST_SCAN_BYTES: u64 = 64 << 20;
/// Migrations touch all of a service's data: minutes, not seconds.
pub const DEFAULT_MIGRATE_TIMEOUT: Span = 10 * 60_000;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    migrate: Option<StepFile>,
    dry_run: Option<StepFile>,
    hooks: Option<ReleaseHooksFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    command: Option<Vec<String>>,
    timeout: Option<String>,
}

/// Only node hooks: a release is installed by nodes, it does not run the
/// rollout.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseHooksFile {
    #[serde(default)]
    pre_node: Vec<HookFile>,
    #[serde(default)]
    post_node: Vec<HookFile>,
}

/// A validated `rollwave.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReleaseManifest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate: Option<Hook>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_node: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_node: Vec<Hook>,
}

impl ReleaseManifest {
    /// Parses and validates the file's text. Errors name the field as
    /// `rollwave.toml: migrate.command`.
    pub fn parse(text: &str) -> Result<ReleaseManifest, SpecError> {
        let file: ManifestFile = toml::from_str(text).map_err(|e| {
            SpecError::new(RELEASE_MANIFEST, e.message().trim_end().replace('\n', " "))
        })?;
        let at = |f: &str| format!("{RELEASE_MANIFEST}: {f}");
        let step = |name: &str, s: &Option<StepFile>| -> Result<Option<Hook>, SpecError> {
            let Some(s) = s else { return Ok(None) };
            let command = s
                .command
                .clone()
                .filter(|c| c.first().is_some_and(|p| !p.trim().is_empty()))
                .ok_or_else(|| {
                    SpecError::new(
                        at(&format!("{name}.command")),
                        "is required: the program and its arguments, e.g. [\"./bin/migrate\"]",
                    )
                })?;
            let timeout = match &s.timeout {
                Some(t) => parse_duration(&at(&format!("{name}.timeout")), t)?,
                None => DEFAULT_MIGRATE_TIMEOUT,
            };
            if timeout == 0 {
                return Err(SpecError::new(
                    at(&format!("{name}.timeout")),
                    "must be more than 0s",
                ));
            }
            Ok(Some(Hook {
                name: name.to_string(),
                action: HookAction::Exec { command },
                timeout,
                // Not retried: a migration that failed half-way is restored
                // from the backup, not run again over its own leftovers.
                retries: 0,
                on_error: OnError::Fail,
            }))
        };
        let hooks = file.hooks.unwrap_or_default();
        let list = |name: &str, hooks: &[HookFile]| -> Result<Vec<Hook>, SpecError> {
            hooks
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    h.resolve(&format!("release.hooks.{name}[{i}]"))
                        .map_err(|e| SpecError::new(at(&e.field), e.message))
                })
                .collect()
        };
        Ok(ReleaseManifest {
            migrate: step("migrate", &file.migrate)?,
            dry_run: step("dry_run", &file.dry_run)?,
            pre_node: list("pre_node", &hooks.pre_node)?,
            post_node: list("post_node", &hooks.post_node)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self == &ReleaseManifest::default()
    }

    /// What the release declares, for listings: `migrate, dry_run, 1 hook`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.migrate.is_some() {
            parts.push("migrate".to_string());
        }
        if self.dry_run.is_some() {
            parts.push("dry_run".to_string());
        }
        let hooks = self.pre_node.len() + self.post_node.len();
        if hooks > 0 {
            parts.push(format!("{hooks} hook{}", if hooks == 1 { "" } else { "s" }));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_manifest_resolves() {
        let m = ReleaseManifest::parse(
            r#"
            [migrate]
            command = ["./bin/api", "migrate"]
            timeout = "2m"
            [dry_run]
            command = ["./bin/api", "migrate", "--check"]
            [[hooks.post_node]]
            command = ["./bin/api", "verify"]
            "#,
        )
        .unwrap();
        let migrate = m.migrate.as_ref().unwrap();
        assert_eq!(migrate.timeout, 120_000);
        assert_eq!(migrate.retries, 0);
        assert_eq!(m.dry_run.as_ref().unwrap().timeout, DEFAULT_MIGRATE_TIMEOUT);
        assert_eq!(m.post_node[0].name, "release.hooks.post_node[0]");
        assert_eq!(m.describe(), "migrate, dry_run, 1 hook");
        assert!(ReleaseManifest::parse("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let cases = [
            (
                "[migrate]\ntimeout = \"1m\"",
                "rollwave.toml: migrate.command: is required",
            ),
            (
                "[dry_run]\ncommand = [\"x\"]\ntimeout = \"soon\"",
                "rollwave.toml: dry_run.timeout",
            ),
            (
                "[migrate]\ncommand = [\"x\"]\ntimeout = \"0s\"",
                "rollwave.toml: migrate.timeout: must be more than 0s",
            ),
            (
                "[[hooks.pre_rollout]]\ncommand = [\"x\"]",
                "rollwave.toml: unknown field `pre_rollout`",
            ),
            (
                "[[hooks.pre_node]]\nkind = \"ftp\"",
                "rollwave.toml: release.hooks.pre_node[0].kind",
            ),
            ("migrate = 3", "rollwave.toml: invalid type"),
        ];
        for (text, want) in cases {
            let err = ReleaseManifest::parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }
}
