//! Helpers shared by the orchestrator's integration tests. Each test binary uses a subset.
#![allow(dead_code)]

pub mod cluster;
pub mod http;
pub mod lease;
pub mod replicas;
pub mod sse;
pub mod tls;
pub mod valkey;
