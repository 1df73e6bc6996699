//! Integration tests with real processes: a control plane and agents started
//! from the built `rollwave` binary, real demo services on loopback ports,
//! temporary directories. One test binary, to keep link time down.

mod analysis;
mod audit;
mod backups;
mod bad_input;
mod browser;
mod completions;
mod dashboard;
mod disk;
mod downloads;
mod faults;
mod gate;
mod handoff;
mod hardening_http;
mod harness;
mod hooks;
mod integrity;
mod json_output;
mod lists;
mod metrics;
mod migrations;
mod openapi;
mod operator;
mod probes;
mod quorum;
#[cfg(feature = "etcd")]
mod replicas;
mod retention;
mod rollouts;
mod service_logs;
mod signing;
mod sim;
mod store_backup;
mod strategies;
mod tls;
mod trust;
