//! `rollwave completions SHELL` prints a script the shell accepts.

use std::process::Command;

use crate::harness::exe;

/// Whether `program` can be run here.
fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn completion_scripts_name_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, check) in [
        ("bash", ["bash", "-n"]),
        ("zsh", ["zsh", "-n"]),
        ("fish", ["fish", "--no-execute"]),
    ] {
        let out = Command::new(exe())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["rollout", "finalize", "release", "nodes", "completions"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
        // The shell's own parser, where the shell is installed.
        if installed(check[0]) {
            let file = dir.path().join(format!("rollwave.{shell}"));
            std::fs::write(&file, &script).unwrap();
            let out = Command::new(check[0])
                .arg(check[1])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} {} refuses the {shell} script: {}",
                check[0],
                check[1],
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = Command::new(exe())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
