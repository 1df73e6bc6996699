//! `agent.toml`: no panic on any text, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollwave_agent::AgentConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = AgentConfig::parse(text) else {
        return;
    };
    assert!(!config.services.is_empty());
    assert!(config.server.starts_with("http://") || config.server.starts_with("https://"));
    for (i, s) in config.services.iter().enumerate() {
        assert!(!s.command.is_empty(), "{s:?}");
        assert!(s.backups_kept > 0, "{s:?}");
        assert!(s.backup.iter().all(|p| p.is_absolute()), "{s:?}");
        assert!(
            config.services[..i].iter().all(|o| o.name != s.name),
            "{} twice",
            s.name
        );
    }
});
