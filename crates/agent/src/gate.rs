//! The cluster version gate, agent side: delivers each service's fleet-wide
//! active version, sent by the control plane, to the service on this node.
//!
//! The file `services/<name>/active_version` is the source of truth on the
//! node. A service learns of a change by reading it (directly, through
//! `ROLLWAVE_ACTIVE_VERSION_FILE`, or through the agent's socket), from
//! `ROLLWAVE_ACTIVE_VERSION` at its next start, or at once through its
//! `reload_signal` if it has one.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::executor::{Service, Services};
use crate::layout::ServiceDirs;

/// Writes the active version of every service configured here that `active`
/// names, and signals those with a `reload_signal` whose version changed.
/// Returns the services whose version changed.
///
/// The control plane sends the whole map on every connect, so applying the
/// same map again changes nothing and signals no one. A service absent from
/// the map keeps its file: the control plane never unsets a version.
pub fn apply(services: &Services, active: &BTreeMap<String, String>) -> Vec<String> {
    let mut changed = Vec::new();
    for (name, svc) in services {
        let Some(version) = active.get(name) else {
            continue;
        };
        match deliver(&svc.dirs, name, version) {
            Ok(false) => {}
            Ok(true) => {
                changed.push(name.clone());
                if svc.config.reload_signal.is_some() {
                    reload(svc);
                }
            }
            Err(e) => tracing::warn!(service = %name, error = %e, "active version not delivered"),
        }
    }
    changed
}

/// Writes `version` to the service's file unless it already holds it;
/// returns whether it wrote.
fn deliver(dirs: &ServiceDirs, name: &str, version: &str) -> Result<bool, String> {
    // The file holds one line that services may paste into anything.
    if version.is_empty() || version.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "active version {version:?} of {name}: not a version (one word expected)"
        ));
    }
    let file = dirs.active_version_file();
    let was = dirs.active_version().unwrap_or_else(|e| {
        // Rewriting an unreadable file is the way to repair it.
        tracing::warn!(service = %name, file = %file.display(), error = %e, "reading the active version");
        None
    });
    if was.as_deref() == Some(version) {
        return Ok(false);
    }
    dirs.write_active_version(version)
        .map_err(|e| format!("writing {}: {e}", file.display()))?;
    let was = was.as_deref().unwrap_or("none");
    tracing::info!(service = %name, version = %version, was = %was, "active version of {name} is now {version} (was {was})");
    Ok(true)
}

/// Signals the service's processes in the background: `apply` runs on the
/// session's task, which must not wait for a supervisor busy stopping a
/// process. The file is written before, so a signalled process reads the
/// new version.
fn reload(svc: &Arc<Service>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(service = %svc.config.name, "no runtime to send the reload signal from");
        return;
    };
    let svc = svc.clone();
    runtime.spawn(async move {
        let name = &svc.config.name;
        match svc.supervisor.reload().await {
            Ok(pids) if pids.is_empty() => {
                tracing::debug!(service = %name, "no running process to send the reload signal to")
            }
            Ok(pids) => tracing::debug!(service = %name, pids = ?pids, "reload signal sent"),
            Err(e) => tracing::warn!(service = %name, error = %e, "reload signal not sent"),
        }
    });
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::Signal;

    use super::*;
    use crate::supervisor::testing::{shell_service, wait_for_file};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Services with nothing installed: their supervisors start nothing.
    fn idle_services(dir: &std::path::Path, names: &[&str]) -> Services {
        names
            .iter()
            .map(|name| {
                let svc = shell_service(dir, name, "exit 0", None).start();
                (name.to_string(), Arc::new(svc))
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_only_what_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let services = idle_services(tmp.path(), &["api", "web", "worker"]);
        let read = |name: &str| services[name].dirs.active_version().unwrap();

        let changed = apply(
            &services,
            &map(&[("api", "1.0.0"), ("web", "3.1.0"), ("elsewhere", "9.0.0")]),
        );
        assert_eq!(changed, ["api", "web"]);
        assert_eq!(read("api").as_deref(), Some("1.0.0"));
        assert_eq!(read("web").as_deref(), Some("3.1.0"));
        assert_eq!(read("worker"), None);

        // A reconnect resends the same map: nothing is rewritten.
        let modified =
            |name: &str| std::fs::metadata(services[name].dirs.active_version_file()).unwrap();
        let before = modified("api").modified().unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&modified("api"));
        assert!(apply(&services, &map(&[("api", "1.0.0"), ("web", "3.1.0")])).is_empty());
        assert_eq!(modified("api").modified().unwrap(), before);
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&modified("api")), inode);

        // A service left out of the map keeps its version.
        let changed = apply(&services, &map(&[("api", "2.0.0")]));
        assert_eq!(changed, ["api"]);
        assert_eq!(read("api").as_deref(), Some("2.0.0"));
        assert_eq!(read("web").as_deref(), Some("3.1.0"));
    }

    #[tokio::test]
    async fn refuses_a_version_that_is_not_one_word() {
        let tmp = tempfile::tempdir().unwrap();
        let services = idle_services(tmp.path(), &["api"]);
        for bad in ["", "1.0.0\nrm -rf", "1 0"] {
            assert!(
                apply(&services, &map(&[("api", bad)])).is_empty(),
                "{bad:?}"
            );
        }
        assert_eq!(services["api"].dirs.active_version().unwrap(), None);
    }

    #[tokio::test]
    async fn a_change_reaches_the_running_service_by_its_reload_signal() {
        let tmp = tempfile::tempdir().unwrap();
        let got = tmp.path().join("got");
        let ready = tmp.path().join("ready");
        // The trap reads the file when the signal arrives, as a service would.
        let script = r#"trap 'cat "$ROLLWAVE_ACTIVE_VERSION_FILE" >> "$GOT"' HUP
echo up > "$READY"
i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"#;
        let svc = shell_service(tmp.path(), "api", script, Some(Signal::SIGHUP))
            .env("GOT", &got)
            .env("READY", &ready)
            .installed()
            .start();
        let services: Services = [("api".to_string(), Arc::new(svc))].into();

        wait_for_file(&ready, |_| true).await;
        assert_eq!(apply(&services, &map(&[("api", "2.0.0")])), ["api"]);
        wait_for_file(&got, |text| text == "2.0.0\n").await;

        // Applying the same map again sends no signal: only a change does.
        assert!(apply(&services, &map(&[("api", "2.0.0")])).is_empty());
        assert_eq!(apply(&services, &map(&[("api", "2.1.0")])), ["api"]);
        wait_for_file(&got, |text| text == "2.0.0\n2.1.0\n").await;

        services["api"].supervisor.stop().await.unwrap();
    }
}
