//! Nothing here: this package exists for its test targets (the `*.rs` files next to this one)
//! and the benchmarks in `../benches/`, which exercise the whole workspace.
