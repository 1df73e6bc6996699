//! Log setup: human-readable to stderr by default, JSON for log shippers.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, LogFormat};

pub fn init(cli: &Cli) {
    let default = if cli.command.is_daemon() {
        "info"
    } else {
        "warn"
    };
    let filter =
        EnvFilter::try_from_env("ROLLWAVE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only for a person at a terminal: a log file or a journal
    // would keep the escape codes as text. NO_COLOR (no-color.org) too.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}
