//! The servicekit orchestrator.
pub mod store;
