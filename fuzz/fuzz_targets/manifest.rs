//! A release's `rollwave.toml`, read by the control plane at push from an
//! archive anyone with push rights built: no panic, and a valid manifest
//! survives the JSON the release record stores it as.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollwave_core::{HookAction, ReleaseManifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let manifest = match ReleaseManifest::parse(text) {
        Ok(m) => m,
        Err(e) => {
            assert!(e.field.starts_with("rollwave.toml"), "{e}");
            return;
        }
    };
    let hooks = manifest.migrate.iter().chain(&manifest.dry_run);
    for hook in hooks.chain(&manifest.pre_node).chain(&manifest.post_node) {
        assert!(hook.timeout > 0, "{hook:?}");
        if let HookAction::Exec { command } = &hook.action {
            assert!(
                command.first().is_some_and(|p| !p.trim().is_empty()),
                "{hook:?}"
            );
        }
    }
    let json = serde_json::to_string(&manifest).expect("a manifest serializes");
    let back: ReleaseManifest = serde_json::from_str(&json).expect("a stored manifest reads back");
    assert_eq!(back, manifest);
    assert_eq!(manifest.is_empty(), manifest.describe().is_empty());
});
