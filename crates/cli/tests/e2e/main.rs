//! Integration tests with real processes: a control plane and agents started
//! from the built `rollwave` binary, real demo services on loopback ports,
//! temporary directories. One test binary, to keep link time down.

mod backups;
mod bad_input;
mod completions;
mod faults;
mod gate;
mod handoff;
mod harness;
mod hooks;
mod json_output;
mod migrations;
mod openapi;
mod rollouts;
mod strategies;
