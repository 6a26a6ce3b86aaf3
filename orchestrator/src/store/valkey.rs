//! Valkey store (being written).
