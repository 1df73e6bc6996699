//! The cluster version gate: each service's fleet-wide active version, which
//! changes only when every node runs a binary that understands it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{parse_version, Fleet, SpecError, Timestamp};

/// A service's active version, as stored by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ActiveVersion {
    pub service: String,
    pub version: String,
    /// Unix milliseconds.
    #[schema(value_type = u64)]
    pub set_at: Timestamp,
    /// Who set it: `finalize`, or the rollout that finalized on completion.
    pub by: String,
}

/// Why a finalize cannot happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FinalizeError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("no node runs service {0:?}")]
    NoNodes(String),
    /// Some nodes do not run a version at least the target.
    #[error("cannot finalize {service} at {version}: {} (every node must run {version} or newer first)", behind.join(", "))]
    Behind {
        service: String,
        version: String,
        behind: Vec<String>,
    },
    #[error("the active version of {service} is already {active}: finalize never lowers it (to {version})")]
    Lower {
        service: String,
        version: String,
        active: String,
    },
}

/// The version `finalize` targets without `--to`: the newest one running on
/// any node of the service.
pub fn newest_running(service: &str, fleet: &Fleet) -> Option<String> {
    fleet
        .values()
        .filter_map(|n| n.services.get(service)?.version.clone())
        .filter_map(|v| semver::Version::parse(&v).ok().map(|p| (p, v)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v)
}

/// Checks that `version` may become the active version of `service`: every
/// node that has the service (online or not, as last reported) runs it or a
/// newer one, and it does not lower the current active version. Returns
/// `false` when it is already the active version (nothing to do).
pub fn check_finalize(
    service: &str,
    version: &str,
    fleet: &Fleet,
    active: Option<&ActiveVersion>,
) -> Result<bool, FinalizeError> {
    let target = parse_version("to", version)?;
    if let Some(a) = active {
        if let Ok(current) = semver::Version::parse(&a.version) {
            if current == target {
                return Ok(false);
            }
            if current > target {
                return Err(FinalizeError::Lower {
                    service: service.into(),
                    version: version.into(),
                    active: a.version.clone(),
                });
            }
        }
    }
    let mut nodes = 0;
    let mut behind = Vec::new();
    for n in fleet.values() {
        let Some(s) = n.services.get(service) else {
            continue;
        };
        nodes += 1;
        let running = s.version.as_deref();
        let ok = running
            .and_then(|v| semver::Version::parse(v).ok())
            .is_some_and(|v| v >= target);
        if !ok {
            let offline = if n.online { "" } else { ", offline" };
            behind.push(format!(
                "{} runs {}{offline}",
                n.name,
                running.unwrap_or("nothing")
            ));
        }
    }
    if nodes == 0 {
        return Err(FinalizeError::NoNodes(service.into()));
    }
    if !behind.is_empty() {
        return Err(FinalizeError::Behind {
            service: service.into(),
            version: version.into(),
            behind,
        });
    }
    Ok(true)
}

/// Refuses a rollout to `version` that would put nodes below the active
/// version: their data may already use the newer format.
pub fn check_downgrade(
    service: &str,
    version: &str,
    active: Option<&ActiveVersion>,
) -> Result<(), String> {
    let (Some(a), Ok(target)) = (active, semver::Version::parse(version)) else {
        return Ok(());
    };
    match semver::Version::parse(&a.version) {
        Ok(current) if current > target => Err(format!(
            "cannot go to {service}@{version}: the active version of {service} is {} (set by {}), so its data may already use the {} format; only versions from {} up are allowed",
            a.version, a.by, a.version, a.version
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Health, NodeView, ServiceView};

    fn fleet(versions: &[(&str, Option<&str>, bool)]) -> Fleet {
        versions
            .iter()
            .map(|(name, v, online)| {
                let view = NodeView {
                    name: name.to_string(),
                    labels: Default::default(),
                    online: *online,
                    last_seen: 0,
                    services: [(
                        "api".to_string(),
                        ServiceView {
                            version: v.map(str::to_string),
                            health: Health::Healthy,
                            ..Default::default()
                        },
                    )]
                    .into(),
                };
                (name.to_string(), view)
            })
            .collect()
    }

    fn active(v: &str) -> ActiveVersion {
        ActiveVersion {
            service: "api".into(),
            version: v.into(),
            set_at: 0,
            by: "finalize".into(),
        }
    }

    #[test]
    fn finalize_needs_every_node_on_the_target_or_newer() {
        let f = fleet(&[
            ("n1", Some("2.0.0"), true),
            ("n2", Some("1.0.0"), true),
            ("n3", None, false),
        ]);
        let err = check_finalize("api", "2.0.0", &f, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot finalize api at 2.0.0: n2 runs 1.0.0, n3 runs nothing, offline (every node must run 2.0.0 or newer first)"
        );
        let f = fleet(&[("n1", Some("2.0.0"), true), ("n2", Some("2.1.0"), false)]);
        assert_eq!(check_finalize("api", "2.0.0", &f, None), Ok(true));
        assert_eq!(newest_running("api", &f).as_deref(), Some("2.1.0"));
        assert_eq!(
            check_finalize("api", "2.0.0", &f, Some(&active("2.0.0"))),
            Ok(false)
        );
        assert!(matches!(
            check_finalize("api", "1.0.0", &f, Some(&active("2.0.0"))),
            Err(FinalizeError::Lower { .. })
        ));
        assert!(matches!(
            check_finalize("db", "1.0.0", &f, None),
            Err(FinalizeError::NoNodes(_))
        ));
    }

    #[test]
    fn downgrades_stop_at_the_active_version() {
        assert!(check_downgrade("api", "1.0.0", None).is_ok());
        assert!(check_downgrade("api", "2.0.0", Some(&active("2.0.0"))).is_ok());
        let err = check_downgrade("api", "1.0.0", Some(&active("2.0.0"))).unwrap_err();
        assert!(err.contains("the active version of api is 2.0.0"), "{err}");
    }
}
