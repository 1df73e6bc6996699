//! The `rollwave` binary: the control plane, the agent, the client verbs and
//! the demo, behind one set of subcommands.

pub mod cli;
pub mod client;
mod commands;
pub mod demo;
pub mod demo_service;
pub mod etcd_fleet;
pub mod fleet;
pub mod keys;
pub mod load;
pub mod logging;
pub mod out;
pub mod render;
mod service_logs;
pub mod sim;
mod tokens;

use std::process::ExitCode;

pub use client::UserError;

/// Runs a parsed command line; the exit code reflects the outcome.
pub async fn run(cli: cli::Cli) -> anyhow::Result<ExitCode> {
    commands::run(cli).await
}

/// The one-line message shown for an error: its context chain, joined.
pub fn error_line(e: &anyhow::Error) -> String {
    let text = match e.downcast_ref::<UserError>() {
        Some(u) => u.0.clone(),
        None => e
            .chain()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(": "),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// 2 for bad input (as for bad flags), 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| {
        c.downcast_ref::<UserError>().is_some()
            || c.downcast_ref::<rollwave_server::BadConfig>().is_some()
    }) {
        2
    } else {
        1
    }
}
