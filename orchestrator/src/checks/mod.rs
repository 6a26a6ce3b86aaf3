//! Health checks the orchestrator runs itself (pull), for registrations that declare a
//! `check`. See the README's "Health" section for the rules and `docs/health-checks.md` for
//! the design.

pub mod spec;

pub use spec::Probe;
